// How nodes reach a nats-server that wants more than a plain connection, each case with a real
// nats-server and two nodes whose phoenix clients see each other through it: a user and password
// in the URL, a token, an NKey (the node signs the server's nonce with the seed of its
// --nats-creds file), and TLS with a CA of the test's own (SSL_CERT_FILE, as for any system
// root). And the refusals an operator must be able to read: a wrong password, a server
// certificate nobody vouches for.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startNats, startNode, connect, join, keys, waitFor } from './harness.mjs';

const timing = ['--node-heartbeat-ms', '200', '--node-timeout-ms', '1000', '--diff-window-ms', '0'];
const dir = mkdtempSync(path.join(tmpdir(), 'roster-cluster-auth-'));
const running = [];
const sockets = [];
after(async () => {
  sockets.forEach((s) => s.disconnect());
  for (const p of running.reverse()) await p.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function nats(args) {
  const n = await startNats(args);
  running.push(n);
  return n;
}

async function node(n, name, args = [], opts = {}) {
  const started = await startNode(n, name, [...timing, ...args], opts);
  running.push(started);
  return started;
}

/** Two nodes through `n` (each started with `args` and `opts`) show each other's clients; a
 * cluster of their own (a prefix of their own), whoever else is on `n`. */
async function twoNodesSeeEachOther(n, topic, args = [], opts = {}) {
  const own = [...args, '--nats-prefix', topic.replace(/[^a-z]/g, '')];
  const a = await node(n, `${topic}-a`, own, opts);
  const b = await node(n, `${topic}-b`, own, opts);
  const open = (at, user) => {
    const s = connect(at, user);
    sockets.push(s);
    return s;
  };
  const x = await join(open(a, 'ann'), `room:${topic}`);
  const y = await join(open(b, 'ben'), `room:${topic}`);
  await waitFor(() => [x, y].every(({ presence }) => keys(presence).length === 2), 5000,
    () => `both see both: ${keys(x.presence)} / ${keys(y.presence)}`);
  assert.equal(await a.metric('roster_cluster_nodes_up'), 1);
}

test('a user and password in the URL, and a wrong one refused with the server\'s reason', async () => {
  const n = await nats(['--user', 'roster', '--pass', 's3cret']);
  const url = `nats://roster:s3cret@127.0.0.1:${n.port}`;
  await twoNodesSeeEachOther(n, 'userpass', [], { natsUrl: url });
  await assert.rejects(node(n, 'wrong', [], { natsUrl: `nats://roster:nope@127.0.0.1:${n.port}` }),
    /Authorization Violation/);
});

test('a token in the URL', async () => {
  const n = await nats(['--auth', 'tok-123']);
  await twoNodesSeeEachOther(n, 'token', [], { natsUrl: `nats://tok-123@127.0.0.1:${n.port}` });
});

// An NKey pair in NATS's encoding: base32 of a prefix byte, the key and a CRC-16 (XMODEM).
function base32(bytes) {
  const abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const b of bytes) {
    value = (value << 8) | b;
    bits += 8;
    while (bits >= 5) {
      out += abc[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += abc[(value << (5 - bits)) & 31];
  return out;
}
function crc16(bytes) {
  let crc = 0;
  for (const b of bytes) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i += 1) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}
function encodeKey(prefix, raw) {
  const body = Buffer.concat([Buffer.from(prefix), raw]);
  const crc = crc16(body);
  return base32(Buffer.concat([body, Buffer.from([crc & 0xff, crc >> 8])]));
}
function userNkey() {
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const seed = Buffer.from(privateKey.export({ format: 'jwk' }).d, 'base64url');
  const pub = Buffer.from(publicKey.export({ format: 'jwk' }).x, 'base64url');
  const USER = 20 << 3;
  const SEED = 18 << 3;
  return { public: encodeKey([USER], pub), seed: encodeKey([SEED | (USER >> 5), (USER & 31) << 3], seed) };
}

test('an NKey: the node signs the server\'s nonce with the seed of its --nats-creds file', async () => {
  const key = userNkey();
  assert.match(key.public, /^U[A-Z2-7]{55}$/);
  assert.match(key.seed, /^SU[A-Z2-7]{56}$/);
  const conf = path.join(dir, 'nkey.conf');
  writeFileSync(conf, `authorization { users = [ { nkey: "${key.public}" } ] }\n`);
  const n = await nats(['-c', conf]);
  const seedFile = path.join(dir, 'user.nk');
  writeFileSync(seedFile, `${key.seed}\n`);
  await twoNodesSeeEachOther(n, 'nkey', ['--nats-creds', seedFile]);
  // Another user's seed is not this server's user.
  const other = path.join(dir, 'other.nk');
  writeFileSync(other, `${userNkey().seed}\n`);
  await assert.rejects(node(n, 'stranger', ['--nats-creds', other]), /Authorization Violation/);
});

function certificates() {
  const ssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=roster test CA');
  ssl('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
  writeFileSync(path.join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  ssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'server.pem', '-days', '2', '-extfile', 'san.ext');
  return { ca: path.join(dir, 'ca.pem'), cert: path.join(dir, 'server.pem'), key: path.join(dir, 'server.key') };
}

test('TLS, asked by the URL or by the server, checked against the roots; an unknown CA refused', async () => {
  const pem = certificates();
  const n = await nats(['--tls', '--tlscert', pem.cert, '--tlskey', pem.key]);
  const env = { SSL_CERT_FILE: pem.ca };
  await twoNodesSeeEachOther(n, 'tls', [], { natsUrl: `tls://127.0.0.1:${n.port}`, env });
  // nats:// to a server whose INFO says TLS is required: upgraded all the same.
  await twoNodesSeeEachOther(n, 'tls-info', [], { env });
  // Without the test's CA among the roots the server is not believed.
  const empty = path.join(dir, 'no-roots.pem');
  writeFileSync(empty, '');
  await assert.rejects(node(n, 'unbelieving', [], { env: { SSL_CERT_FILE: empty } }),
    /TLS: .*(UnknownIssuer|certificate)/i);
});
