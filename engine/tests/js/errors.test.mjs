// Every error of PROTOCOL.md, with the real phoenix.js client where it can send the request and a
// raw WebSocket where it cannot. After an error reply the connection's other topics keep working;
// after a close code its presences leave and nobody else is affected.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { startServer, connect, join, push, keys, raw, waitFor, sleep } from './harness.mjs';

let server;
let watcher;
const sockets = [];
before(async () => {
  server = await startServer([
    '--max-topics-per-conn', '3', '--max-meta-bytes', '100', '--max-frame-bytes', '2048', '--heartbeat-timeout-ms', '1000',
  ]);
  // Watches room:err with heartbeats well inside the timeout.
  watcher = await join(open('watcher', { heartbeatIntervalMs: 200 }), 'room:err');
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  const { code } = await server.stop();
  assert.equal(code, 0);
});

function open(user, opts) {
  const s = connect(server, user, opts);
  sockets.push(s);
  return s;
}

async function stillWorks(channel) {
  const r = await push(channel, 'presence_update', { meta: { alive: Date.now() } });
  assert.equal(r.status, 'ok', JSON.stringify(r));
}

test('unknown event on a joined topic: error reply, channel keeps working', async () => {
  const { channel } = await join(open('u-unknown'), 'room:err');
  assert.deepEqual(await push(channel, 'shout', {}), { status: 'error', response: { reason: 'unknown event' } });
  await stillWorks(channel);
});

test('event on a topic not joined: unmatched topic', async () => {
  const c = await raw(server);
  const reply = await c.call('7', 'room:never', 'presence_update', { meta: {} });
  assert.deepEqual(reply[4], { status: 'error', response: { reason: 'unmatched topic' } });
  c.close();
});

test('over max_topics_per_conn: too many channels joined, the others keep working', async () => {
  const s = open('u-many');
  const joined = [];
  for (const t of ['a', 'b', 'c']) joined.push(await join(s, `room:many-${t}`));
  await assert.rejects(join(s, 'room:many-d'), /too many channels joined/);
  for (const { channel } of joined) await stillWorks(channel);
});

test('meta over max_meta_bytes: meta too large, nothing tracked, old meta kept on update', async () => {
  const big = { blob: 'x'.repeat(200) };
  await assert.rejects(join(open('u-big'), 'room:err', { meta: big }), /meta too large/);
  const { channel } = await join(open('u-small'), 'room:err', { meta: { small: 1 } });
  assert.deepEqual(await push(channel, 'presence_update', { meta: big }), { status: 'error', response: { reason: 'meta too large' } });
  await waitFor(() => keys(watcher.presence).includes('u-small'), 3000, 'u-small tracked');
  assert.ok(!keys(watcher.presence).includes('u-big'));
  const metas = watcher.presence.list((k, p) => (k === 'u-small' ? p.metas : null)).find(Boolean);
  assert.equal(metas[0].small, 1);
});

async function closesWith(frame, code, reasonPattern) {
  const c = await raw(server, 'vsn=2.0.0&user_id=bad-' + code);
  await c.call('1', 'room:err', 'phx_join', { meta: { doomed: true } });
  await waitFor(() => keys(watcher.presence).includes('bad-' + code), 3000, 'the bad client tracked');
  c.ws.send(frame);
  const closed = await c.closed();
  assert.equal(closed.code, code);
  assert.match(closed.reason, reasonPattern);
  await waitFor(() => !keys(watcher.presence).includes('bad-' + code), 3000, 'its presence gone');
  await stillWorks(watcher.channel);
}

test('a frame that is not a V2 message: close 1007, presences leave', async () => {
  await closesWith('{"not": "an array"}', 1007, /invalid frame/);
  await closesWith('not json at all', 1007, /not JSON/);
});

test('a binary frame: close 1003', async () => {
  await closesWith(Buffer.from([1, 2, 3]), 1003, /binary/);
});

test('a frame over max_frame_bytes: close 1009', async () => {
  await closesWith(JSON.stringify(['1', '2', 'room:err', 'shout', { pad: 'y'.repeat(4096) }]), 1009, /too large/);
});

test('silence past heartbeat_timeout closes the connection and its presence leaves', async () => {
  const c = await raw(server, 'vsn=2.0.0&user_id=sleepy');
  await c.call('1', 'room:err', 'phx_join', {});
  await waitFor(() => keys(watcher.presence).includes('sleepy'), 3000, 'sleepy tracked');
  const closed = await c.closed(4000);
  assert.deepEqual(closed, { code: 1000, reason: 'heartbeat timeout' });
  await waitFor(() => !keys(watcher.presence).includes('sleepy'), 3000, 'sleepy gone');
  assert.ok(keys(watcher.presence).includes('watcher'), 'a client that heartbeats stays');
});

async function refusedStatus(query, pathname = '/socket/websocket') {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${server.port}${pathname}?${query}`);
    ws.on('unexpected-response', (req, res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode, body });
      });
    });
    ws.on('open', () => reject(new Error('handshake accepted')));
    ws.on('error', () => {});
  });
}

test('handshake refusals: vsn other than 2.x is 400, another path is 404, with reasons', async () => {
  const v1 = await refusedStatus('vsn=1.0.0');
  assert.equal(v1.status, 400);
  assert.match(v1.body, /vsn/);
  assert.equal((await refusedStatus('vsn=2.0.0', '/elsewhere')).status, 404);
});

test('SIGTERM closes connections with 1001 and exits 0', async () => {
  const own = await startServer();
  try {
    const c = await raw(own);
    await c.call('1', 'room:bye', 'phx_join', {});
    const started = Date.now();
    own.proc.kill('SIGTERM');
    const closed = await c.closed(5000);
    assert.equal(closed.code, 1001);
    const { code } = await own.exited;
    assert.equal(code, 0);
    assert.ok(Date.now() - started < 5000, 'bounded shutdown');
    await sleep(10);
  } finally {
    // If anything above failed, do not leave the server (and this test run) hanging.
    if (own.proc.exitCode === null) own.proc.kill('SIGKILL');
  }
});
