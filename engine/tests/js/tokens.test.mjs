// Token lifetimes with the official phoenix.js client: a connection is closed when its token
// expires (4001), unless it sent a fresh token for the same key on the reserved topic
// `roster:token`, whose grants and meta claims apply from then on (to the presences already
// tracked too); and with
// --refusals-in-band a refused upgrade reaches the app as a close code and reason.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startServer, connect, join, push, keys, waitFor, sign, sleep } from './harness.mjs';

const SECRET = 'a token secret of at least thirty-two bytes';
const dir = mkdtempSync(path.join(tmpdir(), 'roster-tokens-'));
const secretFile = path.join(dir, 'secret');
writeFileSync(secretFile, SECRET);

const running = [];
after(async () => {
  for (const r of running) await r.stop();
});

async function server(args = []) {
  const s = await startServer(['--secret-file', secretFile, ...args]);
  running.push(s);
  return s;
}

const now = () => Math.floor(Date.now() / 1000);
const token = (claims) => sign({ exp: now() + 60, ...claims }, { secret: SECRET });
const open = (srv, t) => connect(srv, undefined, { params: { token: t } });
const closed = (socket) => new Promise((resolve) => socket.onClose(resolve));

test('a connection is closed when its token expires, and its presence leaves', async () => {
  const srv = await server();
  const short = open(srv, token({ sub: 'ivy', exp: now() + 2 }));
  const watcher = open(srv, token({ sub: 'wes' }));
  const end = closed(short);
  await join(short, 'room:t');
  const view = await join(watcher, 'room:t');
  await waitFor(() => keys(view.presence).join() === 'ivy,wes', 2000, 'both present');
  const e = await end;
  assert.deepEqual([e.code, e.reason], [4001, 'token expired']);
  await waitFor(() => keys(view.presence).join() === 'wes', 2000, 'ivy gone');
  short.disconnect();
  watcher.disconnect();
});

test('a fresh token sent in time keeps the connection; its grants and claims follow', async () => {
  const srv = await server();
  const first = token({ sub: 'jay', exp: now() + 2, topics: ['room:*', 'chat:1'], meta: { role: 'member' } });
  const s = open(srv, first);
  let closedWith = null;
  s.onClose((e) => { closedWith = e.code; });
  const room1 = await join(s, 'room:1', { meta: { page: '/a' } });
  const watcher = open(srv, token({ sub: 'wes' }));
  const seen = await join(watcher, 'room:1');
  const jays = (view) => view.presence.list((key, p) => (key === 'jay' ? p.metas : [])).flat();
  await waitFor(() => jays(seen).length === 1 && jays(seen)[0].role === 'member', 2000, 'jay as a member');
  const chat = await join(s, 'chat:1');
  let chatClosed = false;
  chat.channel.onClose(() => { chatClosed = true; });
  const tokens = s.channel('roster:token');
  await new Promise((resolve, reject) => tokens.join().receive('ok', resolve).receive('error', reject));

  const refresh = (t) => push(tokens, 'refresh', { token: t });
  assert.deepEqual(await refresh(token({ sub: 'someone-else' })),
    { status: 'error', response: { reason: 'token names another key' } });
  assert.deepEqual(await refresh(sign({ sub: 'jay' }, { secret: 'not the secret, but as long as one' })),
    { status: 'error', response: { reason: 'token signature does not verify' } });
  assert.deepEqual(await refresh(token({ sub: 'jay', exp: now() - 1 })),
    { status: 'error', response: { reason: 'token expired' } });
  const fresh = token({ sub: 'jay', topics: ['room:*'], meta: { role: 'admin' } });
  assert.equal((await refresh(fresh)).status, 'ok');
  // The presence tracked before the refresh takes the fresh claims; the client's fields stay.
  for (const view of [seen, room1]) {
    await waitFor(() => jays(view).length === 1 && jays(view)[0].role === 'admin', 2000,
      `the tracked presence made anew with the fresh claim: ${JSON.stringify(jays(view))}`);
    assert.equal(jays(view)[0].page, '/a');
  }

  await sleep(3000);
  assert.equal(closedWith, null, 'still open past the first token\'s exp');
  await waitFor(() => chatClosed, 1000, 'chat:1 is no longer granted: closed');
  const room2 = await join(s, 'room:2', { meta: { n: 2 } });
  await waitFor(() => keys(room2.presence).join() === 'jay', 2000, 'jay in room:2');
  const meta = room2.presence.list((_, p) => p.metas[0])[0];
  assert.equal(meta.role, 'admin', 'the fresh token\'s meta claim');
  assert.equal(meta.n, 2);
  const denied = s.channel('chat:1');
  const reply = await new Promise((resolve) => denied.join().receive('error', resolve).receive('ok', () => resolve('ok')));
  denied.leave();
  assert.deepEqual(reply, { reason: 'unauthorized' });
  s.disconnect();
  watcher.disconnect();
});

test('--refusals-in-band tells phoenix.js why the upgrade was refused', async () => {
  const srv = await server(['--refusals-in-band']);
  const cases = [
    [token({ sub: 'kim', exp: now() - 5 }), 4001, 'token expired'],
    [sign({ sub: 'kim' }, { secret: 'a forger who has not got the secret' }), 4003, 'token signature does not verify'],
    [undefined, 4003, 'missing token'],
  ];
  for (const [t, code, reason] of cases) {
    const s = connect(srv, undefined, { params: t ? { token: t } : {} });
    const e = await closed(s);
    assert.deepEqual([e.code, e.reason], [code, reason]);
    s.disconnect();
  }
  const ok = open(srv, token({ sub: 'kim' }));
  await join(ok, 'room:ok');
  ok.disconnect();
});
