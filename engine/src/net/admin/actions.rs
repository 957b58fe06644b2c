//! The admin API's actions: disconnect a user everywhere, put or remove a server-side presence.
//! Each is checked here against this node's limits, then handed on: on a single node to the
//! shards' inboxes, in a cluster to every node through NATS (`frame::Command`, which this node
//! hears too). Answered 202 once handed on: the shards apply it within a tick.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cluster::frame::{Command, MAX_CLOSE_REASON};
use crate::net::admin::api::{ask, Response};
use crate::net::admin::board::Query;
use crate::net::admin::Admin;
use crate::net::nats::ToBridge;

/// The default close code of a disconnect (4000-4999 are the application's: phoenix.js
/// hands the code to `onClose`).
const DISCONNECT_CODE: u16 = 4000;
/// The longest TTL a server-side presence may be given: 30 days.
const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    code: Option<u16>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackBody {
    meta: Option<Box<RawValue>>,
    ttl_ms: Option<u64>,
}

/// A non-GET request under the API key.
pub(super) fn act(admin: &Admin, method: &str, route: &str, body: &[u8]) -> Response {
    match command(admin, method, route, body) {
        Ok(c) => hand_on(admin, c),
        Err(r) => r,
    }
}

fn command(admin: &Admin, method: &str, route: &str, body: &[u8]) -> Result<Command, Response> {
    let bad = |why: &str| Response::text(400, &format!("{why}\n"));
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| bad("the path is not UTF-8"))
    };
    let key_ok = |key: &str| {
        if key.is_empty() || key.len() > 255 {
            Err(bad("a key is 1 to 255 bytes"))
        } else {
            Ok(())
        }
    };
    if let Some(key) = route
        .strip_prefix("/api/users/")
        .and_then(|r| r.strip_suffix("/disconnect"))
    {
        if method != "POST" {
            return Err(Response::text(405, "POST to disconnect\n"));
        }
        let key = decoded(key)?;
        key_ok(&key)?;
        let b: DisconnectBody = if body.is_empty() {
            DisconnectBody::default()
        } else {
            serde_json::from_slice(body).map_err(|e| bad(&format!("body: {e}")))?
        };
        let code = b.code.unwrap_or(DISCONNECT_CODE);
        if !(4000..=4999).contains(&code) {
            return Err(bad("code must be 4000 to 4999"));
        }
        let reason = b.reason.unwrap_or_else(|| "disconnected".into());
        if reason.len() > MAX_CLOSE_REASON {
            return Err(bad("reason is at most 123 bytes"));
        }
        return Ok(Command::Disconnect { key, code, reason });
    }
    let Some((topic, key)) = route
        .strip_prefix("/api/topics/")
        .and_then(|r| r.rsplit_once("/presences/"))
    else {
        return Err(Response::text(404, "no such endpoint\n"));
    };
    let (topic, key) = (decoded(topic)?, decoded(key)?);
    key_ok(&key)?;
    if topic.is_empty() || topic.len() > admin.max_topic_bytes {
        return Err(bad("topic empty or too long"));
    }
    match method {
        "PUT" => {
            let b: TrackBody =
                serde_json::from_slice(body).map_err(|e| bad(&format!("body: {e}")))?;
            let meta = b
                .meta
                .map_or_else(|| "{}".to_owned(), |m| m.get().to_owned());
            let parsed = roster_proto::ClientMeta::from_json(&meta).map_err(|e| bad(e.reason()))?;
            if parsed.len() > admin.max_meta_bytes {
                return Err(bad("meta too large"));
            }
            let ttl_ms = b.ttl_ms.unwrap_or(0);
            if b.ttl_ms == Some(0) || ttl_ms > MAX_TTL_MS {
                return Err(bad("ttl_ms must be 1 to 2592000000"));
            }
            Ok(Command::Track {
                topic,
                key,
                meta,
                ttl_ms,
                owner: admin.node,
            })
        }
        "DELETE" => Ok(Command::Untrack { topic, key }),
        _ => Err(Response::text(405, "PUT or DELETE a presence\n")),
    }
}

/// To the shards, or to every node.
fn hand_on(admin: &Admin, c: Command) -> Response {
    let cluster = admin.bridge.is_some();
    if let Some(bridge) = &admin.bridge {
        if bridge.try_send(ToBridge::Command(c)).is_err() {
            return Response::text(503, "the cluster link is busy\n");
        }
    } else {
        match &c {
            Command::Disconnect { .. } => {
                for shard in 0..admin.board.shards.len() {
                    ask(admin, shard, Query::Command(c.clone()));
                }
            }
            Command::Track { topic, .. } | Command::Untrack { topic, .. } => {
                let owner = admin.router.topic_owner(topic).index();
                ask(admin, owner, Query::Command(c));
            }
        }
    }
    Response {
        status: 202,
        kind: "application/json",
        body: format!("{{\"accepted\":true,\"cluster\":{cluster}}}"),
    }
}
