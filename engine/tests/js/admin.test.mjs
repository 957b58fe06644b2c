// The admin API answers what the official phoenix.js clients see, and its metrics move as they
// come and go.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { startServer, connect, join, keys, waitFor, sleep } from './harness.mjs';

const KEY = 'js-admin-key';
let server;
let admin;
const sockets = [];

async function freePort() {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

before(async () => {
  const port = await freePort();
  admin = `http://127.0.0.1:${port}`;
  server = await startServer(['--admin-listen', `127.0.0.1:${port}`, '--api-key', KEY]);
});
after(async () => {
  sockets.forEach((s) => s.disconnect());
  const { code } = await server.stop();
  assert.equal(code, 0, `roster exits 0 on SIGTERM; log: ${server.log()}`);
});

const api = async (path, key = KEY) => {
  const res = await fetch(`${admin}${path}`, { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  return { status: res.status, body: await res.text() };
};

function open(user) {
  const s = connect(server, user);
  sockets.push(s);
  return s;
}

test('the topic and user API match the phoenix.js Presence view', async () => {
  const members = await Promise.all(['amy', 'bo', 'cy'].map((u, i) => join(open(u), 'room:api', { meta: { seat: i } })));
  const [first] = members;
  await waitFor(() => keys(first.presence).length === 3, 3000, 'all three in the view');
  const { status, body } = await api('/api/topics/room:api');
  assert.equal(status, 200, body);
  const t = JSON.parse(body);
  assert.equal(t.topic, 'room:api');
  assert.equal(t.keys, 3);
  assert.equal(t.metas, 3);
  const fromApi = Object.fromEntries(Object.entries(t.presences).map(([k, p]) => [k, p.metas.map((m) => m.phx_ref)]));
  const fromClient = Object.fromEntries(first.presence.list((k, p) => [k, p.metas.map((m) => m.phx_ref)]));
  assert.deepEqual(fromApi, fromClient);
  const user = JSON.parse((await api('/api/users/bo')).body);
  assert.equal(user.online, true);
  assert.deepEqual(user.presences.map((p) => [p.topic, p.meta.seat]), [['room:api', 1]]);
  assert.equal((await api('/api/users/nobody')).body, '{"key":"nobody","online":false,"presences":[]}');
  assert.equal((await api('/api/topics/room:api', null)).status, 401);
  assert.equal((await api('/healthz', null)).status, 200);
});

test('connection metrics move as clients come and go', async () => {
  const connections = async () => {
    const { body } = await api('/metrics');
    return body.split('\n').filter((l) => l.startsWith('roster_connections{'))
      .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
  };
  // Figures are published once a second: let the earlier test's connections show first.
  await sleep(1200);
  const before = await connections();
  const s = open('dee');
  await join(s, 'room:metrics');
  await waitFor(async () => (await connections()) === before + 1, 5000, 'one more connection');
  s.disconnect();
  await waitFor(async () => (await connections()) === before, 5000, 'back to before');
});
