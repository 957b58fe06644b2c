// Topic presence with the real phoenix.js client against roster running 4 shards.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, connect, join, push, keys, raw, waitFor, sleep } from './harness.mjs';

let server;
const sockets = [];
before(async () => {
  server = await startServer(['--count-interval-ms', '200']);
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  const { code } = await server.stop();
  assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${server.log()}`);
});

function open(user, opts) {
  const s = connect(server, user, opts);
  sockets.push(s);
  return s;
}

test('many clients joining one topic all converge to the full membership', async () => {
  const n = 40;
  const joined = await Promise.all(
    Array.from({ length: n }, (_, i) => join(open(`user${i}`), 'room:converge', { meta: { i } })),
  );
  // One user on two devices: one key, two metas.
  const tabA = await join(open('multi'), 'room:converge', { meta: { device: 'phone' } });
  const tabB = await join(open('multi'), 'room:converge', { meta: { device: 'web' } });
  const all = [...joined, tabA, tabB];
  const want = [...Array.from({ length: n }, (_, i) => `user${i}`), 'multi'].sort();
  const metaCount = (presence) => presence.list((_, p) => p.metas.length).reduce((a, b) => a + b, 0);
  await waitFor(() => all.every(({ presence }) => metaCount(presence) === n + 2), 5000,
    () => `every view to hold ${n + 2} metas; sizes ${all.map(({ presence }) => metaCount(presence))}`);
  for (const { presence } of all) {
    assert.deepEqual(keys(presence), want);
    const multi = presence.list((k, p) => (k === 'multi' ? p.metas.map((m) => m.device).sort() : null)).filter(Boolean);
    assert.deepEqual(multi, [['phone', 'web']]);
    for (const metas of presence.list((_, p) => p.metas)) {
      for (const m of metas) assert.match(m.phx_ref, /^[A-Za-z0-9_-]{11}$/);
    }
  }
});

test('presence_update arrives as one diff: leave of the old meta, join of the new with phx_ref_prev', async () => {
  const watcher = await join(open('watcher'), 'room:update');
  const mover = await join(open('mover'), 'room:update', { meta: { page: '/a' } });
  await waitFor(() => keys(watcher.presence).includes('mover'), 3000, 'mover in the view');
  const oldRef = watcher.presence.list((k, p) => (k === 'mover' ? p.metas[0].phx_ref : null)).find(Boolean);
  const diffs = [];
  watcher.channel.on('presence_diff', (d) => diffs.push(d));
  assert.equal((await push(mover.channel, 'presence_update', { meta: { page: '/b' } })).status, 'ok');
  await waitFor(() => diffs.length > 0, 3000, 'the update diff');
  const [diff] = diffs;
  assert.deepEqual(Object.keys(diff.leaves), ['mover']);
  assert.deepEqual(Object.keys(diff.joins), ['mover']);
  assert.equal(diff.leaves.mover.metas[0].phx_ref, oldRef);
  assert.equal(diff.leaves.mover.metas[0].page, '/a');
  assert.equal(diff.joins.mover.metas[0].phx_ref_prev, oldRef);
  assert.equal(diff.joins.mover.metas[0].page, '/b');
  assert.notEqual(diff.joins.mover.metas[0].phx_ref, oldRef);
  const metas = watcher.presence.list((k, p) => (k === 'mover' ? p.metas : null)).find(Boolean);
  assert.deepEqual(metas.map((m) => m.page), ['/b']);
});

test('phx_leave and closing the socket remove presences; other topics are untouched', async () => {
  const watcher = await join(open('w2'), 'room:leave');
  const leaverSocket = open('leaver');
  const leaver = await join(leaverSocket, 'room:leave');
  const other = await join(leaverSocket, 'room:other');
  const closerSocket = open('closer');
  await join(closerSocket, 'room:leave');
  await waitFor(() => keys(watcher.presence).length === 3, 3000, 'three present');
  await new Promise((resolve) => leaver.channel.leave().receive('ok', resolve));
  await waitFor(() => !keys(watcher.presence).includes('leaver'), 3000, 'leaver gone');
  assert.deepEqual(keys(other.presence), ['leaver'], 'its other topic still tracks it');
  closerSocket.disconnect();
  await waitFor(() => !keys(watcher.presence).includes('closer'), 3000, 'closer gone');
  assert.deepEqual(keys(watcher.presence), ['w2']);
});

test('heartbeats are answered', async () => {
  const c = await raw(server);
  const reply = await c.call(null, 'phoenix', 'heartbeat', {});
  assert.deepEqual(reply[4], { status: 'ok', response: {} });
  c.close();
});

test('count mode gets presence_count on join and throttled updates, never state or diffs', async () => {
  const c = await raw(server);
  await c.call('1', 'room:count', 'phx_join', { track: false, presence: 'count' });
  const first = await c.next((f) => f[3] === 'presence_count', 'initial count');
  assert.deepEqual(first, ['1', null, 'room:count', 'presence_count', { keys: 0, metas: 0 }]);
  await join(open('c1'), 'room:count');
  await join(open('c2'), 'room:count');
  await join(open('c2'), 'room:count');
  await waitFor(() => c.frames.some((f) => f[3] === 'presence_count' && f[4].metas === 3), 3000, () => `count 2 keys/3 metas: ${JSON.stringify(c.frames)}`);
  const last = c.frames.filter((f) => f[3] === 'presence_count').pop();
  assert.deepEqual(last[4], { keys: 2, metas: 3 });
  assert.ok(!c.frames.some((f) => f[3] === 'presence_state' || f[3] === 'presence_diff'), JSON.stringify(c.frames));
  c.close();
});

test('none mode is tracked but receives no presence events', async () => {
  const watcher = await join(open('w-none'), 'room:none');
  const c = await raw(server, 'vsn=2.0.0&user_id=silent');
  await c.call('1', 'room:none', 'phx_join', { presence: 'none', meta: { quiet: true } });
  await waitFor(() => keys(watcher.presence).includes('silent'), 3000, 'silent tracked');
  await join(open('someone'), 'room:none');
  await sleep(200);
  assert.ok(!c.frames.some((f) => f[3].startsWith('presence_')), JSON.stringify(c.frames));
  c.close();
  await waitFor(() => !keys(watcher.presence).includes('silent'), 3000, 'silent gone after close');
});

test('phoenix.js 1.8 authToken travels in Sec-WebSocket-Protocol and the phoenix subprotocol is selected', async () => {
  const s = open(undefined, { authToken: 'not-checked-in-development-mode' });
  const { presence } = await join(s, 'room:token');
  await waitFor(() => keys(presence).length === 1, 3000, 'own presence');
  assert.equal(s.conn.protocol, 'phoenix');
});
