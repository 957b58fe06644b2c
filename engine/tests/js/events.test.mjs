// Presence events to the application's backend on one node: webhook batches to a real HTTP
// receiver, their signatures, every type and reason, retries while the receiver is down,
// duplicates after a receiver that died mid-batch (dropped by id), and a full queue that
// drops and counts without slowing any client.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  startServer, startReceiver, connect, join, push, waitFor, sleep, freePort, metric,
} from './harness.mjs';

const SECRET = 'webhook secret of the tests';
const dir = mkdtempSync(path.join(tmpdir(), 'roster-events-'));
const secretFile = path.join(dir, 'webhook-secret');
writeFileSync(secretFile, `${SECRET}\n`);

const running = [];
after(async () => {
  for (const r of running) await r.stop();
});

/** roster with a webhook to `rx` (and its admin on a port we know) plus `args`. */
async function serverFor(rx, args = []) {
  const adminPort = await freePort();
  const server = await startServer([
    '--webhook-url', rx.url, '--webhook-secret-file', secretFile, '--webhook-batch-ms', '20',
    '--admin-listen', `127.0.0.1:${adminPort}`, ...args,
  ]);
  server.admin = `http://127.0.0.1:${adminPort}`;
  running.push(server, rx);
  return server;
}

const ofKey = (events, key) => events.filter((e) => e.key === key);

test('joins, updates and leaves reach the webhook signed, batched, with ids and reasons', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx, ['--webhook-batch', '8']);
  const alice = connect(server, 'alice');
  const a = await join(alice, 'room:1', { meta: { status: 'here' } });
  assert.equal((await push(a.channel, 'presence_update', { meta: { status: 'away' } })).status, 'ok');
  await new Promise((resolve) => a.channel.leave().receive('ok', resolve));
  const bob = connect(server, 'bob');
  await join(bob, 'room:1', { meta: { status: 'here' } });
  bob.disconnect();
  await waitFor(() => ofKey(rx.taken(), 'bob').some((e) => e.type === 'user_offline')
    && ofKey(rx.taken(), 'alice').some((e) => e.type === 'user_offline'), 5000, () => JSON.stringify(rx.taken()));

  for (const p of rx.posts) {
    const mac = createHmac('sha256', SECRET).update(p.body).digest('hex');
    assert.equal(p.headers['x-roster-signature'], `sha256=${mac}`, 'every body is signed');
    assert.equal(p.headers['content-type'], 'application/json');
  }
  const events = rx.taken();
  const node = JSON.parse(rx.posts[0].body).node;
  assert.ok(node.endsWith(`-${server.port}`), `the node is named: ${node}`);
  for (const e of events) {
    assert.match(e.id, /^[0-9a-f]{32}$/);
    assert.equal(e.node, node);
    assert.ok(Math.abs(e.time - Date.now()) < 60_000, `a wall-clock time: ${e.time}`);
  }
  assert.equal(new Set(events.map((e) => e.id)).size, events.length, 'no id twice');

  const aliceEvents = ofKey(events, 'alice');
  const presence = aliceEvents.filter((e) => e.type.startsWith('presence_'));
  assert.deepEqual(presence.map((e) => e.type), ['presence_join', 'presence_update', 'presence_leave']);
  const [joined, updated, left] = presence;
  assert.equal(joined.topic, 'room:1');
  assert.equal(joined.meta.status, 'here');
  assert.equal(updated.meta.status, 'away');
  assert.equal(updated.prev_phx_ref, joined.phx_ref, 'an update names the presence it replaced');
  assert.equal(left.phx_ref, updated.phx_ref);
  assert.equal(left.reason, 'left');
  assert.equal(joined.meta.phx_ref, joined.phx_ref, 'the meta is the one clients see');
  const user = aliceEvents.filter((e) => e.type.startsWith('user_')).map((e) => e.type);
  assert.deepEqual(user, ['user_online', 'user_offline']);
  const bobLeft = ofKey(events, 'bob').find((e) => e.type === 'presence_leave');
  assert.equal(bobLeft.reason, 'closed', 'a socket that went');

  // Many changes at once go out in batches of at most --webhook-batch.
  const before = rx.posts.length;
  const sockets = Array.from({ length: 30 }, (_, i) => connect(server, `crowd${i}`));
  await Promise.all(sockets.map((s) => join(s, 'room:crowd')));
  await waitFor(() => rx.taken().filter((e) => e.topic === 'room:crowd' && e.type === 'presence_join').length === 30,
    5000, 'the crowd\'s joins');
  const crowd = rx.posts.slice(before);
  assert.ok(crowd.every((p) => p.events.length <= 8), `batches of at most 8: ${crowd.map((p) => p.events.length)}`);
  assert.ok(crowd.some((p) => p.events.length > 1), `events share batches: ${crowd.map((p) => p.events.length)}`);
  for (const s of [alice, ...sockets]) s.disconnect();
});

test('a presence whose grace ran out, or whose client went silent, says so', async () => {
  const rx = await startReceiver();
  const graced = await serverFor(rx, ['--leave-grace-ms', '200']);
  const gone = connect(graced, 'gone');
  await join(gone, 'room:2');
  gone.disconnect();
  // phoenix.js heartbeats every 30 s: this one goes silent past 700 ms. (With a leave grace
  // its presence would be held, and leave when the grace ends, as grace_expired.)
  const strict = await serverFor(rx, ['--heartbeat-timeout-ms', '700']);
  const silent = connect(strict, 'silent', { heartbeatIntervalMs: 60_000 });
  await join(silent, 'room:2');
  const leaveOf = (key) => rx.taken().find((e) => e.key === key && e.type === 'presence_leave');
  await waitFor(() => leaveOf('gone') && leaveOf('silent'), 5000, () => JSON.stringify(rx.taken()));
  assert.equal(leaveOf('gone').reason, 'grace_expired');
  assert.equal(leaveOf('silent').reason, 'heartbeat_timeout');
  silent.disconnect();
});

test('a receiver that is down gets the batch when it is back; one that died mid-batch gets it again, same ids', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx);
  await rx.stop();
  const s = connect(server, 'carol');
  await join(s, 'room:3');
  await waitFor(async () => await metric(server.admin, 'roster_webhook_failures_total') >= 2, 5000,
    'posts failing while the receiver is down');
  assert.equal(rx.posts.length, 0);
  await rx.start();
  await waitFor(() => rx.taken().some((e) => e.key === 'carol' && e.type === 'presence_join'), 10_000,
    'the batch, once the receiver is back');

  // The receiver reads the next batch and dies before answering, then comes back: roster
  // posts it again, and the backend drops what it has seen by id.
  rx.mode = 'drop';
  s.disconnect();
  await waitFor(() => rx.posts.some((p) => p.mode === 'drop'), 5000, 'a batch read, not answered');
  await rx.stop();
  rx.mode = 'ok';
  await rx.start();
  await waitFor(() => rx.taken().some((e) => e.key === 'carol' && e.type === 'user_offline'), 10_000,
    'the batch again');
  const dropped = rx.posts.filter((p) => p.mode === 'drop').flatMap((p) => p.events);
  const taken = new Map(rx.taken().map((e) => [e.id, e]));
  for (const e of dropped) assert.deepEqual(taken.get(e.id), e, 'the same event, the same id');
  const types = rx.unique().filter((e) => e.key === 'carol').map((e) => e.type).sort();
  assert.deepEqual(types, ['presence_join', 'presence_leave', 'user_offline', 'user_online']);
});

test('a full queue drops events and counts them; clients are not slowed', async () => {
  const rx = await startReceiver();
  rx.mode = 'hang';
  const server = await serverFor(rx, ['--event-queue', '4', '--webhook-batch', '1', '--webhook-timeout-ms', '30000']);
  const sockets = Array.from({ length: 40 }, (_, i) => connect(server, `flood${i}`));
  await Promise.all(sockets.map((s) => join(s, 'room:flood')));
  await waitFor(async () => await metric(server.admin, 'roster_events_dropped_total') >= 40, 5000, 'drops counted');
  const t0 = Date.now();
  const late = connect(server, 'late');
  await join(late, 'room:flood');
  assert.ok(Date.now() - t0 < 2000, `a join while the backend hangs: ${Date.now() - t0} ms`);
  await waitFor(() => /event queue full/.test(server.log()), 2000, 'the overflow logged');
  rx.mode = 'ok';
  rx.release();
  const queued = await metric(server.admin, 'roster_events_queued_total');
  await waitFor(async () => await metric(server.admin, 'roster_webhook_events_sent_total') === queued, 10_000,
    'what was queued delivered');
  for (const s of [late, ...sockets]) s.disconnect();
});

test('--webhook-topics reports only the topics it names', async () => {
  const rx = await startReceiver();
  const server = await serverFor(rx, ['--webhook-topics', 'room:kept*,exact']);
  const s = connect(server, 'dora');
  for (const t of ['room:kept:1', 'room:other', 'exact', 'exactly']) await join(s, t);
  await waitFor(() => rx.taken().filter((e) => e.type === 'presence_join').length >= 2, 5000, 'the kept joins');
  await sleep(200);
  const topics = rx.taken().filter((e) => e.type === 'presence_join').map((e) => e.topic).sort();
  assert.deepEqual(topics, ['exact', 'room:kept:1']);
  s.disconnect();
});
