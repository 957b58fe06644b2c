//! The admin listener: `/healthz`, `/metrics` (Prometheus text, prometheus-client), and the
//! read API `/api/topics/TOPIC` and `/api/users/KEY`. It runs on threads of its own (an accept
//! thread, a short-lived thread per request), off the shards: shards publish their figures to a
//! [`Board`] once a second and answer API queries from their board inbox on the next tick (so an
//! API answer takes up to one tick). Nothing here touches a shard's state directly, and nothing
//! here is on the presence path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use roster_proto::encode::PresenceMap;
use roster_proto::meta::write_json_str;

use crate::core::{Meta, ShardStats, TopicName, TopicView};
use crate::mesh::Router;

/// What a shard answers for the API.
pub enum Query {
    Topic(TopicName, mpsc::Sender<Option<TopicView>>),
    User(String, mpsc::Sender<Vec<(TopicName, Meta)>>),
}

/// One shard's published figures (gauges and counters since start).
#[derive(Default)]
pub struct ShardBoard {
    figures: [AtomicU64; FIGURES.len()],
    /// Counts by reason: (metric, reason, count).
    reasons: Mutex<Vec<(&'static str, &'static str, u64)>>,
    inbox: Mutex<Vec<Query>>,
}

/// Metrics counted by reason.
pub const ERRORS: &str = "errors";
pub const REFUSALS: &str = "handshake_refusals";
const REASON_HELP: [(&str, &str); 2] = [
    (
        ERRORS,
        "Error replies and closes sent to clients, by reason",
    ),
    (REFUSALS, "Upgrade requests refused, by reason"),
];

/// Every figure a shard publishes: (metric name, help, is a counter).
pub const FIGURES: [(&str, &str, bool); 16] = [
    ("roster_connections", "Open client connections", false),
    (
        "roster_topics",
        "Topics owned (with presences or subscribers)",
        false,
    ),
    (
        "roster_presences",
        "Presences tracked in owned topics",
        false,
    ),
    ("roster_users", "User keys owned with a presence", false),
    (
        "roster_watched_users",
        "Users with a watch replica on this shard",
        false,
    ),
    (
        "roster_ring_backlog",
        "Messages waiting for the rings to other shards",
        false,
    ),
    ("roster_accepted", "Connections accepted", true),
    (
        "roster_handshake_failures",
        "Upgrade requests refused or abandoned",
        true,
    ),
    (
        "roster_accept_errors",
        "accept() failures (out of descriptors)",
        true,
    ),
    ("roster_messages_in", "Client text messages received", true),
    ("roster_frames_out", "Frames queued to clients", true),
    (
        "roster_diffs",
        "Presence diffs encoded (one per topic flush)",
        true,
    ),
    (
        "roster_diffs_coalesced",
        "Flushes held back by a coalescing window",
        true,
    ),
    (
        "roster_resyncs",
        "Slow consumers whose diffs were dropped for a fresh state",
        true,
    ),
    (
        "roster_slow_closes",
        "Slow consumers closed for not reading (1008)",
        true,
    ),
    (
        "roster_heartbeat_closes",
        "Connections closed for sending nothing (1000)",
        true,
    ),
];

/// Index of a figure in [`FIGURES`].
#[derive(Clone, Copy)]
pub enum Figure {
    Connections,
    Topics,
    Presences,
    Users,
    WatchedUsers,
    RingBacklog,
    Accepted,
    HandshakeFailures,
    AcceptErrors,
    MessagesIn,
    FramesOut,
    Diffs,
    DiffsCoalesced,
    Resyncs,
    SlowCloses,
    HeartbeatCloses,
}

impl ShardBoard {
    pub fn set(&self, f: Figure, v: u64) {
        self.figures[f as usize].store(v, Ordering::Relaxed);
    }

    fn get(&self, i: usize) -> u64 {
        self.figures[i].load(Ordering::Relaxed)
    }

    /// The core's own figures.
    pub fn publish_core(&self, s: &ShardStats) {
        self.set(Figure::Connections, s.connections as u64);
        self.set(Figure::Topics, s.topics_owned as u64);
        self.set(Figure::Presences, s.presences_owned as u64);
        self.set(Figure::Users, s.users_owned as u64);
        self.set(Figure::WatchedUsers, s.watched_users as u64);
        self.set(Figure::Diffs, s.diffs_sent);
        self.set(Figure::DiffsCoalesced, s.diffs_coalesced);
    }

    /// Replaces this shard's counts by reason.
    pub fn publish_reasons(
        &self,
        counts: impl IntoIterator<Item = (&'static str, &'static str, u64)>,
    ) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        reasons.clear();
        reasons.extend(counts);
    }

    /// Queries waiting for this shard.
    pub fn take_queries(&self) -> Vec<Query> {
        std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Every shard's board, shared with the admin thread.
pub struct Board {
    pub shards: Vec<ShardBoard>,
}

impl Board {
    pub fn new(shards: usize) -> Arc<Board> {
        Arc::new(Board {
            shards: (0..shards).map(|_| ShardBoard::default()).collect(),
        })
    }
}

/// What the admin thread needs.
pub struct Admin {
    pub board: Arc<Board>,
    pub router: Router,
    pub api_key: Option<Vec<u8>>,
}

/// Compares without stopping at the first difference, so timing does not tell how much of a
/// guessed key was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A label value in Prometheus text format: backslash, quote and newline escaped (reasons are
/// PROTOCOL.md's texts, some of which quote).
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds the admin listener (so a bad address fails at start-up) and serves it on its own
/// thread until the process ends.
pub fn start(addr: SocketAddr, admin: Admin) -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = Arc::new(admin);
    let busy = Arc::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name("roster-admin".into())
        .spawn(move || {
            for mut stream in listener.incoming().flatten() {
                // A thread per request, a few at most: a client that dribbles its request or
                // never reads the answer holds only its own thread, never /healthz.
                let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
                let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
                if busy.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS {
                    busy.fetch_sub(1, Ordering::Relaxed);
                    let _ = respond(&mut stream, 503, "text/plain", "busy\n");
                    continue;
                }
                let (admin, busy) = (admin.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("roster-admin-req".into())
                    .spawn(move || {
                        let _ = serve(&admin, stream);
                        busy.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    // No thread to be had: the request is dropped; the next one may succeed.
                    continue;
                }
            }
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(bound)
}

/// Requests served at once; more get 503.
const MAX_REQUESTS: u64 = 16;
/// The whole request must arrive within this, and each write of the answer too.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn serve(admin: &Admin, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    let (path, authorized) = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return respond(&mut stream, 400, "text/plain", "request too slow\n");
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") {
                    return respond(&mut stream, 405, "text/plain", "only GET\n");
                }
                let auth = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok());
                let authorized = match &admin.api_key {
                    None => true,
                    Some(key) => auth
                        .and_then(|a| a.strip_prefix("Bearer "))
                        .is_some_and(|given| same_bytes(given.as_bytes(), key)),
                };
                break (req.path.unwrap_or("/").to_owned(), authorized);
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 << 10 => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n"),
        }
    };
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    if route == "/healthz" {
        return respond(&mut stream, 200, "text/plain", "ok\n");
    }
    if !authorized {
        return respond(&mut stream, 401, "text/plain", "missing or wrong API key\n");
    }
    if route == "/metrics" {
        let body = metrics(&admin.board);
        return respond(
            &mut stream,
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &body,
        );
    }
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    if let Some(topic) = route.strip_prefix("/api/topics/") {
        let limit = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "limit")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        return match topic_json(admin, &decoded(topic), limit) {
            Some(body) => respond(&mut stream, 200, "application/json", &body),
            None => respond(&mut stream, 503, "text/plain", "shard did not answer\n"),
        };
    }
    if let Some(key) = route.strip_prefix("/api/users/") {
        return match user_json(admin, &decoded(key)) {
            Some(body) => respond(&mut stream, 200, "application/json", &body),
            None => respond(&mut stream, 503, "text/plain", "shard did not answer\n"),
        };
    }
    respond(&mut stream, 404, "text/plain", "no such endpoint\n")
}

fn respond(stream: &mut TcpStream, status: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Asks the shard that owns it, waiting at most a few ticks.
fn ask<T>(admin: &Admin, shard: usize, make: impl FnOnce(mpsc::Sender<T>) -> Query) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    let board = admin.board.shards.get(shard)?;
    board
        .inbox
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(make(tx));
    rx.recv_timeout(Duration::from_secs(2)).ok()
}

fn topic_json(admin: &Admin, topic: &str, limit: Option<usize>) -> Option<String> {
    let owner = admin.router.topic_owner(topic).index();
    let name = TopicName::new(topic);
    let view = ask(admin, owner, |tx| Query::Topic(name, tx))?;
    let presences = view.map(|v| v.presences).unwrap_or_default();
    let metas: usize = presences.iter().map(|(_, m)| m.len()).sum();
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"topic\":");
    write_json_str(&mut out, topic);
    let _ = write!(
        Text(&mut out),
        ",\"keys\":{},\"metas\":{metas},\"presences\":",
        presences.len()
    );
    let mut map = PresenceMap::new(&mut out);
    for (key, metas) in presences.iter().take(limit.unwrap_or(usize::MAX)) {
        map.key(key.as_str());
        for m in metas {
            map.meta(m.bytes());
        }
    }
    map.finish();
    out.push(b'}');
    String::from_utf8(out).ok()
}

fn user_json(admin: &Admin, key: &str) -> Option<String> {
    let owner = admin.router.user_owner(key).index();
    let presences = ask(admin, owner, |tx| Query::User(key.to_owned(), tx))?;
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"key\":");
    write_json_str(&mut out, key);
    let _ = write!(
        Text(&mut out),
        ",\"online\":{},\"presences\":[",
        !presences.is_empty()
    );
    for (i, (topic, meta)) in presences.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"topic\":");
        write_json_str(&mut out, topic.as_str());
        out.extend_from_slice(b",\"meta\":");
        out.extend_from_slice(meta.bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    String::from_utf8(out).ok()
}

/// `fmt::Write` into bytes.
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn metrics(board: &Board) -> String {
    let mut registry = Registry::with_prefix("roster");
    for (i, (name, help, counter)) in FIGURES.iter().enumerate() {
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        for (s, shard) in board.shards.iter().enumerate() {
            family
                .get_or_create(&vec![("shard".to_owned(), s.to_string())])
                .set(shard.get(i) as i64);
        }
        // Counters are exposed as gauges of their running totals (they only grow); the
        // `_total` in the name says so.
        let name = if *counter {
            format!("{}_total", name.trim_start_matches("roster_"))
        } else {
            name.trim_start_matches("roster_").to_owned()
        };
        registry.register(name, *help, family);
    }
    for (metric, help) in REASON_HELP {
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        for (s, shard) in board.shards.iter().enumerate() {
            let reasons = shard.reasons.lock().unwrap_or_else(|e| e.into_inner());
            for (_, reason, n) in reasons.iter().filter(|(m, _, _)| *m == metric) {
                let labels = vec![
                    ("shard".to_owned(), s.to_string()),
                    ("reason".to_owned(), label_value(reason)),
                ];
                family.get_or_create(&labels).set(*n as i64);
            }
        }
        registry.register(format!("{metric}_total"), help, family);
    }
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out
}
