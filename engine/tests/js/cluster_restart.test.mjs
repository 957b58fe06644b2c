// Restarts and deaths nobody sees, in a cluster on a real nats-server with the phoenix client:
// a node that stops with a state file is held by the others for its restart grace and its next
// run takes its presences back; a node killed under a leave grace is held by the others, and
// its clients, reconnecting to other nodes, take their presences over with the same phx_refs.
// Observers on the surviving nodes see no diff, only the leaves of those who never come back,
// when the grace ends.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startNats, startNode, connect, join, keys, waitFor, sleep, api,
} from './harness.mjs';

const HEARTBEAT = 200;
const TIMEOUT = 1000;
const timing = ['--node-heartbeat-ms', String(HEARTBEAT), '--node-timeout-ms', String(TIMEOUT), '--diff-window-ms', '0'];

let nats;
const sockets = [];
const running = new Set();
before(async () => {
  nats = await startNats();
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const n of running) {
    if (n.proc.exitCode === null && n.proc.signalCode === null) await n.stop();
  }
  await nats.stop();
});

async function node(name, args, opts) {
  const n = await startNode(nats, name, [...timing, ...args], opts);
  running.add(n);
  return n;
}

function open(n, user) {
  const s = connect(n, user);
  sockets.push(s);
  return s;
}

/** Every meta's `key:phx_ref` in a view, sorted. */
const refsOf = (presence) => presence.list((k, p) => p.metas.map((m) => `${k}:${m.phx_ref}`)).flat().sort();
const refOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas[0].phx_ref : null)).find(Boolean);
const metasOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean) || [];

/** A state file in a fresh directory, and the arguments of a node that restarts with it. */
function withStateFile(grace) {
  const file = path.join(mkdtempSync(path.join(tmpdir(), 'roster-cluster-restart-')), 'state.bin');
  return { file, restarting: ['--state-file', file, '--restart-grace-ms', String(grace)] };
}

/** Stops `n` with SIGTERM, as a deploy does: it exits 0. */
async function stopNode(n) {
  const { code } = await n.stop();
  running.delete(n);
  assert.equal(code, 0, n.log());
}

/** Diffs seen on `view`'s channel from now on. */
function record(view) {
  const diffs = [];
  view.channel.on('presence_diff', (d) => diffs.push(d));
  return diffs;
}

test('a node restarts with a state file: nobody elsewhere sees it, clients back on it or on another node keep their refs, the unclaimed leave at the grace', async () => {
  const grace = 4000;
  const { file, restarting } = withStateFile(grace);
  const a = await node('ra', []);
  const c = await node('rc', []);
  const b = await node('rb', restarting);
  const members = {};
  for (const key of ['alice', 'bob', 'carol', 'dave']) {
    const socket = open(b, key);
    members[key] = { socket, ...(await join(socket, 'room:r', { meta: { s: 'online' } })) };
  }
  const observer = await join(open(a, 'observer'), 'room:r', { track: false });
  const watcher = await join(open(c, 'watcher'), 'watch:r', { users: ['alice', 'bob', 'carol', 'dave'] });
  await waitFor(() => keys(observer.presence).length === 4 && keys(watcher.presence).length === 4, 3000,
    'everyone seen on a, and watched on c');
  const refs = Object.fromEntries(Object.keys(members).map((k) => [k, refOf(observer.presence, k)]));
  const diffs = record(observer);
  const watched = record(watcher);

  // b stops under its clients, as a deploy does.
  const stoppingAt = Date.now();
  await stopNode(b);
  Object.values(members).forEach((m) => m.socket.disconnect());
  assert.ok(existsSync(file), 'the stop wrote the state file');
  // Longer than the node timeout: had a or c let b's presences go, the diff would be here.
  await sleep(TIMEOUT + 2 * HEARTBEAT);
  assert.deepEqual(diffs, [], 'nothing seen while b is away');

  const b2 = await node('rb', restarting, { port: b.port });
  assert.ok(!existsSync(file), 'the file taken back is removed');
  // alice comes back to b, bob to c (a load balancer sends clients anywhere): same refs.
  const alice = await join(open(b2, 'alice'), 'room:r', { meta: { s: 'online' } });
  const bob = await join(open(c, 'bob'), 'room:r', { meta: { s: 'online' } });
  await waitFor(() => [alice, bob].every(({ presence }) => keys(presence).length === 4), 3000, 'their states');
  assert.equal(refOf(alice.presence, 'alice'), refs.alice, 'alice keeps her ref on b');
  assert.equal(refOf(bob.presence, 'bob'), refs.bob, 'bob keeps his ref on c');
  // dave comes back busy: one update.
  await join(open(b2, 'dave'), 'room:r', { meta: { s: 'busy' } });
  await waitFor(() => diffs.length > 0, 3000, 'dave\'s update');
  await sleep(300);
  assert.equal(diffs.length, 1, JSON.stringify(diffs));
  assert.deepEqual(Object.keys(diffs[0].joins), ['dave']);
  assert.equal(diffs[0].leaves.dave.metas[0].phx_ref, refs.dave);
  assert.equal(diffs[0].joins.dave.metas[0].phx_ref_prev, refs.dave);
  assert.deepEqual(refsOf(alice.presence), refsOf(observer.presence), 'b agrees with a');
  assert.deepEqual(refsOf(bob.presence), refsOf(observer.presence), 'c agrees with a');

  // carol never comes back: she leaves at the grace, counted from the stop, everywhere once.
  assert.ok(Date.now() - stoppingAt < grace - 300, 'still within the grace');
  await waitFor(() => !keys(observer.presence).includes('carol'), grace + 2000, 'carol gone after the grace');
  assert.ok(Date.now() - stoppingAt >= grace - 10, `not before the grace (${Date.now() - stoppingAt} ms)`);
  await waitFor(() => [alice, bob].every(({ presence }) => !keys(presence).includes('carol')), 2000, 'carol gone on b and c');
  await sleep(300);
  assert.equal(diffs.length, 2, JSON.stringify(diffs));
  assert.deepEqual(Object.keys(diffs[1].leaves), ['carol']);
  assert.deepEqual(diffs[1].joins, {});
  assert.deepEqual(keys(observer.presence), ['alice', 'bob', 'dave']);
  // The watcher on c saw dave's update and carol going offline, nothing of the rest.
  const offline = watched.flatMap((d) => Object.keys(d.leaves).filter((k) => !(k in d.joins)));
  assert.deepEqual(offline, ['carol'], JSON.stringify(watched));
  assert.deepEqual(keys(watcher.presence), ['alice', 'bob', 'dave']);
  // A held presence taken over elsewhere is that node's now: bob leaving c is seen at once.
  const t = Date.now();
  bob.channel.leave();
  await waitFor(() => !keys(observer.presence).includes('bob'), 3000, 'bob gone');
  assert.ok(Date.now() - t < TIMEOUT, 'at once, not at some grace');
});

test('a server-side presence on a node that restarts with a state file: held by the others meanwhile, live again after, not gone at the grace', async () => {
  // Longer than the wait below for the node timeout, or the file would be stale.
  const grace = 4000;
  const { restarting } = withStateFile(grace);
  const a = await node('sa', []);
  const b = await node('sb', restarting);
  assert.equal((await api(b.admin, 'PUT', '/api/topics/room:s/presences/bot', { meta: { kind: 'bot' } })).status, 202);
  const observer = await join(open(a, 'observer'), 'room:s', { track: false });
  await waitFor(() => keys(observer.presence).includes('bot'), 3000, 'the bot seen on a');
  const ref = refOf(observer.presence, 'bot');
  const diffs = record(observer);

  const stoppingAt = Date.now();
  await stopNode(b);
  await sleep(TIMEOUT + 2 * HEARTBEAT);
  assert.deepEqual(diffs, [], 'nothing seen while b is away');
  const b2 = await node('sb', restarting, { port: b.port });
  const there = await join(open(b2, 'viewer'), 'room:s', { track: false });
  await waitFor(() => keys(there.presence).includes('bot'), 3000, () => `the bot back on b: ${b2.log()}`);
  assert.equal(refOf(there.presence, 'bot'), ref);
  // Past the grace: a held presence nobody took back would have left everywhere by now.
  await waitFor(() => Date.now() - stoppingAt > grace + 500, grace + 2000, 'past the grace');
  assert.deepEqual(diffs, [], JSON.stringify(diffs));
  assert.equal(refOf(observer.presence, 'bot'), ref, 'still on a, the same presence');
  // It is b's again: removed through a, it leaves everywhere, once.
  assert.equal((await api(a.admin, 'DELETE', '/api/topics/room:s/presences/bot')).status, 202);
  await waitFor(() => !keys(observer.presence).includes('bot') && !keys(there.presence).includes('bot'), 3000, 'removed');
  await sleep(300);
  assert.equal(diffs.length, 1, JSON.stringify(diffs));
  assert.deepEqual([Object.keys(diffs[0].joins), Object.keys(diffs[0].leaves)], [[], ['bot']]);
});

test('kill -9 of a node under a leave grace: its clients reconnect to two other nodes and nobody sees a thing; the unclaimed leave at the grace', async () => {
  const graceMs = 4000;
  const leaveGrace = ['--leave-grace-ms', String(graceMs)];
  const a = await node('ka', leaveGrace);
  const b = await node('kb', leaveGrace);
  const c = await node('kc', leaveGrace);
  const doomed = await node('kd', leaveGrace);
  const users = ['u1', 'u2', 'u3', 'u4', 'u5', 'early', 'gone'];
  for (const u of users) await join(open(doomed, u), 'room:k', { meta: { at: u } });
  // One user with two tabs of equal metas: they come back to two nodes at once and may both
  // take the same held presence; the node ranked second must move to the other. (Under a
  // leave grace the second tab is a twin, announced when its grace ends.)
  for (let i = 0; i < 2; i += 1) await join(open(doomed, 'tabs'), 'room:k', { meta: { same: true } });
  const obsA = await join(open(a, 'obs-a'), 'room:k', { track: false });
  const obsB = await join(open(b, 'obs-b'), 'room:k', { track: false });
  const watcher = await join(open(c, 'watcher'), 'watch:k', { users: [...users, 'tabs'] });
  await waitFor(() => [obsA, obsB].every(({ presence }) => refsOf(presence).length === 9)
    && keys(watcher.presence).length === 8, graceMs + 3000, 'everyone seen on a and b, watched on c');
  const before = refsOf(obsA.presence);
  const seenA = record(obsA);
  const seenB = record(obsB);
  const watched = record(watcher);

  const killed = Date.now();
  doomed.proc.kill('SIGKILL');
  await doomed.exited;
  running.delete(doomed);
  // One is back on a before anyone has found kd dead: a twin of its presence, held back.
  const early = await join(open(a, 'early'), 'room:k', { meta: { at: 'early' } });
  assert.ok(Date.now() - killed < TIMEOUT, 'before the node timeout');
  // Declared down after the node timeout: held, not left.
  await sleep(TIMEOUT + 2 * HEARTBEAT);
  assert.deepEqual([...seenA, ...seenB], [], 'nothing seen when kd is found dead');
  // Its clients come back, to b and to c.
  const back = await Promise.all([
    ...['u1', 'u2', 'u3'].map((u) => join(open(b, u), 'room:k', { meta: { at: u } })),
    ...['u4', 'u5'].map((u) => join(open(c, u), 'room:k', { meta: { at: u } })),
    join(open(b, 'tabs'), 'room:k', { meta: { same: true } }),
    join(open(c, 'tabs'), 'room:k', { meta: { same: true } }),
  ]);
  back.push(early);
  await waitFor(() => back.every(({ presence }) => refsOf(presence).length === 9), 3000,
    () => `their states: ${JSON.stringify(back.map(({ presence }) => refsOf(presence)))} vs ${JSON.stringify(before)}; a: ${JSON.stringify(refsOf(obsA.presence))}`);
  await sleep(500);
  assert.deepEqual([...seenA, ...seenB], [], 'no diff for any takeover');
  for (const { presence } of [...back, obsB]) assert.deepEqual(refsOf(presence), before, 'the same refs everywhere');
  assert.equal(metasOf(obsA.presence, 'tabs').length, 2, 'both tabs kept');
  const took = Date.now() - killed;
  assert.ok(took < TIMEOUT + graceMs - 500, `all back within the grace (${took} ms)`);

  // 'gone' never comes back: one leave per observer, after node timeout + grace.
  await waitFor(() => [obsA, obsB].every(({ presence }) => !keys(presence).includes('gone')),
    TIMEOUT + graceMs + 3000, 'gone leaves at the grace');
  const left = Date.now() - killed;
  // Silence counts from the node's last heartbeat, which came up to one interval before the kill.
  assert.ok(left >= graceMs + TIMEOUT - HEARTBEAT - 50, `not before timeout + grace (${left} ms)`);
  await sleep(300);
  assert.equal(seenA.length, 1, JSON.stringify(seenA));
  assert.equal(seenB.length, 1, JSON.stringify(seenB));
  for (const d of [...seenA, ...seenB]) {
    assert.deepEqual(Object.keys(d.leaves), ['gone']);
    assert.deepEqual(d.joins, {});
  }
  const offline = watched.flatMap((d) => Object.keys(d.leaves).filter((k) => !(k in d.joins)));
  assert.deepEqual(offline, ['gone'], JSON.stringify(watched));
  // Taken over on b: b's now. A leave there is seen at once, everywhere.
  back[0].channel.leave();
  await waitFor(() => [obsA, obsB].every(({ presence }) => !keys(presence).includes('u1')), TIMEOUT, 'u1 gone at once');
});
