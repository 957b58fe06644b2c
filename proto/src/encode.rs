//! Server frames out. Every function appends to a caller-owned buffer, so a shard reuses one
//! buffer per kind of frame and a broadcast is encoded exactly once.
//!
//! Frames are `[join_ref, ref, topic, event, payload]`. Broadcasts (`presence_diff`) carry
//! `null, null` so the same bytes can go to every subscriber.

use crate::meta::{write_json_str, write_with_topic};

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Writes `[join_ref, ref, topic, event, ` ; the caller writes the payload and then
/// [`frame_tail`].
fn frame_head(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
) {
    out.push(b'[');
    write_opt_str(out, join_ref);
    out.push(b',');
    write_opt_str(out, msg_ref);
    out.push(b',');
    write_json_str(out, topic);
    out.push(b',');
    write_json_str(out, event);
    out.push(b',');
}

fn frame_tail(out: &mut Vec<u8>) {
    out.push(b']');
}

/// A whole frame whose payload is already encoded JSON.
pub fn frame(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &[u8],
) {
    frame_head(out, join_ref, msg_ref, topic, event);
    out.extend_from_slice(payload);
    frame_tail(out);
}

/// `phx_reply` `{"status":"ok","response":RESPONSE}`; `response` is an encoded JSON object.
pub fn reply_ok(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    response: &[u8],
) {
    frame_head(out, join_ref, msg_ref, topic, "phx_reply");
    out.extend_from_slice(b"{\"status\":\"ok\",\"response\":");
    out.extend_from_slice(response);
    out.push(b'}');
    frame_tail(out);
}

/// `phx_reply` `{"status":"error","response":{"reason":REASON}}`.
pub fn reply_error(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    reason: &str,
) {
    frame_head(out, join_ref, msg_ref, topic, "phx_reply");
    out.extend_from_slice(b"{\"status\":\"error\",\"response\":{\"reason\":");
    write_json_str(out, reason);
    out.extend_from_slice(b"}}");
    frame_tail(out);
}

/// `[jr, null, topic, "presence_state", STATE]` where STATE was built by [`PresenceMap`].
pub fn presence_state(out: &mut Vec<u8>, join_ref: Option<&str>, topic: &str, state: &[u8]) {
    frame(out, join_ref, None, topic, "presence_state", state);
}

/// `[jr, null, topic, "presence_count", {"keys":K,"metas":M}]`.
pub fn presence_count(
    out: &mut Vec<u8>,
    join_ref: Option<&str>,
    topic: &str,
    keys: u64,
    metas: u64,
) {
    frame_head(out, join_ref, None, topic, "presence_count");
    out.extend_from_slice(b"{\"keys\":");
    write_u64(out, keys);
    out.extend_from_slice(b",\"metas\":");
    write_u64(out, metas);
    out.push(b'}');
    frame_tail(out);
}

/// `[jr, jr, topic, "phx_close", {}]`: the server ended this channel.
pub fn phx_close(out: &mut Vec<u8>, join_ref: Option<&str>, topic: &str) {
    frame(out, join_ref, join_ref, topic, "phx_close", b"{}");
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    // serde_json writes integers with itoa, no allocation.
    let _ = serde_json::to_writer(&mut *out, &v);
}

/// Streams a Phoenix presence map `{KEY: {"metas": [META, ...]}, ...}`. Callers must give all
/// metas of one key together: JSON objects with a repeated key lose all but the last.
pub struct PresenceMap<'o> {
    out: &'o mut Vec<u8>,
    state: MapState,
}

#[derive(PartialEq)]
enum MapState {
    Empty,
    KeyOpenNoMeta,
    KeyOpenWithMeta,
}

impl<'o> PresenceMap<'o> {
    pub fn new(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        PresenceMap {
            out,
            state: MapState::Empty,
        }
    }

    pub fn key(&mut self, key: &str) {
        if self.state != MapState::Empty {
            self.out.extend_from_slice(b"]},");
        }
        write_json_str(self.out, key);
        self.out.extend_from_slice(b":{\"metas\":[");
        self.state = MapState::KeyOpenNoMeta;
    }

    /// One encoded meta object of the current key.
    pub fn meta(&mut self, meta: &[u8]) {
        debug_assert!(self.state != MapState::Empty, "meta before key");
        if self.state == MapState::KeyOpenWithMeta {
            self.out.push(b',');
        }
        self.out.extend_from_slice(meta);
        self.state = MapState::KeyOpenWithMeta;
    }

    /// One stored meta of the current key, with `"topic"` added (watch lists).
    pub fn meta_with_topic(&mut self, meta: &[u8], topic: &str) {
        debug_assert!(self.state != MapState::Empty, "meta before key");
        if self.state == MapState::KeyOpenWithMeta {
            self.out.push(b',');
        }
        write_with_topic(meta, topic, self.out);
        self.state = MapState::KeyOpenWithMeta;
    }

    pub fn finish(self) {
        if self.state != MapState::Empty {
            self.out.extend_from_slice(b"]}");
        }
        self.out.push(b'}');
    }
}

/// Streams a `presence_diff` broadcast frame: `[null,null,topic,"presence_diff",{"joins":…,"leaves":…}]`.
/// Call [`DiffFrame::joins`], fill that map, then [`DiffFrame::leaves`], fill it, then
/// [`DiffFrame::finish`].
pub struct DiffFrame<'o> {
    out: &'o mut Vec<u8>,
}

impl<'o> DiffFrame<'o> {
    pub fn new(out: &'o mut Vec<u8>, topic: &str) -> Self {
        frame_head(out, None, None, topic, "presence_diff");
        out.extend_from_slice(b"{\"joins\":");
        DiffFrame { out }
    }

    pub fn joins(&mut self) -> PresenceMap<'_> {
        PresenceMap::new(self.out)
    }

    pub fn leaves(&mut self) -> PresenceMap<'_> {
        self.out.extend_from_slice(b",\"leaves\":");
        PresenceMap::new(self.out)
    }

    pub fn finish(self) {
        self.out.push(b'}');
        frame_tail(self.out);
    }
}

/// What a frame this module wrote carries, as far as flow control cares: a slow consumer may
/// lose queued `presence_diff` broadcasts (it gets a fresh state instead), and a
/// `presence_state` is the one frame a client asked for whose size it does not control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Diff,
    State,
    Other,
}

/// Reads the event of a frame written by [`frame_head`], without parsing the payload.
pub fn frame_kind(frame: &[u8]) -> FrameKind {
    let Some(mut rest) = frame.strip_prefix(b"[") else {
        return FrameKind::Other;
    };
    let broadcast = rest.starts_with(b"null,null,");
    for _ in 0..3 {
        match skip_value(rest).and_then(|r| r.strip_prefix(b",")) {
            Some(r) => rest = r,
            None => return FrameKind::Other,
        }
    }
    if broadcast && rest.starts_with(b"\"presence_diff\",") {
        FrameKind::Diff
    } else if rest.starts_with(b"\"presence_state\",") {
        FrameKind::State
    } else {
        FrameKind::Other
    }
}

/// Skips `null` or a JSON string.
fn skip_value(s: &[u8]) -> Option<&[u8]> {
    if let Some(rest) = s.strip_prefix(b"null") {
        return Some(rest);
    }
    let body = s.strip_prefix(b"\"")?;
    let mut escaped = false;
    for (i, &b) in body.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(&body[i + 1..]),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).expect("valid JSON")
    }

    #[test]
    fn replies_have_phoenix_shapes() {
        let mut out = Vec::new();
        reply_ok(&mut out, Some("1"), Some("2"), "room:a", b"{}");
        assert_eq!(
            parse(&out),
            json!(["1", "2", "room:a", "phx_reply", {"status": "ok", "response": {}}])
        );
        out.clear();
        reply_error(&mut out, None, Some("9"), "ro\"om", "unmatched topic");
        assert_eq!(
            parse(&out),
            json!([null, "9", "ro\"om", "phx_reply", {"status": "error", "response": {"reason": "unmatched topic"}}])
        );
        out.clear();
        presence_count(&mut out, Some("3"), "t", 4, 5);
        assert_eq!(
            parse(&out),
            json!(["3", null, "t", "presence_count", {"keys": 4, "metas": 5}])
        );
        out.clear();
        phx_close(&mut out, Some("3"), "t");
        assert_eq!(parse(&out), json!(["3", "3", "t", "phx_close", {}]));
    }

    #[test]
    fn presence_map_groups_metas_by_key() {
        let mut out = Vec::new();
        let mut m = PresenceMap::new(&mut out);
        m.key("alice");
        m.meta(br#"{"d":"phone","phx_ref":"A"}"#);
        m.meta(br#"{"d":"web","phx_ref":"B"}"#);
        m.key("bob");
        m.meta(br#"{"phx_ref":"C"}"#);
        m.finish();
        assert_eq!(
            parse(&out),
            json!({
                "alice": {"metas": [{"d": "phone", "phx_ref": "A"}, {"d": "web", "phx_ref": "B"}]},
                "bob": {"metas": [{"phx_ref": "C"}]}
            })
        );
        out.clear();
        PresenceMap::new(&mut out).finish();
        assert_eq!(out, b"{}");
    }

    #[test]
    fn frame_kinds_are_read_from_the_head() {
        let mut out = Vec::new();
        for topic in ["room:1", "r\\", "a\"presence_diff\",", ""] {
            out.clear();
            let mut d = DiffFrame::new(&mut out, topic);
            d.joins().finish();
            d.leaves().finish();
            d.finish();
            assert_eq!(
                frame_kind(&out),
                FrameKind::Diff,
                "{}",
                String::from_utf8_lossy(&out)
            );
            out.clear();
            presence_state(&mut out, Some("1\""), topic, b"{}");
            assert_eq!(frame_kind(&out), FrameKind::State);
            out.clear();
            reply_ok(&mut out, None, None, topic, b"{}");
            assert_eq!(frame_kind(&out), FrameKind::Other);
            out.clear();
            frame(&mut out, Some("3"), None, topic, "presence_diff", b"{}");
            assert_eq!(frame_kind(&out), FrameKind::Other, "not a broadcast");
            out.clear();
            presence_count(&mut out, None, topic, 1, 1);
            assert_eq!(frame_kind(&out), FrameKind::Other);
        }
        assert_eq!(frame_kind(b"[null,null,\"unterminated"), FrameKind::Other);
    }

    #[test]
    fn diff_frame_is_a_null_ref_broadcast() {
        let mut out = Vec::new();
        let mut d = DiffFrame::new(&mut out, "room:1");
        let mut j = d.joins();
        j.key("u1");
        j.meta(br#"{"s":"away","phx_ref":"N","phx_ref_prev":"O"}"#);
        j.finish();
        let mut l = d.leaves();
        l.key("u1");
        l.meta(br#"{"s":"here","phx_ref":"O"}"#);
        l.finish();
        d.finish();
        assert_eq!(
            parse(&out),
            json!([null, null, "room:1", "presence_diff", {
                "joins": {"u1": {"metas": [{"s": "away", "phx_ref": "N", "phx_ref_prev": "O"}]}},
                "leaves": {"u1": {"metas": [{"s": "here", "phx_ref": "O"}]}}
            }])
        );
    }
}
