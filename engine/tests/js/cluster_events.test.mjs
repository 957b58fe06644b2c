// Presence events across a cluster on a real nats-server: each presence reported by its own
// node, a user online once for the cluster with two tabs on two nodes, a killed node's
// presences (and its users' offline) reported by one survivor, and the events on NATS too.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNats, startNode, startReceiver, natsSubscribe, connect, join, keys, waitFor, sleep, api,
} from './harness.mjs';

const running = [];
after(async () => {
  for (const r of running.reverse()) await r.stop();
});

async function cluster(names, rx, args = []) {
  // Stopped last (the list is stopped from its end): nodes deliver what they hold on the way out.
  running.push(rx);
  const nats = await startNats();
  running.push(nats);
  const prefix = `ev${Math.floor(Math.random() * 1e9)}`;
  const nodes = {};
  for (const name of names) {
    nodes[name] = await startNode(nats, name, [
      '--nats-prefix', prefix, '--webhook-url', rx.url, '--webhook-batch-ms', '10', ...args,
    ]);
    running.push(nodes[name]);
  }
  return { nats, nodes, prefix };
}

const ofKey = (rx, key, type) => rx.unique().filter((e) => e.key === key && (!type || e.type === type));

test('two tabs on two nodes: one user_online, one user_offline, each presence from its node', async () => {
  const rx = await startReceiver();
  const { nodes } = await cluster(['a', 'b'], rx);
  const tab1 = connect(nodes.a, 'alice');
  await join(tab1, 'room:x');
  await waitFor(() => ofKey(rx, 'alice', 'user_online').length === 1, 5000, 'alice online');
  const tab2 = connect(nodes.b, 'alice');
  await join(tab2, 'room:y');
  await waitFor(() => ofKey(rx, 'alice', 'presence_join').length === 2, 5000, 'the second tab\'s join');
  tab1.disconnect();
  await waitFor(() => ofKey(rx, 'alice', 'presence_leave').length === 1, 5000, 'the first tab\'s leave');
  await sleep(300);
  assert.equal(ofKey(rx, 'alice', 'user_offline').length, 0, 'still online: the other tab is');
  tab2.disconnect();
  await waitFor(() => ofKey(rx, 'alice', 'user_offline').length === 1, 5000, 'alice offline');
  await sleep(300);
  const by = (type) => ofKey(rx, 'alice', type).map((e) => `${e.node}:${e.topic}`);
  assert.deepEqual(by('presence_join'), ['a:room:x', 'b:room:y']);
  assert.deepEqual(by('presence_leave'), ['a:room:x', 'b:room:y']);
  assert.deepEqual(by('user_online'), ['a:room:x']);
  assert.deepEqual(by('user_offline'), ['b:room:y']);
  assert.equal(rx.taken().length, rx.unique().length, 'nothing reported twice');
});

test('a killed node\'s presences are reported once, by one survivor, with its users offline', async () => {
  const rx = await startReceiver();
  const { nodes } = await cluster(['a', 'b', 'c'], rx, ['--node-timeout-ms', '1000', '--node-heartbeat-ms', '200']);
  const sockets = [];
  for (const [node, key] of [['a', 'ann'], ['b', 'ben'], ['c', 'cat'], ['c', 'cid']]) {
    const s = connect(nodes[node], key);
    sockets.push(s);
    await join(s, 'room:z');
  }
  // cid is in a topic no survivor has a presence in; a has a subscriber there.
  const lonely = connect(nodes.c, 'cid');
  await join(lonely, 'room:lonely');
  const watcher = connect(nodes.a, 'obs');
  await join(watcher, 'room:lonely', { track: false });
  await waitFor(() => ofKey(rx, 'cid', 'presence_join').length === 2, 5000, 'every join');
  nodes.c.proc.kill('SIGKILL');
  await waitFor(() => ofKey(rx, 'cat', 'user_offline').length === 1 && ofKey(rx, 'cid', 'user_offline').length === 1,
    8000, () => `the dead node's users offline: ${JSON.stringify(rx.unique().filter((e) => e.time > 0).slice(-8))}`);
  await sleep(1000);
  for (const key of ['cat', 'cid']) {
    const leaves = ofKey(rx, key, 'presence_leave');
    assert.equal(leaves.length, key === 'cat' ? 1 : 2, `${key}: ${JSON.stringify(leaves)}`);
    for (const l of leaves) {
      assert.equal(l.reason, 'node_down');
      assert.equal(l.node, 'c', 'the presence is the dead node\'s');
    }
    assert.equal(ofKey(rx, key, 'user_offline').length, 1);
  }
  const reported = rx.taken().filter((e) => e.type === 'presence_leave' && e.key === 'cat');
  assert.equal(reported.length, 1, `one survivor reported it: ${JSON.stringify(reported)}`);
  for (const s of [...sockets, lonely, watcher]) s.disconnect();
});

test('--nats-events publishes every event on PREFIX.events.TYPE', async () => {
  const rx = await startReceiver();
  const { nats, nodes, prefix } = await cluster(['a'], rx, ['--nats-events']);
  const sub = await natsSubscribe(nats, `${prefix}.events.>`);
  const s = connect(nodes.a, 'dan');
  await join(s, 'room:n');
  s.disconnect();
  await waitFor(() => sub.msgs.length >= 4, 5000, () => `4 events on NATS: ${JSON.stringify(sub.msgs)}`);
  const types = sub.msgs.map((m) => m.subject.split('.').at(-1)).sort();
  assert.deepEqual(types, ['presence_join', 'presence_leave', 'user_offline', 'user_online']);
  for (const m of sub.msgs) {
    const e = JSON.parse(m.data);
    assert.equal(m.subject, `${prefix}.events.${e.type}`);
    assert.equal(e.key, 'dan');
  }
  await waitFor(() => ofKey(rx, 'dan').length === 4, 5000, 'and the same on the webhook');
  const ids = (list) => list.map((e) => e.id).sort();
  assert.deepEqual(ids(sub.msgs.map((m) => JSON.parse(m.data))), ids(ofKey(rx, 'dan')));
  sub.close();
});

test('the admin API of any node disconnects a user of another and puts presences everyone sees', async () => {
  const rx = await startReceiver();
  const { nodes } = await cluster(['a', 'b'], rx);
  const call = (node, method, path, body) => api(nodes[node].admin, method, path, body, null);
  const alice = connect(nodes.b, 'alice');
  await join(alice, 'room:q');
  const carol = connect(nodes.a, 'carol');
  const onA = await join(carol, 'room:q');
  const viewer = connect(nodes.b, 'viewer');
  const onB = await join(viewer, 'room:q');
  await waitFor(() => keys(onA.presence).join() === 'alice,carol,viewer', 3000, () => `a sees all: ${keys(onA.presence)}`);
  const gone = new Promise((resolve) => alice.onClose(resolve));
  assert.equal((await call('a', 'POST', '/api/users/alice/disconnect', { reason: 'bye' })).status, 202);
  const e = await gone;
  assert.deepEqual([e.code, e.reason], [4000, 'bye']);
  await waitFor(() => keys(onA.presence).join() === 'carol,viewer', 3000, 'alice gone on a');
  await waitFor(() => ofKey(rx, 'alice', 'presence_leave').length === 1, 3000, 'her leave reported');
  assert.equal(ofKey(rx, 'alice', 'presence_leave')[0].reason, 'disconnected');
  assert.equal(ofKey(rx, 'alice', 'presence_leave')[0].node, 'b', 'by her own node');

  const bot = (view) => view.presence.list((k, p) => (k === 'bot' ? p.metas.map((m) => m.v) : null)).find(Boolean);
  assert.equal((await call('a', 'PUT', '/api/topics/room:q/presences/bot', { meta: { v: 1 } })).status, 202);
  await waitFor(() => String(bot(onA)) === '1' && String(bot(onB)) === '1', 3000, () => `bot v1: ${bot(onA)} ${bot(onB)}`);
  // Put again from the other node: it moves there, one presence.
  assert.equal((await call('b', 'PUT', '/api/topics/room:q/presences/bot', { meta: { v: 2 } })).status, 202);
  await waitFor(() => String(bot(onA)) === '2' && String(bot(onB)) === '2', 3000, () => `bot v2: ${bot(onA)} ${bot(onB)}`);
  assert.equal((await call('a', 'DELETE', '/api/topics/room:q/presences/bot')).status, 202);
  await waitFor(() => !bot(onA) && !bot(onB), 3000, 'bot gone');
  for (const s of [alice, carol, viewer]) s.disconnect();
});
