// Signed tokens with the real phoenix.js client: as a `token` param and as 1.8's `authToken`
// (Sec-WebSocket-Protocol), topic permissions, and meta claims the client cannot override.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startServer, Socket, join, push, keys, waitFor, sign as signWith } from './harness.mjs';
import WebSocket from 'ws';

const SECRET = 'phoenix.js test secret, at least 32 bytes long';
const secretFile = path.join(tmpdir(), `roster-js-secret-${process.pid}`);
let server;
const sockets = [];

const sign = (claims, { secret = SECRET, alg = 'HS256' } = {}) => signWith(claims, { secret, alg });
const now = () => Math.floor(Date.now() / 1000);

before(async () => {
  writeFileSync(secretFile, `${SECRET}\n`);
  server = await startServer(['--secret-file', secretFile]);
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  const { code } = await server.stop();
  rmSync(secretFile, { force: true });
  assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${server.log()}`);
});

function open(opts) {
  const socket = new Socket(server.url, {
    transport: WebSocket,
    reconnectAfterMs: () => 60_000,
    rejoinAfterMs: () => 60_000,
    ...opts,
  });
  socket.connect();
  sockets.push(socket);
  return socket;
}

test('a token as a param or as authToken names the presence key', async () => {
  const viaParam = await join(open({ params: { token: sign({ sub: 'ann', exp: now() + 60 }) } }), 'room:id');
  const viaAuth = await join(open({ authToken: sign({ sub: 'ben' }) }), 'room:id');
  await waitFor(() => keys(viaParam.presence).join() === 'ann,ben', 3000, 'both in the view');
  assert.deepEqual(keys(viaAuth.presence), ['ann', 'ben']);
});

test('forged, expired, wrong-algorithm and missing tokens are refused at the handshake', async () => {
  const cases = [
    [{}, '401', 'missing token'],
    [{ token: sign({ sub: 'x' }, { secret: 'not the secret, but long enough to pass' }) }, '401', 'token signature does not verify'],
    [{ token: sign({ sub: 'x', exp: now() - 10 }) }, '401', 'token expired'],
    [{ token: sign({ sub: 'x' }, { alg: 'HS512' }) }, '401', 'token must be signed with HS256'],
  ];
  for (const [params, status, reason] of cases) {
    const qs = new URLSearchParams({ vsn: '2.0.0', ...params }).toString();
    const ws = new WebSocket(`${server.url}/websocket?${qs}`);
    const got = await new Promise((resolve) => {
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (d) => { body += d; });
        res.on('end', () => resolve([String(res.statusCode), body.trim()]));
      });
      ws.on('open', () => resolve(['101', '']));
      ws.on('error', () => {});
    });
    assert.deepEqual(got, [status, reason], JSON.stringify(params));
  }
});

test('topic patterns allow and refuse; meta claims win over the client', async () => {
  const socket = open({ params: { token: sign({ sub: 'cat', topics: ['room:*'], meta: { role: 'guest' } }) } });
  await assert.rejects(join(socket, 'admin:panel'), /unauthorized/);
  const { channel, presence } = await join(socket, 'room:claims', { meta: { role: 'admin', page: '/a' } });
  await waitFor(() => keys(presence).includes('cat'), 3000, 'own presence');
  const meta = () => presence.list((k, p) => (k === 'cat' ? p.metas[0] : null)).find(Boolean);
  assert.equal(meta().role, 'guest');
  assert.equal(meta().page, '/a');
  assert.equal((await push(channel, 'presence_update', { meta: { role: 'owner', page: '/b' } })).status, 'ok');
  await waitFor(() => meta().page === '/b', 3000, 'the update');
  assert.equal(meta().role, 'guest');
});
