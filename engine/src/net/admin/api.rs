//! What each admin request is answered with: `/healthz`, `/metrics`, and the read API
//! `/api/topics/TOPIC` and `/api/users/KEY`, whose answers come from the owning shard's board
//! inbox within a tick. No sockets here: requests in, responses (or a wait for a shard) out.

use std::fmt::Write as _;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use roster_proto::encode::PresenceMap;
use roster_proto::meta::write_json_str;

use crate::core::{Meta, TopicName, TopicView};
use crate::net::admin::board::Query;
use crate::net::admin::{metrics, Admin};
use crate::net::handshake::reason_phrase;

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

/// A query handed to a shard, not answered yet.
pub enum Pending {
    Topic {
        rx: mpsc::Receiver<Option<TopicView>>,
        topic: String,
        limit: Option<usize>,
        since: Instant,
    },
    User {
        rx: mpsc::Receiver<Vec<(TopicName, Meta)>>,
        key: String,
        since: Instant,
    },
}

pub enum Answer {
    Now(Response),
    Later(Pending),
}

impl Pending {
    /// The response once the shard has answered (or has taken too long).
    pub fn poll(&self, now: Instant) -> Option<Response> {
        let (answered, since) = match self {
            Pending::Topic {
                rx,
                topic,
                limit,
                since,
            } => (
                rx.try_recv()
                    .map(|view| topic_json(topic, view, *limit))
                    .map_err(|e| e == mpsc::TryRecvError::Disconnected),
                since,
            ),
            Pending::User { rx, key, since } => (
                rx.try_recv()
                    .map(|p| user_json(key, &p))
                    .map_err(|e| e == mpsc::TryRecvError::Disconnected),
                since,
            ),
        };
        match answered {
            Ok(body) => Some(Response {
                status: 200,
                kind: "application/json",
                body,
            }),
            Err(gone) if gone || now.duration_since(*since) >= SHARD_WAIT => {
                Some(Response::text(503, "shard did not answer\n"))
            }
            Err(_) => None,
        }
    }
}

/// Compares without stopping at the first difference, so timing does not tell how much of a
/// guessed key was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers a complete request.
pub fn answer(admin: &Admin, req: &httparse::Request<'_, '_>, now: Instant) -> Answer {
    if req.method != Some("GET") {
        return Answer::Now(Response::text(405, "only GET\n"));
    }
    let path = req.path.unwrap_or("/");
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if route == "/healthz" {
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
        return Answer::Later(Pending::Topic {
            rx,
            topic,
            limit,
            since: now,
        });
    }
    if let Some(key) = route.strip_prefix("/api/users/") {
        let key = decoded(key);
        let owner = admin.router.user_owner(&key).index();
        let (tx, rx) = mpsc::channel();
        ask(admin, owner, Query::User(key.clone(), tx));
        return Answer::Later(Pending::User {
            rx,
            key,
            since: now,
        });
    }
    Answer::Now(Response::text(404, "no such endpoint\n"))
}

/// Leaves a query in the shard's inbox, for its next tick.
fn ask(admin: &Admin, shard: usize, q: Query) {
    if let Some(board) = admin.board.shards.get(shard) {
        board
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(q);
    }
}

fn topic_json(topic: &str, view: Option<TopicView>, limit: Option<usize>) -> String {
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
    // Every part is JSON written from strings and validated metas.
    String::from_utf8_lossy(&out).into_owned()
}

fn user_json(key: &str, presences: &[(TopicName, Meta)]) -> String {
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
