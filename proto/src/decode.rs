//! Client frames in, typed messages out. Every byte string gives either a [`ClientMessage`] or a
//! [`FrameError`]; nothing here panics on client input.
//!
//! Two kinds of failure are kept apart on purpose: a frame that is not a V2 message at all
//! ([`FrameError`]: the connection is closed with 1007) and a well-formed V2 message whose payload
//! is wrong for its event ([`ClientEvent::Invalid`]: it has refs, so it can be answered with an
//! error reply and the connection lives on).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::meta::ClientMeta;

/// What a subscriber receives about a topic's presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PresenceMode {
    /// `presence_state` on join, then every `presence_diff`.
    Full,
    /// Throttled `presence_count` only.
    Count,
    /// Tracked (if asked) but receives no presence events.
    None,
}

/// The payload of `phx_join`, with PROTOCOL.md's defaults filled in.
#[derive(Debug, PartialEq)]
pub struct JoinRequest<'a> {
    pub meta: ClientMeta<'a>,
    pub track: bool,
    pub presence: PresenceMode,
    /// Only meaningful on `watch:` topics.
    pub users: Option<Vec<Cow<'a, str>>>,
}

/// Why a well-formed V2 message carries a payload roster cannot act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadError {
    MetaNotObject,
    /// A meta a strict JSON decoder would refuse: a lone surrogate escape, a number past f64.
    MetaInvalid,
    TrackNotBool,
    BadPresenceMode,
    UsersNotStrings,
    MissingUsers,
    MissingToken,
    Malformed,
}

impl PayloadError {
    /// The `reason` sent back in the error reply.
    pub fn reason(self) -> &'static str {
        match self {
            PayloadError::MetaNotObject => "meta must be an object",
            PayloadError::MetaInvalid => {
                "meta must be valid JSON: no lone surrogate escapes, numbers within range"
            }
            PayloadError::TrackNotBool => "track must be a boolean",
            PayloadError::BadPresenceMode => "presence must be \"full\", \"count\" or \"none\"",
            PayloadError::UsersNotStrings => "users must be a list of strings",
            PayloadError::MissingUsers => "users is required",
            PayloadError::MissingToken => "token is required (a string)",
            PayloadError::Malformed => "invalid payload",
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum ClientEvent<'a> {
    Join(JoinRequest<'a>),
    Leave,
    Heartbeat,
    PresenceUpdate(ClientMeta<'a>),
    WatchAdd(Vec<Cow<'a, str>>),
    WatchRemove(Vec<Cow<'a, str>>),
    /// A fresh token for the connection (on the reserved token topic).
    Refresh(Cow<'a, str>),
    /// Any other event name: answered with `unknown event` (or `unmatched topic`).
    Unknown(Cow<'a, str>),
    /// A known event whose payload has the wrong shape.
    Invalid(PayloadError),
}

/// One decoded client frame. Borrows from the frame bytes where JSON escapes allow.
#[derive(Debug, PartialEq)]
pub struct ClientMessage<'a> {
    pub join_ref: Option<Cow<'a, str>>,
    pub msg_ref: Option<Cow<'a, str>>,
    pub topic: Cow<'a, str>,
    pub event: ClientEvent<'a>,
}

/// The frame is not a Phoenix V2 message: close the connection with 1007 and this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    NotJson,
    NotFiveElementArray,
    BadRef,
    BadTopic,
    BadEvent,
    PayloadNotObject,
}

impl FrameError {
    /// Close reason (a WebSocket close reason must stay under 123 bytes).
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::NotJson => "invalid frame: not JSON",
            FrameError::NotFiveElementArray => {
                "invalid frame: expected [join_ref, ref, topic, event, payload]"
            }
            FrameError::BadRef => "invalid frame: join_ref and ref must be strings or null",
            FrameError::BadTopic => "invalid frame: topic must be a string",
            FrameError::BadEvent => "invalid frame: event must be a string",
            FrameError::PayloadNotObject => "invalid frame: payload must be an object",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for FrameError {}

/// Decodes one client text frame.
pub fn decode(bytes: &[u8]) -> Result<ClientMessage<'_>, FrameError> {
    let raw: Envelope<'_> = match serde_json::from_slice(bytes) {
        Ok(raw) => raw,
        Err(e) => return Err(classify(&e, bytes)),
    };
    let payload = raw.payload.get();
    if !payload.starts_with('{') {
        return Err(FrameError::PayloadNotObject);
    }
    let event = match raw.event.as_ref() {
        "phx_join" => parse_join(payload),
        "phx_leave" => ClientEvent::Leave,
        "heartbeat" => ClientEvent::Heartbeat,
        "presence_update" => parse_update(payload),
        "watch_add" => {
            parse_users(payload).map_or_else(ClientEvent::Invalid, ClientEvent::WatchAdd)
        }
        "watch_remove" => {
            parse_users(payload).map_or_else(ClientEvent::Invalid, ClientEvent::WatchRemove)
        }
        "refresh" => {
            let token = raw_payload(payload).and_then(|p| {
                let raw = p.token.ok_or(PayloadError::MissingToken)?;
                serde_json::from_str::<CowStr<'_>>(raw.get())
                    .map_err(|_| PayloadError::MissingToken)
            });
            token.map_or_else(ClientEvent::Invalid, |t| ClientEvent::Refresh(t.0))
        }
        _ => ClientEvent::Unknown(raw.event),
    };
    Ok(ClientMessage {
        join_ref: raw.join_ref,
        msg_ref: raw.msg_ref,
        topic: raw.topic,
        event,
    })
}

/// serde's error only says "invalid type"; tell the client which slot was wrong.
fn classify(e: &serde_json::Error, bytes: &[u8]) -> FrameError {
    if e.is_syntax() || e.is_eof() {
        return FrameError::NotJson;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return FrameError::NotJson;
    };
    let Some(items) = v.as_array().filter(|a| a.len() == 5) else {
        return FrameError::NotFiveElementArray;
    };
    let is_ref = |v: &serde_json::Value| v.is_null() || v.is_string();
    if !is_ref(&items[0]) || !is_ref(&items[1]) {
        FrameError::BadRef
    } else if !items[2].is_string() {
        FrameError::BadTopic
    } else if !items[3].is_string() {
        FrameError::BadEvent
    } else {
        FrameError::PayloadNotObject
    }
}

#[derive(Debug)]
struct Envelope<'a> {
    join_ref: Option<Cow<'a, str>>,
    msg_ref: Option<Cow<'a, str>>,
    topic: Cow<'a, str>,
    event: Cow<'a, str>,
    payload: &'a RawValue,
}

// Hand-written so that `Cow` borrows from the input (serde's derive would always allocate for
// `Cow<str>`) and so that any length other than five is an error.
impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let join_ref = seq
                    .next_element::<Option<CowStr<'de>>>()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let msg_ref = seq
                    .next_element::<Option<CowStr<'de>>>()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let topic = seq
                    .next_element::<CowStr<'de>>()?
                    .ok_or_else(|| de::Error::invalid_length(2, &self))?;
                let event = seq
                    .next_element::<CowStr<'de>>()?
                    .ok_or_else(|| de::Error::invalid_length(3, &self))?;
                let payload = seq
                    .next_element::<&'de RawValue>()?
                    .ok_or_else(|| de::Error::invalid_length(4, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(6, &self));
                }
                Ok(Envelope {
                    join_ref: join_ref.map(|s| s.0),
                    msg_ref: msg_ref.map(|s| s.0),
                    topic: topic.0,
                    event: event.0,
                    payload,
                })
            }
        }
        d.deserialize_seq(V)
    }
}

/// A string that borrows from the input when it has no escapes.
pub(crate) struct CowStr<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Payload fields we read; anything else a client sends is ignored, as Phoenix ignores unknown
/// join params. Each field is kept raw first so a wrong type becomes a precise error reply.
#[derive(Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow, default)]
    meta: Option<&'a RawValue>,
    #[serde(borrow, default)]
    track: Option<&'a RawValue>,
    #[serde(borrow, default)]
    presence: Option<&'a RawValue>,
    #[serde(borrow, default)]
    users: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
}

fn raw_payload(payload: &str) -> Result<RawPayload<'_>, PayloadError> {
    serde_json::from_str(payload).map_err(|_| PayloadError::Malformed)
}

fn parse_join(payload: &str) -> ClientEvent<'_> {
    match join_request(payload) {
        Ok(j) => ClientEvent::Join(j),
        Err(e) => ClientEvent::Invalid(e),
    }
}

fn join_request(payload: &str) -> Result<JoinRequest<'_>, PayloadError> {
    let p = raw_payload(payload)?;
    let meta = match p.meta {
        None => ClientMeta::empty(),
        Some(raw) if raw.get() == "null" => ClientMeta::empty(),
        Some(raw) => ClientMeta::parse(raw)?,
    };
    let track = match p.track.map(RawValue::get) {
        None | Some("null") | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(PayloadError::TrackNotBool),
    };
    let presence = match p.presence.map(RawValue::get) {
        None | Some("null") | Some("\"full\"") => PresenceMode::Full,
        Some("\"count\"") => PresenceMode::Count,
        Some("\"none\"") => PresenceMode::None,
        Some(_) => return Err(PayloadError::BadPresenceMode),
    };
    let users = match p.users {
        None => None,
        Some(raw) => Some(users_list(raw)?),
    };
    Ok(JoinRequest {
        meta,
        track,
        presence,
        users,
    })
}

fn parse_update(payload: &str) -> ClientEvent<'_> {
    let meta = raw_payload(payload).and_then(|p| match p.meta {
        Some(raw) => ClientMeta::parse(raw),
        None => Err(PayloadError::MetaNotObject),
    });
    meta.map_or_else(ClientEvent::Invalid, ClientEvent::PresenceUpdate)
}

fn parse_users(payload: &str) -> Result<Vec<Cow<'_, str>>, PayloadError> {
    match raw_payload(payload)?.users {
        Some(raw) => users_list(raw),
        None => Err(PayloadError::MissingUsers),
    }
}

fn users_list(raw: &RawValue) -> Result<Vec<Cow<'_, str>>, PayloadError> {
    let list: Vec<CowStr<'_>> =
        serde_json::from_str(raw.get()).map_err(|_| PayloadError::UsersNotStrings)?;
    Ok(list.into_iter().map(|s| s.0).collect())
}

#[cfg(test)]
mod tests;
