// roster nodes sharing presence through a real nats-server, driven by the official phoenix
// client: clients on different nodes see each other as if on one server, a late node's first
// joiner gets every node's members, watch lists see users on any node, a killed node's
// presences leave on the others, a stopped node's at once, and a NATS restart within the
// isolation grace is invisible, and changes made while NATS was down reach everyone once it is
// back.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startNats, startNode, connect, join, push, keys, waitFor, sleep } from './harness.mjs';

// Short node timings keep the test quick; the bounds asserted below follow from them.
const HEARTBEAT = 200;
const TIMEOUT = 1000;
const timing = ['--node-heartbeat-ms', String(HEARTBEAT), '--node-timeout-ms', String(TIMEOUT), '--diff-window-ms', '0'];

let nats;
const nodes = {};
const sockets = [];
before(async () => {
  nats = await startNats();
  for (const name of ['a', 'b', 'c']) {
    nodes[name] = await startNode(nats, name, [...timing, '--count-interval-ms', '100']);
  }
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const n of Object.values(nodes)) {
    if (n.proc.exitCode === null && n.proc.signalCode === null) {
      const { code } = await n.stop();
      assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${n.log()}`);
    }
  }
  await nats.stop();
});

function open(node, user, opts) {
  const s = connect(node, user, opts);
  sockets.push(s);
  return s;
}

const refsOf = (presence) => presence.list((k, p) => p.metas.map((m) => `${k}:${m.phx_ref}`)).flat().sort();
const metasOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean) || [];

test('clients on three nodes see one topic, with the same phx_refs everywhere', async () => {
  const a = await join(open(nodes.a, 'ann'), 'room:one', { meta: { at: 'a' } });
  const b = await join(open(nodes.b, 'ben'), 'room:one', { meta: { at: 'b' } });
  const c = await join(open(nodes.c, 'cat'), 'room:one', { meta: { at: 'c' } });
  // One user on two nodes: one key, two metas.
  const a2 = await join(open(nodes.b, 'ann'), 'room:one', { meta: { at: 'b' } });
  const all = [a, b, c, a2];
  await waitFor(() => all.every(({ presence }) => refsOf(presence).length === 4), 5000,
    () => `four metas in every view: ${all.map(({ presence }) => refsOf(presence).length)}`);
  for (const { presence } of all) {
    assert.deepEqual(keys(presence), ['ann', 'ben', 'cat']);
    assert.deepEqual(refsOf(presence), refsOf(a.presence), 'the same refs on every node');
    assert.deepEqual(metasOf(presence, 'ann').map((m) => m.at).sort(), ['a', 'b']);
  }
});

test('a node holds only what its clients touch, and its metrics say what it holds and sends', async () => {
  // Shards publish their figures once a second: let the earlier tests' show first.
  await sleep(1200);
  const before = { a: await nodes.a.metric('roster_cluster_remote_presences'), c: await nodes.c.metric('roster_cluster_remote_presences') };
  const x = await join(open(nodes.a, 'here1'), 'room:elsewhere');
  const y = await join(open(nodes.b, 'here2'), 'room:elsewhere');
  await waitFor(() => [x, y].every(({ presence }) => keys(presence).length === 2), 3000, 'a and b see each other');
  await waitFor(async () => await nodes.a.metric('roster_cluster_remote_presences') === before.a + 1, 3000, 'a holds b\'s presence');
  await sleep(1100); // c's figures published since
  assert.equal(await nodes.c.metric('roster_cluster_remote_presences'), before.c, 'c has no client there and holds nothing of it');
  assert.equal(await nodes.a.metric('roster_cluster_nodes_up'), 2);
  for (const m of ['roster_cluster_messages_out_total', 'roster_cluster_bytes_in_total', 'roster_cluster_part_requests_total']) {
    assert.ok(await nodes.a.metric(m) > 0, m);
  }
  assert.equal(await nodes.a.metric('roster_cluster_bad_frames_total'), 0);
});

test('the admin API answers for the whole cluster from any node, holders or not', async () => {
  await join(open(nodes.a, 'api1'), 'room:api', { meta: { at: 'a' } });
  const { presence } = await join(open(nodes.b, 'api2'), 'room:api', { meta: { at: 'b' } });
  await join(open(nodes.b, 'api1'), 'room:api:2', { meta: { at: 'b' } });
  await waitFor(() => keys(presence).length === 2, 3000, 'b sees a');
  const get = async (node, path) => {
    const res = await fetch(`${node.admin}${path}`);
    assert.equal(res.status, 200, path);
    return res.json();
  };
  const refs = refsOf(presence);
  // a and b hold the topic; c holds nothing of it and looks the parts up.
  for (const node of [nodes.a, nodes.b, nodes.c]) {
    const t = await get(node, '/api/topics/room:api');
    assert.equal(t.keys, 2);
    assert.equal(t.metas, 2);
    assert.equal(t.partial, undefined);
    const got = Object.entries(t.presences).flatMap(([k, p]) => p.metas.map((m) => `${k}:${m.phx_ref}`)).sort();
    assert.deepEqual(got, refs, 'the same presences and refs as the clients see');
    const u = await get(node, '/api/users/api1');
    assert.equal(u.online, true);
    assert.deepEqual(u.presences.map((p) => `${p.topic}@${p.meta.at}`).sort(), ['room:api:2@b', 'room:api@a']);
  }
  const none = await get(nodes.c, '/api/topics/room:nobody');
  assert.deepEqual([none.keys, none.presences], [0, {}]);
  const nobody = await get(nodes.a, '/api/users/nobody');
  assert.deepEqual([nobody.online, nobody.presences], [false, []]);
});

test('a late node\'s first joiner gets every node\'s members in its presence_state', async () => {
  await join(open(nodes.a, 'p1'), 'room:late', { meta: { n: 1 } });
  await join(open(nodes.b, 'p2'), 'room:late', { meta: { n: 2 } });
  const b2 = await join(open(nodes.b, 'p3'), 'room:late');
  await waitFor(() => keys(b2.presence).length === 3, 3000, 'b sees both');
  // Nobody on c has touched room:late: the first joiner's state must still be complete.
  const states = [];
  const s = open(nodes.c, 'late');
  const channel = s.channel('room:late', {});
  channel.on('presence_state', (st) => states.push(st));
  await new Promise((resolve, reject) => channel.join().receive('ok', resolve).receive('error', reject));
  await waitFor(() => states.length > 0, 3000, 'the presence_state');
  assert.deepEqual(Object.keys(states[0]).sort(), ['late', 'p1', 'p2', 'p3']);
  assert.equal(states[0].p1.metas[0].n, 1);
});

test('an update on one node is one diff on another, with phx_ref_prev; a leave leaves', async () => {
  const watcher = await join(open(nodes.a, 'watcher'), 'room:upd');
  const mover = await join(open(nodes.b, 'mover'), 'room:upd', { meta: { page: '/a' } });
  await waitFor(() => keys(watcher.presence).includes('mover'), 3000, 'mover seen on a');
  const oldRef = metasOf(watcher.presence, 'mover')[0].phx_ref;
  const diffs = [];
  watcher.channel.on('presence_diff', (d) => diffs.push(d));
  assert.equal((await push(mover.channel, 'presence_update', { meta: { page: '/b' } })).status, 'ok');
  await waitFor(() => diffs.length > 0, 3000, 'the update diff');
  assert.deepEqual(Object.keys(diffs[0].leaves), ['mover']);
  assert.deepEqual(Object.keys(diffs[0].joins), ['mover']);
  assert.equal(diffs[0].leaves.mover.metas[0].phx_ref, oldRef);
  assert.equal(diffs[0].joins.mover.metas[0].phx_ref_prev, oldRef);
  assert.equal(diffs[0].joins.mover.metas[0].page, '/b');
  mover.channel.leave();
  await waitFor(() => !keys(watcher.presence).includes('mover'), 3000, 'mover gone on a');
});

test('count mode counts the whole cluster; track false watches without being seen', async () => {
  const counts = [];
  const s = open(nodes.c, 'counter');
  const ch = s.channel('room:count', { presence: 'count' });
  ch.on('presence_count', (c) => counts.push(c));
  await new Promise((resolve, reject) => ch.join().receive('ok', resolve).receive('error', reject));
  await join(open(nodes.a, 'k1'), 'room:count');
  await join(open(nodes.b, 'k2'), 'room:count');
  await join(open(nodes.b, 'k2'), 'room:count');
  const ghost = await join(open(nodes.a, 'ghost'), 'room:count', { track: false });
  await waitFor(() => counts.length && counts.at(-1).metas === 4, 3000,
    () => `a count of 4 metas (the counter, k1, k2 twice): ${JSON.stringify(counts)}`);
  assert.equal(counts.at(-1).keys, 3);
  await waitFor(() => keys(ghost.presence).length === 3, 3000, 'the ghost sees the others');
  assert.ok(!keys(ghost.presence).includes('ghost'));
});

test('watch lists see users on any node: state, comings and goings, an update, a late watcher', async () => {
  // wb is online on b before anyone watches.
  const wbSock = open(nodes.b, 'wb');
  const wb = await join(wbSock, 'room:w1', { meta: { status: 'away' } });
  // Settled: b has told the cluster (a first fetch of wb's parts takes a NATS round trip).
  await sleep(300);
  const w = await join(open(nodes.c, 'watcher'), 'watch:friends', { users: ['wa', 'wb'] });
  assert.deepEqual(keys(w.presence), ['wb'], 'the state holds who is online now, on another node');
  assert.deepEqual(metasOf(w.presence, 'wb').map((m) => [m.topic, m.status]), [['room:w1', 'away']]);
  // wa comes online on a, in two topics.
  const waSock = open(nodes.a, 'wa');
  const wa1 = await join(waSock, 'room:w1', { meta: { page: '/x' } });
  await join(waSock, 'room:w2');
  await waitFor(() => metasOf(w.presence, 'wa').length === 2, 3000, 'wa online in two topics');
  assert.deepEqual(metasOf(w.presence, 'wa').map((m) => m.topic).sort(), ['room:w1', 'room:w2']);
  // An update is seen; a watcher on a (wa's own node) agrees with the one on c.
  assert.equal((await push(wa1.channel, 'presence_update', { meta: { page: '/y' } })).status, 'ok');
  await waitFor(() => metasOf(w.presence, 'wa').some((m) => m.page === '/y'), 3000, 'the update');
  const w2 = await join(open(nodes.a, 'watcher2'), 'watch:more', { users: ['wa', 'wb', 'nobody'] });
  assert.deepEqual(keys(w2.presence), ['wa', 'wb'], 'a late watcher gets everyone in its state');
  const refs = (p) => p.list((k, x) => x.metas.map((m) => `${k}:${m.topic}:${m.phx_ref}`)).flat().sort();
  assert.deepEqual(refs(w2.presence), refs(w.presence), 'the same refs on both nodes');
  // wb goes offline: both watchers see it.
  wbSock.disconnect();
  await waitFor(() => [w, w2].every(({ presence }) => !keys(presence).includes('wb')), 3000, 'wb offline');
  waSock.disconnect();
  await waitFor(() => [w, w2].every(({ presence }) => keys(presence).length === 0), 3000, 'wa offline');
});

test('kill -9 of a node: its presences leave everywhere within timeout + heartbeat', async () => {
  const doomed = await startNode(nats, 'doomed', timing);
  await join(open(doomed, 'victim'), 'room:kill');
  const onA = await join(open(nodes.a, 'survivor'), 'room:kill');
  const onB = await join(open(nodes.b, 'survivor2'), 'room:kill');
  await waitFor(() => [onA, onB].every(({ presence }) => keys(presence).includes('victim')), 3000, 'victim seen');
  const friend = await join(open(nodes.c, 'friend'), 'watch:victim', { users: ['victim'] });
  await waitFor(() => keys(friend.presence).includes('victim'), 3000, 'victim watched from c');
  const killed = Date.now();
  doomed.proc.kill('SIGKILL');
  await doomed.exited;
  await waitFor(() => [onA, onB, friend].every(({ presence }) => !keys(presence).includes('victim')), 5000, 'victim gone');
  const took = Date.now() - killed;
  assert.ok(took <= TIMEOUT + HEARTBEAT + 500, `left after ${took} ms`);
  assert.deepEqual(keys(onA.presence), ['survivor', 'survivor2']);
});

test('SIGTERM: the stopping node\'s presences leave at once', async () => {
  const stopping = await startNode(nats, 'stopping', timing);
  await join(open(stopping, 'leaver'), 'room:term');
  const onA = await join(open(nodes.a, 'stayer'), 'room:term');
  await waitFor(() => keys(onA.presence).includes('leaver'), 3000, 'leaver seen');
  const t = Date.now();
  const { code } = await stopping.stop();
  assert.equal(code, 0, stopping.log());
  await waitFor(() => !keys(onA.presence).includes('leaver'), 3000, 'leaver gone');
  assert.ok(Date.now() - t < TIMEOUT, `left in ${Date.now() - t} ms, before any node timeout`);
});

test('a node refuses to start with the name of a live node', async () => {
  const clash = await startNode(nats, 'a', timing).then(
    (n) => { n.proc.kill('SIGKILL'); return null; },
    (e) => e,
  );
  assert.ok(clash, 'the second "a" must not start');
  assert.match(String(clash), /another live node is named "a"/);
});

test('a NATS restart within the isolation grace: nobody sees a leave or a join, and changes flow again', async () => {
  const x = await join(open(nodes.a, 'x'), 'room:nats');
  const y = await join(open(nodes.b, 'y'), 'room:nats');
  await waitFor(() => [x, y].every(({ presence }) => keys(presence).length === 2), 3000, 'both see both');
  const diffs = [];
  for (const { channel } of [x, y]) channel.on('presence_diff', (d) => diffs.push(d));
  await nats.restart();
  // Longer than the node timeout: had anyone counted the others as down, they would have left.
  await sleep(TIMEOUT * 2);
  assert.deepEqual(diffs, [], 'no diff across the restart');
  await join(open(nodes.c, 'z'), 'room:nats');
  await waitFor(() => [x, y].every(({ presence }) => keys(presence).includes('z')), 5000, 'z seen after the restart');
});

test('changes made while NATS is down reach the other nodes once it is back', async () => {
  const stay = await join(open(nodes.a, 'stay'), 'room:out');
  const goerSocket = open(nodes.b, 'goer');
  const goer = await join(goerSocket, 'room:out');
  await waitFor(() => [stay, goer].every(({ presence }) => keys(presence).length === 2), 3000, 'both see both');
  await nats.stop();
  await sleep(HEARTBEAT * 2);
  // b publishes goer's leave and c its first interest in the topic while NATS is down: both
  // are lost, and c's first fetch completes with nobody else's presences.
  goerSocket.disconnect();
  const late = await join(open(nodes.c, 'late'), 'room:out');
  assert.deepEqual(keys(late.presence), ['late']);
  await nats.start();
  const want = ['late', 'stay'];
  await waitFor(() => [stay, late].every(({ presence }) => JSON.stringify(keys(presence)) === JSON.stringify(want)), 8000,
    () => `a and c see ${want} once NATS is back: a ${keys(stay.presence)}, c ${keys(late.presence)}`);
});
