//! One event as the backend gets it: JSON with an id that any node computes the same for the
//! same happening, so retries and a second reporter (a partition, a dead node's watchers) are
//! duplicates a backend can drop.

use ring::digest::{digest, SHA256};
use roster_proto::meta::stored_phx_ref;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::core::event::{Event, EventKind};

/// An event with the wall-clock time (ms since the Unix epoch) its shard saw it.
pub struct Record {
    pub event: Box<Event>,
    pub at_ms: u64,
}

#[derive(Serialize)]
struct Wire<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    topic: &'a str,
    key: &'a str,
    phx_ref: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_phx_ref: Option<&'a str>,
    meta: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    node: &'a str,
    time: u64,
}

/// The event's id: 32 hex digits of SHA-256 over what names it. A presence's `phx_ref` is the
/// same on every node and unique in the cluster (it carries its node and incarnation), so a
/// join, an update and a leave are named by (type, topic, ref); a user's online and offline by
/// the presence that made them, or, for an offline a death made, by the dead incarnation.
pub fn id(e: &Event) -> String {
    let mut named = Vec::with_capacity(64 + e.topic.as_str().len() + e.key.as_str().len());
    named.extend_from_slice(e.kind.as_str().as_bytes());
    let phx_ref = stored_phx_ref(e.meta.bytes()).unwrap_or_default();
    match (e.kind, e.origin) {
        (EventKind::Online | EventKind::Offline, Some(dead)) => {
            named.push(0);
            named.extend_from_slice(e.key.as_str().as_bytes());
            named.extend_from_slice(&dead.node.to_le_bytes());
            named.extend_from_slice(&dead.incarnation.to_le_bytes());
        }
        (EventKind::Online | EventKind::Offline, None) => {
            named.push(0);
            named.extend_from_slice(e.key.as_str().as_bytes());
            named.push(0);
            named.extend_from_slice(phx_ref);
        }
        _ => {
            named.push(0);
            named.extend_from_slice(e.topic.as_str().as_bytes());
            named.push(0);
            named.extend_from_slice(phx_ref);
        }
    }
    hex::encode(&digest(&SHA256, &named).as_ref()[..16])
}

/// Appends the event's JSON object to `out`; `node` names the node whose presence it is.
pub fn encode(r: &Record, node: &str, out: &mut Vec<u8>) {
    let e = &r.event;
    let text = |b: &'_ [u8]| std::str::from_utf8(b).unwrap_or_default().to_owned();
    let phx_ref = text(stored_phx_ref(e.meta.bytes()).unwrap_or_default());
    let prev = e
        .prev
        .as_ref()
        .map(|m| text(stored_phx_ref(m.bytes()).unwrap_or_default()));
    // The core made the stored meta from a checked JSON object; if it were not one, the event
    // still goes out, with an empty meta, rather than not at all.
    let meta = std::str::from_utf8(e.meta.bytes())
        .ok()
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok());
    let empty = RawValue::from_string("{}".to_owned()).expect("valid JSON");
    let wire = Wire {
        id: &id(e),
        kind: e.kind.as_str(),
        topic: e.topic.as_str(),
        key: e.key.as_str(),
        phx_ref: &phx_ref,
        prev_phx_ref: prev.as_deref(),
        meta: meta.unwrap_or(&empty),
        reason: e.reason.map(|r| r.as_str()),
        node,
        time: r.at_ms,
    };
    // Writing into a Vec cannot fail, and every field is plain data.
    let _ = serde_json::to_writer(out, &wire);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::Origin;
    use crate::core::event::Reason;
    use crate::core::{Meta, TopicName, UserKey};

    fn event(kind: EventKind, meta: &str, origin: Option<Origin>) -> Box<Event> {
        Box::new(Event {
            kind,
            topic: TopicName::new("room:1"),
            key: UserKey::new("alice"),
            meta: Meta::new(meta.as_bytes()),
            prev: None,
            reason: (kind == EventKind::Leave).then_some(Reason::Left),
            origin,
        })
    }

    const META: &str = r#"{"status":"away","phx_ref":"AAAAAAAAAAA"}"#;

    #[test]
    fn a_leave_is_json_with_its_fields() {
        let r = Record {
            event: event(EventKind::Leave, META, None),
            at_ms: 1_700_000_000_123,
        };
        let mut out = Vec::new();
        encode(&r, "node-a", &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["type"], "presence_leave");
        assert_eq!(v["topic"], "room:1");
        assert_eq!(v["key"], "alice");
        assert_eq!(v["phx_ref"], "AAAAAAAAAAA");
        assert_eq!(v["meta"]["status"], "away");
        assert_eq!(v["reason"], "left");
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["time"], 1_700_000_000_123u64);
        assert_eq!(v["id"].as_str().map(str::len), Some(32));
    }

    #[test]
    fn ids_name_the_happening_not_the_reporter() {
        let leave = id(&event(EventKind::Leave, META, None));
        let dead = Origin {
            node: 1,
            incarnation: 2,
        };
        // A dead node's leave, reported by a survivor, is the leave its own node would report.
        assert_eq!(leave, id(&event(EventKind::Leave, META, Some(dead))));
        assert_ne!(leave, id(&event(EventKind::Join, META, None)));
        let other = r#"{"status":"away","phx_ref":"AAAAAAAAAAB"}"#;
        assert_ne!(leave, id(&event(EventKind::Leave, other, None)));
        let offline = id(&event(EventKind::Offline, META, Some(dead)));
        let again = Origin {
            node: 1,
            incarnation: 3,
        };
        assert_ne!(offline, id(&event(EventKind::Offline, META, Some(again))));
        assert_eq!(offline, id(&event(EventKind::Offline, other, Some(dead))));
    }
}
