// Presence beyond Phoenix, with the real phoenix.js client: watch lists, large-topic coalescing,
// leave grace and slow consumers. Each feature gets its own server (4 shards) and settings.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, connect, join, push, keys, waitFor, sleep, stallThroughFlood } from './harness.mjs';

const servers = [];
const sockets = [];
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const server of servers) {
    const { code } = await server.stop();
    assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${server.log()}`);
  }
});

async function start(args) {
  const server = await startServer(args);
  servers.push(server);
  return server;
}

function open(server, user) {
  const s = connect(server, user);
  sockets.push(s);
  return s;
}

/** The metas phoenix.js Presence holds for `key`. */
function metasOf(presence, key) {
  return presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean) || [];
}

test('watch list: friends come online, move between topics and go offline, across shards', async () => {
  const server = await start(['--max-watch', '3']);
  // Ben is online before anyone watches him.
  const ben = await join(open(server, 'ben'), 'room:lobby', { meta: { status: 'away' } });
  const w = await join(open(server, 'watcher'), 'watch:friends', { users: ['ann', 'ben'] });
  assert.deepEqual(keys(w.presence), ['ben'], 'the state holds who is online now');
  assert.deepEqual(metasOf(w.presence, 'ben').map((m) => [m.topic, m.status]), [['room:lobby', 'away']]);
  const events = [];
  w.presence.onJoin((key, current, joined) => events.push(['join', key, current ? 'was-online' : 'came-online', joined.metas.map((m) => m.topic)]));
  w.presence.onLeave((key, current, left) => events.push(['leave', key, current.metas.length ? 'still-online' : 'went-offline', left.metas.map((m) => m.topic)]));

  // Ann comes online.
  const annSocket = open(server, 'ann');
  const lobby = await join(annSocket, 'room:lobby', { meta: { page: '/home' } });
  await waitFor(() => keys(w.presence).includes('ann'), 3000, 'ann online');
  assert.deepEqual(events, [['join', 'ann', 'came-online', ['room:lobby']]]);
  events.length = 0;

  // She updates where she is: one diff, she stays online.
  assert.equal((await push(lobby.channel, 'presence_update', { meta: { page: '/docs' } })).status, 'ok');
  await waitFor(() => metasOf(w.presence, 'ann').some((m) => m.page === '/docs'), 3000, 'the update');
  assert.equal(metasOf(w.presence, 'ann').length, 1);
  assert.ok(events.every((e) => e[2] !== 'went-offline'), JSON.stringify(events));
  events.length = 0;

  // She moves to another topic (join the new one, then leave the old one).
  const game = await join(annSocket, 'game:7', { meta: { page: '/table' } });
  await waitFor(() => metasOf(w.presence, 'ann').length === 2, 3000, 'ann in two topics');
  await new Promise((resolve) => lobby.channel.leave().receive('ok', resolve));
  await waitFor(() => metasOf(w.presence, 'ann').length === 1, 3000, 'ann left the lobby');
  assert.deepEqual(metasOf(w.presence, 'ann').map((m) => [m.topic, m.page]), [['game:7', '/table']]);
  assert.ok(events.every((e) => e[2] !== 'went-offline' && e[2] !== 'came-online'), JSON.stringify(events));
  events.length = 0;

  // She goes offline: her last presence leaves.
  annSocket.disconnect();
  await waitFor(() => !keys(w.presence).includes('ann'), 3000, 'ann offline');
  assert.deepEqual(events, [['leave', 'ann', 'went-offline', ['game:7']]]);
  void game;

  // The watch set changes: Cat (online) is added and arrives as a join; Ben is removed and
  // leaves; a fourth user is over --max-watch 3.
  await join(open(server, 'cat'), 'room:kitchen', { meta: {} });
  events.length = 0;
  assert.equal((await push(w.channel, 'watch_add', { users: ['cat'] })).status, 'ok');
  await waitFor(() => keys(w.presence).includes('cat'), 3000, 'cat added');
  assert.equal((await push(w.channel, 'watch_remove', { users: ['ben'] })).status, 'ok');
  await waitFor(() => !keys(w.presence).includes('ben'), 3000, 'ben removed');
  assert.deepEqual(events.map((e) => e.slice(0, 3)), [['join', 'cat', 'came-online'], ['leave', 'ben', 'went-offline']]);
  const over = await push(w.channel, 'watch_add', { users: ['dan', 'eve'] });
  assert.deepEqual(over, { status: 'error', response: { reason: 'too many users watched' } });
  // Ben himself is unaffected, and the watcher still gets changes for who it watches.
  assert.equal((await push(ben.channel, 'presence_update', { meta: { status: 'back' } })).status, 'ok');
  assert.equal((await push(w.channel, 'watch_add', { users: ['ben'] })).status, 'ok');
  await waitFor(() => metasOf(w.presence, 'ben').some((m) => m.status === 'back'), 3000, 'ben back with his new meta');
});

test('a large topic coalesces a join storm into few diffs and every view converges', async () => {
  const server = await start(['--large-topic-threshold', '10', '--diff-window-ms', '100']);
  const first = await join(open(server, 'first'), 'room:big');
  let diffs = 0;
  first.channel.on('presence_diff', () => { diffs += 1; });
  const n = 80;
  const all = await Promise.all(Array.from({ length: n }, (_, i) => join(open(server, `u${i}`), 'room:big', { meta: { i } })));
  const everyone = [first, ...all];
  await waitFor(() => everyone.every(({ presence }) => keys(presence).length === n + 1), 10_000,
    () => `every view to hold ${n + 1} keys; sizes ${everyone.map(({ presence }) => keys(presence).length)}`);
  // Without coalescing the first member would get one diff per join.
  assert.ok(diffs < n / 2, `${diffs} diffs for ${n} joins`);
});

test('leave grace: a quick reconnect is invisible to others, a changed meta is one update', async () => {
  const server = await start(['--leave-grace-ms', '1000']);
  const observer = await join(open(server, 'observer'), 'room:grace');
  const diffs = [];
  observer.channel.on('presence_diff', (d) => diffs.push(d));
  let first = open(server, 'alice');
  await join(first, 'room:grace', { meta: { status: 'online' } });
  await waitFor(() => keys(observer.presence).includes('alice'), 3000, 'alice in');
  const ref = metasOf(observer.presence, 'alice')[0].phx_ref;
  diffs.length = 0;

  // Dropped and back within the grace with the same meta: nothing is broadcast, same phx_ref.
  first.disconnect();
  await sleep(100);
  const second = open(server, 'alice');
  const back = await join(second, 'room:grace', { meta: { status: 'online' } });
  await waitFor(() => keys(back.presence).includes('alice'), 3000, 'her own state');
  assert.equal(metasOf(back.presence, 'alice')[0].phx_ref, ref, 'she took her presence over');
  await sleep(1500); // past the grace
  assert.deepEqual(diffs, [], 'nobody saw her go or come');
  assert.deepEqual(metasOf(observer.presence, 'alice').map((m) => m.phx_ref), [ref]);

  // Back with a different meta: one update diff.
  second.disconnect();
  await sleep(100);
  await join(open(server, 'alice'), 'room:grace', { meta: { status: 'busy' } });
  await waitFor(() => diffs.length > 0, 3000, 'the update diff');
  await sleep(200);
  assert.equal(diffs.length, 1, JSON.stringify(diffs));
  assert.equal(diffs[0].leaves.alice.metas[0].phx_ref, ref);
  assert.equal(diffs[0].joins.alice.metas[0].phx_ref_prev, ref);
  assert.deepEqual(metasOf(observer.presence, 'alice').map((m) => m.status), ['busy']);

  // Gone for good: the leave goes out when the grace ends, not before.
  first = open(server, 'bob');
  await join(first, 'room:grace', {});
  await waitFor(() => keys(observer.presence).includes('bob'), 3000, 'bob in');
  first.disconnect();
  await sleep(500);
  assert.ok(keys(observer.presence).includes('bob'), 'held during the grace');
  await waitFor(() => !keys(observer.presence).includes('bob'), 3000, 'bob gone after the grace');
});

test('a client that stops reading for a while ends with a correct view', async () => {
  // The flooder sends hundreds of updates a second: no message rate limit here.
  const server = await start(['--max-outbound-bytes', '65536', '--max-meta-bytes', '40000', '--max-msgs-per-sec', '0']);
  const slowSocket = open(server, 'slow');
  const slow = await join(slowSocket, 'room:lag');
  const flooder = await join(open(server, 'flooder'), 'room:lag', { presence: 'none', meta: { n: 0 } });
  await waitFor(() => keys(slow.presence).includes('flooder'), 3000, 'flooder in');
  // Its own state has been applied by now: count only what comes after.
  const updates = 640;
  const { states, diffs } = await stallThroughFlood(slowSocket, slow, flooder, 'flooder', updates);
  assert.ok(states >= 1, `a fresh presence_state replaced the dropped diffs (${states} states, ${diffs} diffs)`);
  assert.ok(diffs < updates, `diffs were dropped (${diffs} of ${updates} arrived)`);
  assert.equal(slowSocket.isConnected(), true, 'resynced, not closed');
});
