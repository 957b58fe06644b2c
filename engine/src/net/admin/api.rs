//! What each admin request is answered with: `/healthz`, `/metrics`, and the read API
//! `/api/topics/TOPIC` and `/api/users/KEY`, whose answers come from the owning shard's board
//! inbox within a tick. No sockets here: requests in, responses (or a wait for a shard) out.

use std::fmt::Write as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::collections::HashSet;

use roster_proto::encode::PresenceMap;
use roster_proto::meta::write_json_str;
use roster_proto::PhxRef;

use crate::cluster::frame::{Kind, Presence};
use crate::cluster::lookup::Found;
use crate::core::{Meta, TopicName};
use crate::net::admin::board::{Query, Shown};
use crate::net::admin::{actions, metrics, Admin};
use crate::net::handshake::reason_phrase;
use crate::net::nats::ToBridge;

/// How long a shard gets to answer an API query before the client gets 503.
const SHARD_WAIT: Duration = Duration::from_secs(2);

pub struct Response {
    pub status: u16,
    pub kind: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            kind: "text/plain",
            body: body.to_owned(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let reason = reason_phrase(self.status);
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.kind,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// A query handed to a shard (and in a cluster maybe on to the NATS bridge), not answered yet.
pub struct Pending {
    asked: Asked,
    stage: Stage,
    since: Instant,
}

enum Asked {
    Topic { topic: String, limit: Option<usize> },
    User { key: String },
}

enum Stage {
    Shard(mpsc::Receiver<Shown>),
    /// The shard's answer is not the whole cluster's: the other nodes' presences are being
    /// looked up.
    Cluster(Shown, mpsc::Receiver<Found>),
}

pub enum Answer {
    Now(Response),
    Later(Pending),
}

impl Pending {
    fn new(asked: Asked, rx: mpsc::Receiver<Shown>, since: Instant) -> Pending {
        Pending {
            asked,
            stage: Stage::Shard(rx),
            since,
        }
    }

    /// The response once the shard (and the cluster) have answered, or have taken too long.
    pub fn poll(
        &mut self,
        now: Instant,
        bridge: Option<&flume::Sender<ToBridge>>,
    ) -> Option<Response> {
        let failed = |why: &str| Some(Response::text(503, why));
        match &mut self.stage {
            Stage::Shard(rx) => match rx.try_recv() {
                Ok(shown) => {
                    let Some(bridge) = bridge.filter(|_| !shown.whole) else {
                        return Some(self.respond(shown.presences, true));
                    };
                    let (kind, name) = match &self.asked {
                        Asked::Topic { topic, .. } => (Kind::Topic, topic.clone()),
                        Asked::User { key } => (Kind::User, key.clone()),
                    };
                    let (tx, rx) = mpsc::channel();
                    if bridge.try_send(ToBridge::Lookup(kind, name, tx)).is_err() {
                        return failed("the cluster link is busy\n");
                    }
                    self.stage = Stage::Cluster(shown, rx);
                }
                Err(mpsc::TryRecvError::Disconnected) => return failed("shard did not answer\n"),
                Err(mpsc::TryRecvError::Empty) => {}
            },
            Stage::Cluster(shown, rx) => match rx.try_recv() {
                Ok(found) => {
                    let mut presences = std::mem::take(&mut shown.presences);
                    merge(&mut presences, found.presences);
                    return Some(self.respond(presences, found.complete));
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    return failed("the cluster link is down\n")
                }
                Err(mpsc::TryRecvError::Empty) => {}
            },
        }
        if now.duration_since(self.since) >= SHARD_WAIT {
            return failed("shard did not answer\n");
        }
        None
    }

    fn respond(&self, presences: Vec<(String, Meta)>, complete: bool) -> Response {
        let body = match &self.asked {
            Asked::Topic { topic, limit } => topic_json(topic, &presences, *limit, complete),
            Asked::User { key } => user_json(key, &presences, complete),
        };
        Response {
            status: 200,
            kind: "application/json",
            body,
        }
    }
}

/// Adds the other nodes' presences to this node's, sorted by name as the shard's are; a
/// presence both hold (it moved between the reads) shows once.
fn merge(mine: &mut Vec<(String, Meta)>, others: Vec<Presence>) {
    if others.is_empty() {
        return;
    }
    let held: HashSet<_> = mine.iter().map(|(_, m)| m.ref_text()).collect();
    for p in others {
        if !held.contains(&PhxRef(p.phx_ref).text()) {
            mine.push((p.key, Meta::new(&p.meta)));
        }
    }
    mine.sort_by(|a, b| a.0.cmp(&b.0));
}

/// Compares without stopping at the first difference, so timing does not tell how much of a
/// guessed key was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers a complete request (`body`: its Content-Length bytes).
pub fn answer(admin: &Admin, req: &httparse::Request<'_, '_>, body: &[u8], now: Instant) -> Answer {
    let method = req.method.unwrap_or("GET");
    let path = req.path.unwrap_or("/");
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if route == "/healthz" && method == "GET" {
        return Answer::Now(Response::text(200, "ok\n"));
    }
    let authorized = match &admin.api_key {
        None => true,
        Some(key) => req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("authorization"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|given| same_bytes(given.as_bytes(), key)),
    };
    if !authorized {
        return Answer::Now(Response::text(401, "missing or wrong API key\n"));
    }
    if method != "GET" {
        return Answer::Now(actions::act(admin, method, route, body));
    }
    if route == "/metrics" {
        return Answer::Now(Response {
            status: 200,
            kind: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: metrics::render(&admin.board),
        });
    }
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    if let Some(topic) = route.strip_prefix("/api/topics/") {
        let topic = decoded(topic);
        let limit = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "limit")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let owner = admin.router.topic_owner(&topic).index();
        let (tx, rx) = mpsc::channel();
        ask(admin, owner, Query::Topic(TopicName::new(&topic), tx));
        return Answer::Later(Pending::new(Asked::Topic { topic, limit }, rx, now));
    }
    if let Some(key) = route.strip_prefix("/api/users/") {
        let key = decoded(key);
        let owner = admin.router.user_owner(&key).index();
        let (tx, rx) = mpsc::channel();
        ask(admin, owner, Query::User(key.clone(), tx));
        return Answer::Later(Pending::new(Asked::User { key }, rx, now));
    }
    Answer::Now(Response::text(404, "no such endpoint\n"))
}

/// Leaves a query in the shard's inbox, for its next tick.
pub(super) fn ask(admin: &Admin, shard: usize, q: Query) {
    if let Some(board) = admin.board.shards.get(shard) {
        board
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(q);
    }
}

fn topic_json(
    topic: &str,
    presences: &[(String, Meta)],
    limit: Option<usize>,
    complete: bool,
) -> String {
    let keys = presences.chunk_by(|a, b| a.0 == b.0).count();
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"topic\":");
    write_json_str(&mut out, topic);
    let _ = write!(
        Text(&mut out),
        ",\"keys\":{keys},\"metas\":{},",
        presences.len()
    );
    partial(&mut out, complete);
    out.extend_from_slice(b"\"presences\":");
    let mut map = PresenceMap::new(&mut out);
    for same_key in presences
        .chunk_by(|a, b| a.0 == b.0)
        .take(limit.unwrap_or(usize::MAX))
    {
        map.key(&same_key[0].0);
        for (_, m) in same_key {
            map.meta(m.bytes());
        }
    }
    map.finish();
    out.push(b'}');
    // Every part is JSON written from strings and validated metas.
    String::from_utf8_lossy(&out).into_owned()
}

/// In a cluster, a lookup that some holder did not answer in time says so.
fn partial(out: &mut Vec<u8>, complete: bool) {
    if !complete {
        out.extend_from_slice(b"\"partial\":true,");
    }
}

fn user_json(key: &str, presences: &[(String, Meta)], complete: bool) -> String {
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"key\":");
    write_json_str(&mut out, key);
    let _ = write!(Text(&mut out), ",\"online\":{},", !presences.is_empty());
    partial(&mut out, complete);
    out.extend_from_slice(b"\"presences\":[");
    for (i, (topic, meta)) in presences.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"topic\":");
        write_json_str(&mut out, topic);
        out.extend_from_slice(b",\"meta\":");
        out.extend_from_slice(meta.bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    String::from_utf8_lossy(&out).into_owned()
}

/// `fmt::Write` into bytes.
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
