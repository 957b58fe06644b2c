// Starts the real roster binary and drives it with the official phoenix client (and raw
// WebSockets for what phoenix.js cannot send). Every wait is bounded.
import { execFileSync, spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createServer as createHttpServer } from 'node:http';
import { createServer, connect as tcpConnect } from 'node:net';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import WebSocket from 'ws';
import { Socket as PhxSocket, Presence as PhxPresence } from 'phoenix';

export const Socket = PhxSocket;
export const Presence = PhxPresence;
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const bin = process.env.ROSTER_BIN || path.join(targetDir(), 'release', 'roster');

/** Where cargo puts its builds: CARGO_TARGET_DIR (relative to where cargo runs), else what
 * `cargo metadata` says (a workspace may set it in .cargo/config.toml). */
function targetDir() {
  if (process.env.CARGO_TARGET_DIR) return path.resolve(process.env.CARGO_TARGET_DIR);
  const meta = execFileSync('cargo', ['metadata', '--format-version', '1', '--no-deps'], {
    cwd: root,
    encoding: 'utf8',
  });
  return JSON.parse(meta).target_directory;
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Starts roster with 4 shards (so cross-shard paths run) plus `args`, on `port` if given (a
 * restart on the same address), else on a free one. */
export async function startServer(args = [], { port: fixed, env = {} } = {}) {
  const port = fixed ?? await freePort();
  // Servers run side by side: each admin listener takes a port of its own.
  const admin = args.includes('--admin-listen') ? [] : ['--admin-listen', '127.0.0.1:0'];
  const proc = spawn(bin, ['--listen', `127.0.0.1:${port}`, '--shards', '4', ...admin, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ROSTER_LOG: 'warn', ...env },
  });
  let log = '';
  proc.stderr.on('data', (d) => { log += d; });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const url = `ws://127.0.0.1:${port}/socket`;
  try {
    await waitFor(async () => {
      if (proc.exitCode !== null) throw new Error(`roster exited with ${proc.exitCode}: ${log}`);
      const ws = new WebSocket(`${url}/websocket?vsn=2.0.0`);
      return new Promise((resolve) => {
        ws.on('open', () => { ws.close(); resolve(true); });
        // With a secret set, a tokenless probe is refused: that answer is readiness too.
        ws.on('unexpected-response', (req) => { req.destroy(); resolve(true); });
        ws.on('error', () => resolve(false));
      });
    }, 5000, () => `roster listening on ${port}: ${log}`);
  } catch (e) {
    proc.kill('SIGKILL');
    throw e;
  }
  return {
    port,
    url,
    proc,
    log: () => log,
    exited,
    async stop() {
      proc.kill('SIGTERM');
      return exited;
    },
  };
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `pred` (sync or async) every 10 ms until it is truthy; fails after `ms`. */
export async function waitFor(pred, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await pred()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${typeof what === 'function' ? what() : what}`);
    await sleep(10);
  }
}

/** A connected phoenix.js Socket as `userId`. */
export function connect(server, userId, opts = {}) {
  const socket = new Socket(server.url, {
    transport: WebSocket,
    params: userId === undefined ? {} : { user_id: userId },
    reconnectAfterMs: () => 60_000,
    rejoinAfterMs: () => 60_000,
    ...opts,
  });
  socket.connect();
  return socket;
}

/** Joins `topic` and resolves with the channel and its Presence once the server said ok. */
export function join(socket, topic, params = {}) {
  const channel = socket.channel(topic, params);
  const presence = new Presence(channel);
  return new Promise((resolve, reject) => {
    channel.join()
      .receive('ok', () => resolve({ channel, presence }))
      .receive('error', (e) => {
        // Stop phoenix.js from scheduling rejoins (their timer would keep the test alive).
        channel.leave();
        reject(new Error(`join ${topic}: ${JSON.stringify(e)}`));
      })
      .receive('timeout', () => reject(new Error(`join ${topic}: timeout`)));
  });
}

/** Resolves with a push's reply `{status, response}` (ok or error). */
export function push(channel, event, payload) {
  return new Promise((resolve, reject) => {
    channel.push(event, payload)
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => resolve({ status: 'error', response }))
      .receive('timeout', () => reject(new Error(`${event}: timeout`)));
  });
}

/** Keys of a Presence list, sorted. */
export function keys(presence) {
  return presence.list((key) => key).sort();
}

/**
 * A raw WebSocket speaking V2 frames by hand: for what phoenix.js never sends (bad frames,
 * binary frames) and for exact frame-level assertions.
 */
export async function raw(server, query = 'vsn=2.0.0', protocols = undefined) {
  const ws = new WebSocket(`${server.url}/websocket?${query}`, protocols);
  const frames = [];
  const state = { closed: null, frames };
  ws.on('message', (d, isBinary) => frames.push(isBinary ? d : JSON.parse(d.toString())));
  ws.on('close', (code, reason) => { state.closed = { code, reason: reason.toString() }; });
  await new Promise((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject); });
  let ref = 0;
  return {
    ws,
    state,
    frames,
    send(frame) { ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame)); },
    /** Sends [jr, ref, topic, event, payload] and resolves with the reply to it. */
    async call(jr, topic, event, payload = {}) {
      const r = String(++ref + 1000);
      ws.send(JSON.stringify([jr, r, topic, event, payload]));
      return this.next((f) => f[1] === r && f[3] === 'phx_reply', `reply to ${event} ${topic}`);
    },
    /** Waits for (and removes) the first frame matching `pred`. */
    async next(pred, what = 'a frame', ms = 3000) {
      let found;
      await waitFor(() => {
        const i = frames.findIndex(pred);
        if (i >= 0) { found = frames.splice(i, 1)[0]; return true; }
        return false;
      }, ms, () => `${what}; have ${JSON.stringify(frames).slice(0, 500)}`);
      return found;
    },
    async closed(ms = 3000) {
      await waitFor(() => state.closed, ms, 'the server to close the connection');
      return state.closed;
    },
    close() { ws.close(); },
  };
}

/** Where nats-server is: NATS_SERVER, else PATH, else Debian's /usr/sbin. */
function natsBin() {
  if (process.env.NATS_SERVER) return process.env.NATS_SERVER;
  for (const dir of [...(process.env.PATH || '').split(':'), '/usr/sbin', '/usr/local/bin']) {
    const p = path.join(dir, 'nats-server');
    try {
      execFileSync(p, ['--version'], { stdio: 'ignore' });
      return p;
    } catch {
      // Not there: next.
    }
  }
  throw new Error('nats-server not found (scripts/test.sh installs Debian\'s nats-server)');
}

async function canConnect(port) {
  const { connect: tcp } = await import('node:net');
  return new Promise((resolve) => {
    const s = tcp(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

/** A real nats-server on a free loopback port (never every interface), with `args` of its own
 * (a config file, credentials); `restart()` stops it and starts it again on the same port. */
export async function startNats(args = []) {
  const port = await freePort();
  const bin = natsBin();
  const nats = { port, url: `nats://127.0.0.1:${port}`, proc: null, log: '' };
  nats.start = async () => {
    const proc = spawn(bin, [...args, '-a', '127.0.0.1', '-p', String(port)], { stdio: ['ignore', 'ignore', 'pipe'] });
    proc.stderr.on('data', (d) => { nats.log += d; });
    nats.exited = new Promise((resolve) => proc.on('exit', resolve));
    nats.proc = proc;
    await waitFor(() => canConnect(port), 5000, () => `nats-server on ${port}: ${nats.log}`);
  };
  nats.stop = async () => {
    if (!nats.proc) return;
    nats.proc.kill('SIGTERM');
    await nats.exited;
    nats.proc = null;
  };
  nats.restart = async () => {
    await nats.stop();
    await nats.start();
  };
  await nats.start();
  return nats;
}

/** A roster node of a cluster on `nats`, named `name` (on `opts.port`, or a free one; through
 * `opts.natsUrl` rather than `nats.url` if given). */
export async function startNode(nats, name, args = [], opts = {}) {
  const adminPort = await freePort();
  const node = await startServer([
    '--nats-url', opts.natsUrl ?? nats.url, '--node-name', name, '--admin-listen', `127.0.0.1:${adminPort}`, ...args,
  ], opts);
  node.admin = `http://127.0.0.1:${adminPort}`;
  node.metric = (name) => metric(node.admin, name);
  return node;
}

/** An admin API request: `body` as JSON (or a string as it is), `key` the bearer API key. */
export async function api(admin, method, path, body, key) {
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const res = await fetch(`${admin}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : (typeof body === 'string' ? body : JSON.stringify(body)),
  });
  return { status: res.status, body: await res.text() };
}

/** The sum over shards of a metric of `admin`'s /metrics. */
export async function metric(admin, name) {
  const body = await (await fetch(`${admin}/metrics`)).text();
  const lines = body.split('\n').filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  if (!lines.length) throw new Error(`no ${name} in /metrics`);
  return lines.reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
}

/**
 * A small HTTP receiver for roster's webhooks on a free loopback port. It records every POST
 * (headers, raw body, how it was answered) and answers as `mode` says: 'ok' (200), a status
 * number, 'hang' (no answer until `release()`), or 'drop' (reads the batch, then cuts the
 * connection without answering: the batch arrived, roster is not told so). `stop()` and
 * `start()` take it down and up again on the same port.
 */
export async function startReceiver() {
  const port = await freePort();
  const rx = { port, url: `http://127.0.0.1:${port}/hook`, posts: [], mode: 'ok', server: null };
  const sockets = new Set();
  let hanging = [];
  rx.start = () => new Promise((resolve, reject) => {
    const server = createHttpServer((req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        const { mode } = rx;
        const body = Buffer.concat(chunks);
        rx.posts.push({ headers: req.headers, body, mode, events: JSON.parse(body).events });
        if (mode === 'hang') hanging.push(res);
        else if (mode === 'drop') req.socket.destroy();
        else {
          res.statusCode = typeof mode === 'number' ? mode : 200;
          res.end('ok');
        }
      });
    });
    server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
    server.on('error', reject);
    server.listen(port, '127.0.0.1', resolve);
    rx.server = server;
  });
  rx.stop = () => new Promise((resolve) => {
    if (!rx.server) return resolve();
    for (const s of sockets) s.destroy();
    rx.server.close(() => resolve());
    rx.server = null;
  });
  /** Answers every post held by 'hang' with 200. */
  rx.release = () => {
    for (const res of hanging) {
      res.statusCode = 200;
      res.end('ok');
    }
    hanging = [];
  };
  /** Every event of the posts answered 200, in the order they came. */
  rx.taken = () => rx.posts.filter((p) => p.mode === 'ok').flatMap((p) => p.events);
  /** The same, a duplicate id dropped as a backend would. */
  rx.unique = () => {
    const seen = new Set();
    return rx.taken().filter((e) => !seen.has(e.id) && seen.add(e.id));
  };
  await rx.start();
  return rx;
}

/**
 * A raw NATS subscriber to `subject` on `nats` (core protocol by hand: CONNECT, SUB, then
 * MSG lines), collecting each message's subject and payload as text in `msgs`.
 */
export async function natsSubscribe(nats, subject) {
  const sub = { msgs: [] };
  const sock = tcpConnect(nats.port, '127.0.0.1');
  let buf = Buffer.alloc(0);
  let ready;
  sub.ready = new Promise((r) => { ready = r; });
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const nl = buf.indexOf('\r\n');
      if (nl < 0) return;
      const line = buf.subarray(0, nl).toString();
      if (line.startsWith('MSG ')) {
        const parts = line.split(' ');
        const len = Number(parts.at(-1));
        if (buf.length < nl + 2 + len + 2) return;
        sub.msgs.push({ subject: parts[1], data: buf.subarray(nl + 2, nl + 2 + len).toString() });
        buf = buf.subarray(nl + 2 + len + 2);
        continue;
      }
      buf = buf.subarray(nl + 2);
      if (line === 'PING') sock.write('PONG\r\n');
      if (line === 'PONG') ready();
    }
  });
  sock.write(`CONNECT {"verbose":false}\r\nSUB ${subject} 1\r\nPING\r\n`);
  sub.close = () => sock.destroy();
  await sub.ready;
  return sub;
}

/**
 * Stops reading `slowSocket` while the member `flooder` (key `key`) sends `updates` updates of
 * ~32 KB metas `{n, pad}` (640: ~20 MB of diffs; the kernel's buffers fill, a few MB on
 * loopback, then the server's outbound bound passes), then reads again. Resolves once the slow
 * client's view `slow` shows the last update, with the presence_states and presence_diffs it
 * got meanwhile. `inFlight` updates are sent at a time (each answered before the next batch).
 */
export async function stallThroughFlood(slowSocket, slow, flooder, key, updates = 640, inFlight = 40) {
  const got = { states: 0, diffs: 0 };
  slow.channel.on('presence_state', () => { got.states += 1; });
  slow.channel.on('presence_diff', () => { got.diffs += 1; });
  slowSocket.conn._socket.pause();
  const pad = 'p'.repeat(32_000);
  for (let i = 1; i <= updates; i += inFlight) {
    const batch = [];
    for (let j = i; j < Math.min(i + inFlight, updates + 1); j++) batch.push(push(flooder.channel, 'presence_update', { meta: { n: j, pad } }));
    const refused = (await Promise.all(batch)).find((r) => r.status !== 'ok');
    if (refused) throw new Error(`an update was refused: ${JSON.stringify(refused)}`);
  }
  slowSocket.conn._socket.resume();
  const seen = () => (slow.presence.list((k, p) => (k === key ? p.metas : null)).find(Boolean) || []).map((m) => m.n);
  await waitFor(() => seen().join() === String(updates), 15_000,
    () => `the slow client's view to end current; has ${JSON.stringify(seen())}`);
  return got;
}

/** An HS256 (or HS512) JWT over `claims`, as an application's backend would mint it. */
export function sign(claims, { secret, alg = 'HS256' }) {
  const b64url = (x) => Buffer.from(x).toString('base64url');
  const head = `${b64url(JSON.stringify({ alg, typ: 'JWT' }))}.${b64url(JSON.stringify(claims))}`;
  const mac = createHmac(alg === 'HS512' ? 'sha512' : 'sha256', secret).update(head).digest('base64url');
  return `${head}.${mac}`;
}

/**
 * A TCP proxy on a free loopback port to `targetPort`, which can cut every connection through
 * it and refuse new ones (`cut`) until `heal`: a network partition between one process and
 * another.
 */
export async function tcpProxy(targetPort) {
  const port = await freePort();
  const live = new Set();
  let cut = false;
  const server = createServer((inbound) => {
    if (cut) {
      inbound.destroy();
      return;
    }
    const outbound = tcpConnect(targetPort, '127.0.0.1');
    for (const s of [inbound, outbound]) {
      live.add(s);
      s.on('close', () => live.delete(s));
      s.on('error', () => {});
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
    inbound.on('close', () => outbound.destroy());
    outbound.on('close', () => inbound.destroy());
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    port,
    cut() {
      cut = true;
      for (const s of live) s.destroy();
    },
    heal() {
      cut = false;
    },
    close: () => new Promise((resolve) => {
      for (const s of live) s.destroy();
      server.close(resolve);
    }),
  };
}
