//! One connection to NATS, kept up: connects (TCP, TLS when the URL or the server asks, user and
//! password, token or a credentials file), pings, reconnects with a backoff to the next URL,
//! subscribes again after a reconnect, and hands the bridge what arrives on one queue for all
//! subscriptions. A subscription is an entry in a map (its id and subject), so a node can hold
//! one per topic and user its clients touch, hundreds of thousands of them.
//!
//! Must not: queue without bound. Publishing while down or past [`MAX_BACKLOG`] fails at once
//! (the bridge counts it and the next heartbeat tells the other nodes to fetch again); messages
//! past [`MAX_PENDING_IN`] (or [`MAX_PENDING_IN_BYTES`]) not yet taken by the bridge are
//! dropped and reported once as
//! [`Event::Dropped`], so the bridge fetches again instead of growing without end.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;

use super::wire::{self, Info, Msg, Parser, ServerOp};

/// Bytes to publish not yet written to the socket past which publishing fails.
pub const MAX_BACKLOG: usize = 64 * 1024 * 1024;
/// Messages received and not yet taken by the bridge past which they are dropped...
pub const MAX_PENDING_IN: usize = 262_144;
/// ... and their payload bytes (a part of a large topic is tens of KB).
pub const MAX_PENDING_IN_BYTES: usize = 64 * 1024 * 1024;
/// How long the server may stay silent, a ping unanswered, before the connection is taken for
/// dead. Anything read counts as life: a busy nats-server answers pings late (the million run
/// saw its read loop stall 2-12 s), and taking it for dead then costs a reconnect and every
/// part fetched again, which is the load that stalled it. A server that is gone closes the
/// socket, which is noticed at once.
const SILENCE: Duration = Duration::from_secs(10);

/// Where to connect, from a `--nats-url` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
}

impl Server {
    /// `nats://host:port`, `tls://host:port`, `host:port` or `host` (port 4222), with
    /// `user:password@` or `token@` before the host.
    pub fn parse(s: &str) -> Result<Server, String> {
        let with_scheme = if s.contains("://") {
            s.to_owned()
        } else {
            format!("nats://{s}")
        };
        let u = url::Url::parse(&with_scheme).map_err(|e| format!("{s}: {e}"))?;
        let tls = match u.scheme() {
            "nats" => false,
            "tls" => true,
            other => return Err(format!("{s}: scheme {other}:// (nats:// or tls://)")),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{s}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |p: &str| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        };
        let name = Some(decode(u.username())).filter(|n| !n.is_empty());
        let (user, pass, token) = match (name, u.password()) {
            (Some(n), Some(p)) => (Some(n), Some(decode(p)), None),
            (Some(n), None) => (None, None, Some(n)),
            (None, _) => (None, None, None),
        };
        Ok(Server {
            host,
            port: u.port().unwrap_or(4222),
            tls,
            user,
            pass,
            token,
        })
    }
}

/// A credentials file's user JWT and NKey seed, or an NKey seed alone.
#[derive(Clone)]
pub struct Creds {
    /// None for a bare NKey: the server then knows the user by its public key.
    jwt: Option<String>,
    seed: String,
    public_key: String,
}

impl Creds {
    /// The file `nsc` writes (the JWT and the seed, each between a BEGIN and an END line), or
    /// the one `nk -gen user` writes (the seed on a line of its own).
    pub fn parse(text: &str) -> Result<Creds, String> {
        let block = |what: &str| {
            let mut lines = text.lines().map(str::trim);
            lines.find(|l| l.starts_with("-----BEGIN") && l.contains(what))?;
            lines
                .find(|l| !l.is_empty())
                .filter(|l| !l.starts_with("---"))
                .map(str::to_owned)
        };
        let (jwt, seed) = if text.contains("-----BEGIN") {
            let jwt = block("JWT").ok_or("no user JWT")?;
            (Some(jwt), block("SEED").ok_or("no NKey seed")?)
        } else {
            let seed = text.lines().map(str::trim).find(|l| !l.is_empty());
            (None, seed.ok_or("empty")?.to_owned())
        };
        let key = nkeys::KeyPair::from_seed(&seed).map_err(|e| format!("bad NKey seed: {e}"))?;
        Ok(Creds {
            jwt,
            seed,
            public_key: key.public_key(),
        })
    }

    fn sign(&self, nonce: &str) -> Result<String, String> {
        use base64::Engine;
        let key = nkeys::KeyPair::from_seed(&self.seed).map_err(|e| e.to_string())?;
        let sig = key.sign(nonce.as_bytes()).map_err(|e| e.to_string())?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig))
    }
}

pub struct Options {
    pub servers: Vec<Server>,
    /// The connection's name as the server shows it.
    pub name: String,
    pub creds: Option<Creds>,
    pub ping_interval: Duration,
    pub connect_timeout: Duration,
}

/// The connection's traffic, for the metrics.
#[derive(Default, Debug)]
pub struct Counters {
    pub in_messages: AtomicU64,
    pub out_messages: AtomicU64,
    pub in_bytes: AtomicU64,
    pub out_bytes: AtomicU64,
    pub connects: AtomicU64,
}

/// What the connection tells the bridge.
#[derive(Debug)]
pub enum Event {
    Msg(Msg),
    Connected,
    Disconnected,
    /// Messages were dropped (the bridge fell [`MAX_PENDING_IN`] behind).
    Dropped,
    /// The server's `-ERR` (a permissions violation, say: the connection stays).
    ServerError(String),
}

enum Cmd {
    Pub {
        subject: String,
        reply: Option<String>,
        payload: Vec<u8>,
    },
    Sub(u64, String),
    Unsub(u64),
    Flush(oneshot::Sender<()>),
    Close,
}

/// What the bridge and the connection's task both see.
struct Shared {
    connected: AtomicBool,
    /// Payload bytes handed over and not yet written.
    queued: AtomicUsize,
    /// Messages handed to the bridge and not yet taken, and their payload bytes.
    pending_in: AtomicUsize,
    pending_in_bytes: AtomicUsize,
    max_payload: AtomicUsize,
    counters: Arc<Counters>,
}

/// The bridge's handle on the connection; the connection itself is a task of the runtime.
pub struct Link {
    cmds: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Shared>,
    next_sid: u64,
}

impl Link {
    /// Connects (to the first server that answers, each tried once) and starts the
    /// connection's task. Reconnects after this are the task's.
    pub async fn connect(options: Options, counters: Arc<Counters>) -> Result<Link, String> {
        if options.servers.is_empty() {
            return Err("no NATS server".into());
        }
        let tls = tls_config()?;
        let mut failures = Vec::new();
        let mut first = None;
        for (i, server) in options.servers.iter().enumerate() {
            match open(server, &options, &tls).await {
                Ok(c) => {
                    first = Some((i, c));
                    break;
                }
                Err(e) => failures.push(format!("{}:{}: {e}", server.host, server.port)),
            }
        }
        let Some((index, first)) = first else {
            return Err(failures.join("; "));
        };
        let shared = Arc::new(Shared {
            connected: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            pending_in: AtomicUsize::new(0),
            pending_in_bytes: AtomicUsize::new(0),
            max_payload: AtomicUsize::new(first.info.max_payload),
            counters,
        });
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = Task {
            options,
            tls,
            shared: shared.clone(),
            cmds: cmd_rx,
            events: events_tx,
            subs: HashMap::new(),
            server: index,
            overflowing: false,
        };
        tokio::spawn(task.run(first));
        Ok(Link {
            cmds,
            events,
            shared,
            next_sid: 1,
        })
    }

    /// The next event; cancel-safe.
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.events.recv().await;
        if let Some(Event::Msg(m)) = &e {
            self.shared.pending_in.fetch_sub(1, Ordering::Relaxed);
            let bytes = &self.shared.pending_in_bytes;
            bytes.fetch_sub(m.payload.len(), Ordering::Relaxed);
        }
        e
    }

    /// A new subscription's id. While disconnected it is sent on reconnect.
    pub fn subscribe(&mut self, subject: String) -> u64 {
        let sid = self.next_sid;
        self.next_sid += 1;
        let _ = self.cmds.send(Cmd::Sub(sid, subject));
        sid
    }

    pub fn unsubscribe(&self, sid: u64) {
        let _ = self.cmds.send(Cmd::Unsub(sid));
    }

    /// False if it was not sent: disconnected, or [`MAX_BACKLOG`] waiting to be written.
    pub fn publish(&self, subject: String, reply: Option<String>, payload: Vec<u8>) -> bool {
        if !self.is_connected() || self.shared.queued.load(Ordering::Relaxed) >= MAX_BACKLOG {
            return false;
        }
        self.shared
            .queued
            .fetch_add(payload.len(), Ordering::Relaxed);
        let sent = self.cmds.send(Cmd::Pub {
            subject,
            reply,
            payload,
        });
        sent.is_ok()
    }

    /// Waits until the server has read everything published so far (a ping's pong).
    pub async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Flush(tx)).is_ok() && rx.await.is_ok()
    }

    /// Ends the connection once what is queued is written (a bounded wait).
    pub fn close(&self) {
        let _ = self.cmds.send(Cmd::Close);
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn max_payload(&self) -> usize {
        self.shared.max_payload.load(Ordering::Relaxed)
    }

    /// A subject no other client's inbox has: where this node's requests want answers.
    pub fn new_inbox(&self) -> String {
        format!(
            "_INBOX.{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        )
    }
}

/// Anything the connection reads and writes: a TCP stream or TLS over one.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection just made: the handshake is done, `parser` holds what came after the `PONG`.
struct Opened {
    io: Box<dyn Io>,
    parser: Parser,
    info: Info,
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots (SSL_CERT_FILE and SSL_CERT_DIR are honoured); unreadable ones are
    // skipped, as a server whose root is missing fails its handshake with a clear error.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects and shakes hands (`INFO`, TLS if wanted, `CONNECT`, `PING` answered by `PONG`),
/// all within the connect timeout.
async fn open(
    server: &Server,
    options: &Options,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Opened, String> {
    let shake = async {
        let tcp = TcpStream::connect((server.host.as_str(), server.port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let mut io: Box<dyn Io> = Box::new(tcp);
        let mut parser = Parser::default();
        let info = loop {
            match read_op(&mut io, &mut parser).await? {
                ServerOp::Info(json) => break Info::parse(&json).map_err(|e| e.to_string())?,
                ServerOp::Err(e) => return Err(e),
                _ => {}
            }
        };
        if server.tls || info.tls_required {
            let tcp_io = io;
            let name = rustls::pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| format!("TLS server name {}: {e}", server.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp_io)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            io = Box::new(stream);
        }
        let sig = match (&options.creds, &info.nonce) {
            (Some(c), Some(nonce)) => Some(c.sign(nonce)?),
            _ => None,
        };
        let connect = wire::Connect {
            verbose: false,
            pedantic: false,
            lang: "rust (roster)",
            version: env!("CARGO_PKG_VERSION"),
            protocol: 1,
            name: options.name.clone(),
            headers: true,
            no_responders: true,
            echo: true,
            user: server.user.clone(),
            pass: server.pass.clone(),
            auth_token: server.token.clone(),
            jwt: options.creds.as_ref().and_then(|c| c.jwt.clone()),
            nkey: options
                .creds
                .as_ref()
                .filter(|c| c.jwt.is_none())
                .map(|c| c.public_key.clone()),
            sig,
        };
        let mut out = BytesMut::new();
        wire::connect(&mut out, &connect);
        out.extend_from_slice(wire::PING);
        io.write_all(&out).await.map_err(|e| e.to_string())?;
        loop {
            match read_op(&mut io, &mut parser).await? {
                ServerOp::Pong => break,
                ServerOp::Ping => io.write_all(wire::PONG).await.map_err(|e| e.to_string())?,
                ServerOp::Err(e) => return Err(e),
                _ => {}
            }
        }
        Ok(Opened { io, parser, info })
    };
    tokio::time::timeout(options.connect_timeout, shake)
        .await
        .map_err(|_| format!("no answer within {:?}", options.connect_timeout))?
}

async fn read_op(io: &mut Box<dyn Io>, parser: &mut Parser) -> Result<ServerOp, String> {
    loop {
        if let Some(op) = parser.next().map_err(|e| e.to_string())? {
            return Ok(op);
        }
        let n = io
            .read_buf(parser.buffer())
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
    }
}

/// A command while disconnected; false when the link is closed.
fn offline(subs: &mut HashMap<u64, String>, shared: &Shared, c: Option<Cmd>) -> bool {
    match c {
        None | Some(Cmd::Close) => return false,
        Some(Cmd::Sub(sid, subject)) => {
            subs.insert(sid, subject);
        }
        Some(Cmd::Unsub(sid)) => {
            subs.remove(&sid);
        }
        Some(Cmd::Pub { payload, .. }) => {
            shared.queued.fetch_sub(payload.len(), Ordering::Relaxed);
        }
        // Dropping the sender fails the flush.
        Some(Cmd::Flush(_)) => {}
    }
    true
}

/// Why a connection ended.
enum Ended {
    /// The bridge closed the link.
    Closed,
    Lost(String),
}

/// The connection's task.
struct Task {
    options: Options,
    tls: Arc<rustls::ClientConfig>,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::UnboundedSender<Event>,
    /// Every live subscription, to subscribe again after a reconnect.
    subs: HashMap<u64, String>,
    /// The server connected to (or tried last).
    server: usize,
    /// Messages are being dropped: [`Event::Dropped`] has been said.
    overflowing: bool,
}

impl Task {
    async fn run(mut self, first: Opened) {
        let mut opened = Some(first);
        loop {
            let conn = match opened.take() {
                Some(c) => c,
                None => match self.reconnect().await {
                    Some(c) => c,
                    None => return,
                },
            };
            match self.serve(conn).await {
                Ended::Closed => return,
                Ended::Lost(why) => {
                    self.shared.connected.store(false, Ordering::Relaxed);
                    let s = &self.options.servers[self.server];
                    tracing::warn!(server = %format_args!("{}:{}", s.host, s.port), "NATS connection lost: {why}");
                    let _ = self.events.send(Event::Disconnected);
                }
            }
        }
    }

    /// Tries the servers in turn, with a growing pause, until one answers (`None`: closed
    /// meanwhile). The bridge's commands are taken as they come: subscriptions are recorded,
    /// publications dropped.
    async fn reconnect(&mut self) -> Option<Opened> {
        let mut attempts: u64 = 0;
        loop {
            attempts += 1;
            self.server = (self.server + 1) % self.options.servers.len();
            // Back soon after a NATS restart, well within the isolation grace.
            let pause = Duration::from_millis((attempts * 200).min(2_000));
            let server = self.options.servers[self.server].clone();
            let (options, tls) = (&self.options, &self.tls);
            let attempt = async {
                tokio::time::sleep(pause).await;
                open(&server, options, tls).await
            };
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    c = self.cmds.recv() => {
                        if !offline(&mut self.subs, &self.shared, c) {
                            return None;
                        }
                    }
                }
            };
            match result {
                Ok(c) => return Some(c),
                Err(e) => tracing::debug!(
                    server = %format_args!("{}:{}", server.host, server.port),
                    "NATS reconnect failed: {e}"
                ),
            }
        }
    }

    async fn serve(&mut self, conn: Opened) -> Ended {
        let Opened {
            io,
            mut parser,
            info,
        } = conn;
        self.shared
            .max_payload
            .store(info.max_payload, Ordering::Relaxed);
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut out = BytesMut::new();
        for (sid, subject) in &self.subs {
            wire::sub(&mut out, subject, *sid);
        }
        // Bytes of `out` written so far over this connection.
        let mut written = 0usize;
        self.shared.connected.store(true, Ordering::Relaxed);
        self.shared
            .counters
            .connects
            .fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Event::Connected);
        // Each ping's pong, in order; a flush waits for its own.
        let mut pongs: VecDeque<Option<oneshot::Sender<()>>> = VecDeque::new();
        let mut ping = tokio::time::interval(self.options.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut last_read = tokio::time::Instant::now();
        // Publications in `out` not yet wholly written (where each ends, its payload's length),
        // to give back to `queued` as they go.
        let mut unwritten: VecDeque<(usize, usize)> = VecDeque::new();
        let ended = 'conn: loop {
            tokio::select! {
                r = rd.read_buf(parser.buffer()) => match r {
                    Ok(0) => break 'conn Ended::Lost("closed by the server".into()),
                    Err(e) => break 'conn Ended::Lost(e.to_string()),
                    Ok(_) => {
                        last_read = tokio::time::Instant::now();
                        loop {
                            match parser.next() {
                                Ok(Some(op)) => {
                                    // A pong answers the oldest ping; a flush waits on it.
                                    if self.server_op(op, &mut out) {
                                        if let Some(Some(tx)) = pongs.pop_front() {
                                            let _ = tx.send(());
                                        }
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => break 'conn Ended::Lost(e.to_string()),
                            }
                        }
                    }
                },
                w = wr.write(&out), if !out.is_empty() => match w {
                    Ok(n) => {
                        out.advance(n);
                        written += n;
                        // Give back the payload of every publication now wholly written.
                        while let Some(&(end, len)) = unwritten.front() {
                            if end > written {
                                break;
                            }
                            unwritten.pop_front();
                            self.shared.queued.fetch_sub(len, Ordering::Relaxed);
                        }
                    }
                    Err(e) => break 'conn Ended::Lost(e.to_string()),
                },
                c = self.cmds.recv() => match c {
                    None | Some(Cmd::Close) => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), wr.write_all(&out)).await;
                        let _ = wr.shutdown().await;
                        break 'conn Ended::Closed;
                    }
                    Some(Cmd::Pub { subject, reply, payload }) => {
                        let c = &self.shared.counters;
                        c.out_messages.fetch_add(1, Ordering::Relaxed);
                        c.out_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                        wire::publish(&mut out, &subject, reply.as_deref(), &payload);
                        unwritten.push_back((written + out.len(), payload.len()));
                    }
                    Some(Cmd::Sub(sid, subject)) => {
                        wire::sub(&mut out, &subject, sid);
                        self.subs.insert(sid, subject);
                    }
                    Some(Cmd::Unsub(sid)) => {
                        if self.subs.remove(&sid).is_some() {
                            wire::unsub(&mut out, sid);
                        }
                    }
                    Some(Cmd::Flush(tx)) => {
                        out.extend_from_slice(wire::PING);
                        pongs.push_back(Some(tx));
                    }
                },
                _ = ping.tick() => {
                    if !pongs.is_empty() && last_read.elapsed() >= SILENCE {
                        break 'conn Ended::Lost(format!("nothing from the server for {SILENCE:?}, a ping unanswered"));
                    }
                    out.extend_from_slice(wire::PING);
                    pongs.push_back(None);
                }
            }
        };
        self.give_back(&unwritten);
        ended
    }

    /// What a lost connection had not written is not queued any more.
    fn give_back(&self, unwritten: &VecDeque<(usize, usize)>) {
        let len: usize = unwritten.iter().map(|&(_, l)| l).sum();
        self.shared.queued.fetch_sub(len, Ordering::Relaxed);
    }

    /// One operation from the server; true for a pong.
    fn server_op(&mut self, op: ServerOp, out: &mut BytesMut) -> bool {
        match op {
            ServerOp::Msg(m) => {
                let c = &self.shared.counters;
                c.in_messages.fetch_add(1, Ordering::Relaxed);
                c.in_bytes
                    .fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                let pending = self.shared.pending_in.load(Ordering::Relaxed);
                let bytes = self.shared.pending_in_bytes.load(Ordering::Relaxed);
                if pending >= MAX_PENDING_IN || bytes >= MAX_PENDING_IN_BYTES {
                    if !self.overflowing {
                        self.overflowing = true;
                        let _ = self.events.send(Event::Dropped);
                    }
                    return false;
                }
                if pending < MAX_PENDING_IN / 2 && bytes < MAX_PENDING_IN_BYTES / 2 {
                    self.overflowing = false;
                }
                self.shared.pending_in.fetch_add(1, Ordering::Relaxed);
                let len = m.payload.len();
                self.shared
                    .pending_in_bytes
                    .fetch_add(len, Ordering::Relaxed);
                let _ = self.events.send(Event::Msg(m));
                false
            }
            ServerOp::Ping => {
                out.extend_from_slice(wire::PONG);
                false
            }
            ServerOp::Pong => true,
            ServerOp::Info(json) => {
                if let Ok(info) = Info::parse(&json) {
                    self.shared
                        .max_payload
                        .store(info.max_payload, Ordering::Relaxed);
                }
                false
            }
            ServerOp::Ok => false,
            ServerOp::Err(e) => {
                let _ = self.events.send(Event::ServerError(e));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_as_operators_write_them() {
        let s = Server::parse("nats://alice:s%40cret@127.0.0.1:4300").unwrap();
        assert_eq!(
            s,
            Server {
                host: "127.0.0.1".into(),
                port: 4300,
                tls: false,
                user: Some("alice".into()),
                pass: Some("s@cret".into()),
                token: None,
            }
        );
        let s = Server::parse("tls://tok@nats.example.com").unwrap();
        assert!(s.tls && s.port == 4222 && s.token.as_deref() == Some("tok") && s.user.is_none());
        let s = Server::parse("localhost:4223").unwrap();
        assert_eq!((s.host.as_str(), s.port, s.tls), ("localhost", 4223, false));
        assert_eq!(Server::parse("[::1]:4222").unwrap().host, "::1");
        assert!(Server::parse("http://x:1").is_err());
        assert!(Server::parse("nats://:1").is_err());
    }

    #[test]
    fn a_credentials_file_gives_its_jwt_and_signs_with_its_seed() {
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().unwrap();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAi.abc.def\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let creds = Creds::parse(&text).unwrap();
        assert_eq!(creds.jwt.as_deref(), Some("eyJ0eXAi.abc.def"));
        let sig = creds.sign("nonce-1").unwrap();
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        key.verify(b"nonce-1", &raw).unwrap();
        assert!(Creds::parse("-----BEGIN NATS USER JWT-----\nx\n").is_err());
        // A bare seed: the server knows the user by its public key.
        let bare = Creds::parse(&format!("\n{seed}\n")).unwrap();
        assert!(bare.jwt.is_none());
        assert_eq!(bare.public_key, key.public_key());
        assert!(Creds::parse("SUNOTASEED\n").is_err());
    }
}
