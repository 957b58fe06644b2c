// The single-node features that must hold across nodes too, with the real phoenix client and a
// real nats-server: coalescing of other nodes' joins, leave grace (a quick reconnect is invisible on other nodes, a client gone
// for good leaves there when the grace ends), slow-consumer resync of a client fed by another
// node's changes, topic grants and meta claims of a token on any node; and a partition between
// one node and NATS (through a TCP proxy that cuts it off) that heals.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import WebSocket from 'ws';
import { startNats, startNode, Socket, join, keys, waitFor, sleep, sign, tcpProxy, stallThroughFlood } from './harness.mjs';

const HEARTBEAT = 200;
const TIMEOUT = 1000;
const SECRET = 'cluster features test secret, at least 32 bytes';
const secretFile = path.join(tmpdir(), `roster-cluster-secret-${process.pid}`);
const args = [
  '--node-heartbeat-ms', String(HEARTBEAT), '--node-timeout-ms', String(TIMEOUT),
  // Topics of 10 members and more coalesce their diffs (the other tests' topics are smaller).
  '--large-topic-threshold', '10', '--diff-window-ms', '100',
  '--leave-grace-ms', '1000', '--secret-file', secretFile,
  // The flooder sends hundreds of large updates a second.
  '--max-outbound-bytes', '65536', '--max-meta-bytes', '40000', '--max-msgs-per-sec', '0',
];

let nats;
let proxy;
const nodes = {};
const sockets = [];
before(async () => {
  writeFileSync(secretFile, `${SECRET}\n`);
  nats = await startNats();
  proxy = await tcpProxy(nats.port);
  nodes.a = await startNode(nats, 'a', args);
  nodes.b = await startNode(nats, 'b', args);
  // c reaches NATS through the proxy, which can cut it off.
  nodes.c = await startNode({ url: `nats://127.0.0.1:${proxy.port}` }, 'c', args);
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const n of Object.values(nodes)) {
    const { code } = await n.stop();
    assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${n.log()}`);
  }
  await proxy.close();
  await nats.stop();
  rmSync(secretFile, { force: true });
});

/** A phoenix.js socket to `node` with a token for `sub` (and any other claims). */
function open(node, sub, claims = {}) {
  const exp = Math.floor(Date.now() / 1000) + 600;
  const socket = new Socket(node.url, {
    transport: WebSocket,
    params: { token: sign({ sub, exp, ...claims }, { secret: SECRET }) },
    reconnectAfterMs: () => 60_000,
    rejoinAfterMs: () => 60_000,
  });
  socket.connect();
  sockets.push(socket);
  return socket;
}

const metasOf = (presence, key) => presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean) || [];
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

test('a large topic coalesces a join storm on other nodes into few diffs, and every view converges', async () => {
  const first = await join(open(nodes.b, 'first'), 'room:big');
  let diffs = 0;
  first.channel.on('presence_diff', () => { diffs += 1; });
  const n = 80;
  const all = await Promise.all(Array.from({ length: n }, (_, i) => join(open(i % 2 ? nodes.a : nodes.c, `u${i}`), 'room:big', { meta: { i } })));
  const everyone = [first, ...all];
  await waitFor(() => everyone.every(({ presence }) => keys(presence).length === n + 1), 10_000,
    () => `every view to hold ${n + 1} keys; sizes ${everyone.map(({ presence }) => keys(presence).length)}`);
  assert.ok(diffs < n / 2, `${diffs} diffs for ${n} joins`);
});

test('leave grace: a quick reconnect to its node is invisible on the others; gone for good leaves at the grace', async () => {
  const observer = await join(open(nodes.b, 'observer'), 'room:grace');
  let alice = open(nodes.a, 'alice');
  await join(alice, 'room:grace', { meta: { status: 'online' } });
  await waitFor(() => keys(observer.presence).includes('alice'), 3000, 'b sees alice');
  const ref = metasOf(observer.presence, 'alice')[0].phx_ref;
  const diffs = [];
  observer.channel.on('presence_diff', (d) => diffs.push(d));

  alice.disconnect();
  await sleep(100);
  alice = open(nodes.a, 'alice');
  const back = await join(alice, 'room:grace', { meta: { status: 'online' } });
  await waitFor(() => keys(back.presence).includes('alice'), 3000, 'her own state');
  assert.equal(metasOf(back.presence, 'alice')[0].phx_ref, ref, 'she took her presence over');
  await sleep(1500); // past the grace
  assert.deepEqual(diffs, [], 'nobody on b saw her go or come');

  const bob = open(nodes.a, 'bob');
  await join(bob, 'room:grace');
  await waitFor(() => keys(observer.presence).includes('bob'), 3000, 'b sees bob');
  const gone = Date.now();
  bob.disconnect();
  await sleep(500);
  assert.ok(keys(observer.presence).includes('bob'), 'held during the grace');
  await waitFor(() => !keys(observer.presence).includes('bob'), 3000, 'bob gone on b after the grace');
  assert.ok(Date.now() - gone >= 1000, 'not before the grace ended');
});

test('a client fed by another node\'s changes that stops reading ends with a correct view', async () => {
  const slowSocket = open(nodes.b, 'slow');
  const slow = await join(slowSocket, 'room:lag');
  const flooder = await join(open(nodes.a, 'flooder'), 'room:lag', { presence: 'none', meta: { n: 0 } });
  await waitFor(() => keys(slow.presence).includes('flooder'), 3000, 'b sees the flooder');
  // One update in flight at a time: node a publishes one delta per topic per batch, with the
  // net change, so 40 in flight could be a handful of deltas that the kernel's buffers absorb
  // whole (no resync: 1 run in 5 here).
  const { states } = await stallThroughFlood(slowSocket, slow, flooder, 'flooder', 640, 1);
  assert.ok(states >= 1, 'a fresh presence_state replaced the dropped diffs');
  assert.equal(slowSocket.isConnected(), true, 'resynced, not closed');
});

test('a token\'s topic grants and meta claims hold on its node and show on the others', async () => {
  const socket = open(nodes.b, 'cat', { topics: ['room:*'], meta: { role: 'guest' } });
  await assert.rejects(join(socket, 'admin:panel'), /unauthorized/);
  const observer = await join(open(nodes.a, 'owl'), 'room:claims');
  const cat = await join(socket, 'room:claims', { meta: { role: 'admin', page: '/a' } });
  await waitFor(() => keys(observer.presence).includes('cat') && keys(cat.presence).includes('owl'), 3000, 'both see both');
  assert.deepEqual(metasOf(observer.presence, 'cat').map((m) => [m.role, m.page]), [['guest', '/a']]);
});

test('a node cut off from NATS past the node timeout: the others see its presences leave and come back; it sees nothing', async () => {
  const here = await join(open(nodes.a, 'here'), 'room:cut');
  const there = await join(open(nodes.c, 'there'), 'room:cut');
  await waitFor(() => [here, there].every(({ presence }) => keys(presence).length === 2), 3000, 'both see both');
  const ref = metasOf(here.presence, 'there')[0].phx_ref;
  const seenOnC = [];
  there.channel.on('presence_diff', (d) => seenOnC.push(d));
  proxy.cut();
  await waitFor(() => !keys(here.presence).includes('there'), TIMEOUT + HEARTBEAT + 2000, 'a sees c\'s presence leave');
  // A change on a while c is cut off reaches c after the heal.
  await join(open(nodes.a, 'meanwhile'), 'room:cut');
  await sleep(500);
  assert.deepEqual(seenOnC, [], 'c keeps a\'s presences for its isolation grace');
  proxy.heal();
  await waitFor(() => keys(here.presence).includes('there'), 8000, 'a sees c\'s presence again once the partition heals');
  assert.equal(metasOf(here.presence, 'there')[0].phx_ref, ref, 'the same presence');
  await waitFor(() => same(keys(there.presence), ['here', 'meanwhile', 'there']), 5000,
    () => `c sees what changed meanwhile: ${keys(there.presence)}`);
  assert.equal(seenOnC.length, 1, `c saw one diff, the join made meanwhile: ${JSON.stringify(seenOnC)}`);
});
