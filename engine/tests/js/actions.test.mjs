// The admin API's actions on one node, seen by the official phoenix.js client and by the
// webhook: disconnecting a user (the close code reaches onClose; its presences leave at once
// even under a leave grace), and server-side presences (no socket, a meta, a TTL or a DELETE)
// that phoenix.js Presence shows like any other. Bad requests get 4xx and change nothing.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, startReceiver, connect, join, keys, waitFor, freePort, api,
} from './harness.mjs';

const KEY = 'actions-api-key';
const running = [];
after(async () => {
  for (const r of running) await r.stop();
});

/** roster with an API key, a webhook to `rx`, a 5 s leave grace, and `call(method, path, body)`. */
async function serverFor(rx) {
  const adminPort = await freePort();
  const server = await startServer([
    '--admin-listen', `127.0.0.1:${adminPort}`, '--api-key', KEY, '--leave-grace-ms', '5000',
    '--webhook-url', rx.url, '--webhook-batch-ms', '10',
  ]);
  running.push(server, rx);
  server.call = (method, path, body, key = KEY) => api(`http://127.0.0.1:${adminPort}`, method, path, body, key);
  return server;
}

/** Resolves with the CloseEvent of `socket`'s next close. */
const closed = (socket) => new Promise((resolve) => socket.onClose(resolve));

test('disconnecting a user closes every connection of the key with the code and reason given', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx);
  const tab1 = connect(server, 'mallory');
  const tab2 = connect(server, 'mallory');
  const other = connect(server, 'olive');
  await join(tab1, 'room:a', { meta: { tab: 1 } });
  await join(tab2, 'room:b');
  const watch = await join(other, 'room:a');
  await waitFor(() => keys(watch.presence).join() === 'mallory,olive', 2000, 'both in the room');
  const closes = [closed(tab1), closed(tab2)];
  let olive = false;
  other.onClose(() => { olive = true; });
  const res = await server.call('POST', '/api/users/mallory/disconnect', { code: 4403, reason: 'banned' });
  assert.equal(res.status, 202, res.body);
  for (const e of await Promise.all(closes)) {
    assert.equal(e.code, 4403);
    assert.equal(e.reason, 'banned');
  }
  // The leave grace does not hold what the backend asked to be gone.
  await waitFor(() => keys(watch.presence).join() === 'olive', 1000, () => `mallory gone: ${keys(watch.presence)}`);
  const leaves = () => rx.taken().filter((e) => e.key === 'mallory' && e.type === 'presence_leave');
  await waitFor(() => leaves().length === 2, 2000, 'two leaves reported');
  assert.deepEqual(leaves().map((e) => e.reason), ['disconnected', 'disconnected']);
  assert.equal(olive, false, 'another key is not touched');
  for (const s of [tab1, tab2, other]) s.disconnect();
});

test('bad actions are refused and change nothing', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx);
  const s = connect(server, 'nadia');
  await join(s, 'room:c');
  const cases = [
    ['POST', '/api/users/nadia/disconnect', { code: 1000 }, KEY, 400],
    ['POST', '/api/users/nadia/disconnect', { reason: 'x'.repeat(124) }, KEY, 400],
    ['POST', '/api/users/nadia/disconnect', { bogus: 1 }, KEY, 400],
    ['POST', '/api/users/nadia/disconnect', 'not json', KEY, 400],
    ['POST', '/api/users/nadia/disconnect', {}, 'wrong key', 401],
    ['GET', '/api/users/nadia/disconnect', undefined, KEY, 200],
    ['PUT', '/api/topics/room:c/presences/bot', { meta: { pad: 'x'.repeat(2000) } }, KEY, 400],
    ['PUT', '/api/topics/room:c/presences/bot', { meta: [1] }, KEY, 400],
    ['PUT', '/api/topics/room:c/presences/bot', { ttl_ms: 0 }, KEY, 400],
    ['PUT', `/api/topics/${'t'.repeat(300)}/presences/bot`, {}, KEY, 400],
    ['PATCH', '/api/topics/room:c/presences/bot', {}, KEY, 405],
    ['POST', '/api/nothing', {}, KEY, 404],
  ];
  for (const [method, path, body, key, want] of cases) {
    const res = await server.call(method, path, body, key);
    // A GET of .../disconnect is the read API asking for a user of that name.
    assert.equal(res.status, want, `${method} ${path}: ${res.body}`);
  }
  const room = JSON.parse((await server.call('GET', '/api/topics/room:c')).body);
  assert.deepEqual(Object.keys(room.presences), ['nadia'], 'nothing was tracked, nobody closed');
  s.disconnect();
});

test('a server-side presence is seen by phoenix.js Presence, updated, and leaves at its TTL or by DELETE', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx);
  const viewer = connect(server, 'viewer');
  const room = await join(viewer, 'room:s');
  const put = (key, body) => server.call('PUT', `/api/topics/room:s/presences/${key}`, body);
  assert.equal((await put('bot', { meta: { kind: 'bot' }, ttl_ms: 1500 })).status, 202);
  assert.equal((await put('call', { meta: { in_call: true } })).status, 202);
  const metaOf = (key) => room.presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean);
  await waitFor(() => metaOf('bot') && metaOf('call'), 2000, () => `both shown: ${keys(room.presence)}`);
  assert.equal(metaOf('bot')[0].kind, 'bot');
  assert.ok(metaOf('bot')[0].phx_ref, 'a phx_ref like any presence');
  // A second PUT updates it: one meta, the new one.
  assert.equal((await put('bot', { meta: { kind: 'bot', mood: 'busy' }, ttl_ms: 1500 })).status, 202);
  await waitFor(() => metaOf('bot')?.[0].mood === 'busy', 2000, 'the update');
  assert.equal(metaOf('bot').length, 1);
  const apiView = JSON.parse((await server.call('GET', '/api/topics/room:s')).body);
  assert.deepEqual(Object.keys(apiView.presences).sort(), ['bot', 'call', 'viewer']);
  const user = JSON.parse((await server.call('GET', '/api/users/call')).body);
  assert.equal(user.online, true);
  assert.equal((await server.call('DELETE', '/api/topics/room:s/presences/call')).status, 202);
  await waitFor(() => !metaOf('call'), 2000, 'the DELETE');
  await waitFor(() => !metaOf('bot'), 3000, 'the TTL');
  assert.deepEqual(keys(room.presence), ['viewer']);
  const of = (key) => rx.taken().filter((e) => e.key === key && e.type.startsWith('presence_'));
  await waitFor(() => of('bot').length === 3 && of('call').length === 2, 2000, 'the events');
  assert.deepEqual(of('bot').map((e) => e.type), ['presence_join', 'presence_update', 'presence_leave']);
  assert.equal(of('bot')[2].reason, 'ttl_expired');
  assert.equal(of('call')[1].reason, 'removed');
  viewer.disconnect();
});
