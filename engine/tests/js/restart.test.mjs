// A restart that keeps presence (--state-file), with the real phoenix.js client: a graceful stop
// writes the node's presences, the next start takes them back as held presences, and clients
// that come back with an equal meta keep their phx_ref without anyone seeing them go.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startServer, connect, join, keys, waitFor, sleep, freePort, api,
} from './harness.mjs';

const sockets = [];
const running = new Set();
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const server of running) await server.stop();
});

function open(server, user) {
  const s = connect(server, user);
  sockets.push(s);
  return s;
}

async function start(args, opts) {
  const server = await startServer(args, opts);
  running.add(server);
  return server;
}

async function stop(server) {
  running.delete(server);
  const { code } = await server.stop();
  assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${server.log()}`);
}

const refOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas[0].phx_ref : null)).find(Boolean);
const metaOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas[0] : null)).find(Boolean);

/** A node with a state file, three members in room:r, stopped: the file and their refs. */
async function runAndStop(dir, grace) {
  const file = path.join(dir, 'state.bin');
  const args = ['--state-file', file, '--restart-grace-ms', String(grace)];
  const first = await start(args);
  const members = {};
  for (const [key, meta] of [['alice', { s: 'online' }], ['bob', { s: 'online' }], ['carol', { s: 'online' }]]) {
    const socket = open(first, key);
    members[key] = { socket, ...(await join(socket, 'room:r', { meta })) };
  }
  const view = members.alice.presence;
  await waitFor(() => keys(view).length === 3, 3000, 'all three in');
  const refs = Object.fromEntries(['alice', 'bob', 'carol'].map((k) => [k, refOf(view, k)]));
  // The node stops under its connected clients, as a deploy does. The file is written after
  // the signal, so its grace ends no earlier than `stoppingAt + grace`.
  const stoppingAt = Date.now();
  await stop(first);
  Object.values(members).forEach((m) => m.socket.disconnect());
  assert.ok(existsSync(file), 'the stop wrote the state file');
  return { file, args, port: first.port, refs, stoppingAt };
}

test('a restart with a state file: same phx_refs, nothing seen, a changed meta one update, the unclaimed leave at the grace', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'roster-restart-'));
  const grace = 3000;
  const { file, args, port, refs, stoppingAt } = await runAndStop(dir, grace);
  const server = await start(args, { port });
  assert.ok(!existsSync(file), 'a file taken back is removed');
  // A client of the new process sees everyone of the old one, with their refs.
  const observer = await join(open(server, 'observer'), 'room:r', { track: false });
  await waitFor(() => keys(observer.presence).length === 3, 3000, 'the held presences in its state');
  for (const k of ['alice', 'bob', 'carol']) assert.equal(refOf(observer.presence, k), refs[k], k);
  const diffs = [];
  observer.channel.on('presence_diff', (d) => diffs.push(d));

  // alice is back with the same meta: she has her presence, nobody saw anything.
  const alice = await join(open(server, 'alice'), 'room:r', { meta: { s: 'online' } });
  await waitFor(() => keys(alice.presence).length === 3, 3000, 'her state');
  assert.equal(refOf(alice.presence, 'alice'), refs.alice);
  // bob is back busy: one update diff.
  await join(open(server, 'bob'), 'room:r', { meta: { s: 'busy' } });
  await waitFor(() => diffs.length > 0, 3000, 'the update');
  await sleep(200);
  assert.equal(diffs.length, 1, JSON.stringify(diffs));
  assert.equal(diffs[0].leaves.bob.metas[0].phx_ref, refs.bob);
  assert.equal(diffs[0].joins.bob.metas[0].phx_ref_prev, refs.bob);
  assert.equal(metaOf(observer.presence, 'bob').s, 'busy');
  // carol never comes back: held until the grace (counted from the stop), then one leave.
  assert.ok(Date.now() - stoppingAt < grace - 500, 'still within the grace');
  assert.ok(keys(observer.presence).includes('carol'), 'held during the grace');
  await waitFor(() => !keys(observer.presence).includes('carol'), grace + 2000, 'carol gone after the grace');
  // (10 ms for the millisecond roundings between this clock and the server's.)
  assert.ok(Date.now() - stoppingAt >= grace - 10, `not before the grace (${Date.now() - stoppingAt} ms)`);
  assert.equal(diffs.length, 2, JSON.stringify(diffs));
  assert.deepEqual(Object.keys(diffs[1].leaves), ['carol']);
  assert.deepEqual(diffs[1].joins, {});
  assert.deepEqual(keys(observer.presence).sort(), ['alice', 'bob'], 'alice kept hers');
});

test('server-side presences come back after a restart as they were: not held, their TTLs running on', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'roster-restart-'));
  const file = path.join(dir, 'state.bin');
  const KEY = 'restart-api-key';
  const adminPort = await freePort();
  // Margins for a slow machine: the restart must come within the grace (or the file is stale),
  // and the check past the grace must come before the TTL.
  const grace = 2000;
  const args = [
    '--state-file', file, '--restart-grace-ms', String(grace),
    '--admin-listen', `127.0.0.1:${adminPort}`, '--api-key', KEY,
  ];
  const call = (method, p, body) => api(`http://127.0.0.1:${adminPort}`, method, p, body, KEY);
  const first = await start(args);
  const ttl = 5000;
  const putAt = Date.now();
  assert.equal((await call('PUT', '/api/topics/room:s/presences/bot', { meta: { kind: 'bot' } })).status, 202);
  assert.equal((await call('PUT', '/api/topics/room:s/presences/timer', { meta: { t: 1 }, ttl_ms: ttl })).status, 202);
  const firstSocket = open(first, 'observer');
  const before = await join(firstSocket, 'room:s', { track: false });
  await waitFor(() => keys(before.presence).length === 2, 3000, 'both shown');
  const refs = { bot: refOf(before.presence, 'bot'), timer: refOf(before.presence, 'timer') };
  await stop(first);
  firstSocket.disconnect();

  const server = await start(args, { port: first.port });
  const observer = await join(open(server, 'observer'), 'room:s', { track: false });
  await waitFor(() => keys(observer.presence).length === 2, 3000, 'both back');
  assert.deepEqual(refs, { bot: refOf(observer.presence, 'bot'), timer: refOf(observer.presence, 'timer') });
  assert.equal(metaOf(observer.presence, 'bot').kind, 'bot');
  const diffs = [];
  observer.channel.on('presence_diff', (d) => diffs.push(d));
  // Past the restart grace: a held presence would have left by now; these are nobody's to claim.
  await waitFor(() => Date.now() - putAt > grace + 500, grace + 2000, 'past the grace');
  assert.deepEqual(keys(observer.presence).sort(), ['bot', 'timer'], JSON.stringify(diffs));
  // The TTL counts from the PUT, over the restart.
  await waitFor(() => !keys(observer.presence).includes('timer'), ttl + 3000, 'timer gone at its TTL');
  assert.ok(Date.now() - putAt >= ttl - 10, `not before its TTL (${Date.now() - putAt} ms)`);
  // The backend still removes the other one.
  assert.equal((await call('DELETE', '/api/topics/room:s/presences/bot')).status, 202);
  await waitFor(() => keys(observer.presence).length === 0, 2000, 'bot removed');
  assert.deepEqual(diffs.map((d) => [Object.keys(d.joins), Object.keys(d.leaves)]), [[[], ['timer']], [[], ['bot']]]);
});

test('every bad state file is logged with its reason and ignored: the node starts empty', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'roster-restart-'));
  const { file, args, port } = await runAndStop(dir, 30_000);
  const good = readFileSync(file);
  const flipped = Buffer.from(good);
  flipped[flipped.length - 3] ^= 0x40;
  const otherVersion = Buffer.from(good);
  otherVersion[4] = 9;
  const cases = [
    ['truncated', good.subarray(0, 20), /truncated/],
    ['corrupt', flipped, /corrupt/],
    ['other version', otherVersion, /format version 9/],
    ['not a state file', Buffer.from('{"presences":[]}'), /not a roster state file/],
  ];
  for (const [what, bytes, reason] of cases) {
    writeFileSync(file, bytes);
    const server = await start(args, { port });
    const observer = await join(open(server, 'observer'), 'room:r', { track: false });
    await sleep(100);
    assert.deepEqual(keys(observer.presence), [], `${what}: started empty`);
    assert.match(server.log(), /state file ignored/, what);
    assert.match(server.log(), reason, what);
    await stop(server);
  }
  // Stale: older than the grace.
  writeFileSync(file, good);
  await sleep(400);
  const stale = await start(['--state-file', file, '--restart-grace-ms', '300'], { port });
  const observer = await join(open(stale, 'observer'), 'room:r', { track: false });
  await sleep(100);
  assert.deepEqual(keys(observer.presence), [], 'stale: started empty');
  assert.match(stale.log(), /stale: written \d+ ms ago, past the restart grace of 300 ms/);
  await stop(stale);
  // Missing: nothing to say at warn level, and nothing held.
  const fresh = await start(['--state-file', path.join(dir, 'none.bin')], { port });
  const empty = await join(open(fresh, 'observer'), 'room:r', { track: false });
  await sleep(100);
  assert.deepEqual(keys(empty.presence), []);
  await stop(fresh);
});
