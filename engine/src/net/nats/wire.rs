//! The core NATS client protocol without IO: the lines a client writes (`CONNECT`, `SUB`,
//! `UNSUB`, `PUB`, `PING`, `PONG`) and a parser of what a server sends (`INFO`, `MSG`, `HMSG`,
//! `PING`, `PONG`, `+OK`, `-ERR`). roster speaks it itself rather than through async-nats
//! because a subscription there is a channel of its own (~6.5 KiB before any message), and a
//! node subscribes to every topic and user its clients touch: here a subscription is a number.
//!
//! Must not: trust a length or a line from the server beyond the bounds below (a broken or
//! hostile server is a protocol error that ends the connection, never a panic or an
//! unbounded buffer).

use std::fmt::Write;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Longest control line accepted (nats-server's own default is 4 KiB).
const MAX_CONTROL: usize = 64 * 1024;
/// Largest message accepted, headers included (a server's max_payload is at most 64 MiB).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// What the server says about itself (the fields roster uses).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Info {
    #[serde(default)]
    pub max_payload: usize,
    #[serde(default)]
    pub tls_required: bool,
    /// To be signed with the user's NKey when the server wants a JWT.
    #[serde(default)]
    pub nonce: Option<String>,
}

/// The client's `CONNECT`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Connect {
    pub verbose: bool,
    pub pedantic: bool,
    pub lang: &'static str,
    pub version: &'static str,
    pub protocol: u8,
    pub name: String,
    /// Header support, needed for "no responders" (an `HMSG` with status 503).
    pub headers: bool,
    pub no_responders: bool,
    pub echo: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
    /// A bare NKey user's public key (with `sig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// A message delivered to one of the client's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    pub payload: Bytes,
    /// The status of an `HMSG` (503: no responders), if it had one.
    pub status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The `INFO` line's JSON ([`Info::parse`]).
    Info(String),
    Msg(Msg),
    Ping,
    Pong,
    Ok,
    Err(String),
}

impl Info {
    pub fn parse(json: &str) -> Result<Info, ProtocolError> {
        serde_json::from_str(json).map_err(|e| ProtocolError(format!("bad INFO: {e}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NATS protocol error: {}", self.0)
    }
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

pub fn connect(out: &mut BytesMut, c: &Connect) {
    out.extend_from_slice(b"CONNECT ");
    // A struct of strings and flags always serializes.
    out.extend_from_slice(serde_json::to_string(c).unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn sub(out: &mut BytesMut, subject: &str, sid: u64) {
    debug_assert!(token_ok(subject), "bad subject {subject:?}");
    // Into the buffer directly: no line allocated per call (writing to a BytesMut cannot fail).
    let _ = write!(out, "SUB {subject} {sid}\r\n");
}

pub fn unsub(out: &mut BytesMut, sid: u64) {
    let _ = write!(out, "UNSUB {sid}\r\n");
}

pub fn publish(out: &mut BytesMut, subject: &str, reply: Option<&str>, payload: &[u8]) {
    debug_assert!(token_ok(subject), "bad subject {subject:?}");
    let _ = match reply {
        Some(r) => write!(out, "PUB {subject} {r} {}\r\n", payload.len()),
        None => write!(out, "PUB {subject} {}\r\n", payload.len()),
    };
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// A subject or reply is one token of the protocol line: no whitespace, not empty.
fn token_ok(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b.is_ascii_whitespace())
}

/// Splits what a server sends into operations. Bytes are read into [`Parser::buffer`].
#[derive(Default)]
pub struct Parser {
    buf: BytesMut,
}

impl Parser {
    /// Where the next bytes read from the server go.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next whole operation, `None` if more bytes are needed.
    pub fn next(&mut self) -> Result<Option<ServerOp>, ProtocolError> {
        let Some(end) = find_crlf(&self.buf) else {
            if self.buf.len() > MAX_CONTROL {
                return Err(ProtocolError("control line too long".into()));
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| ProtocolError("control line is not UTF-8".into()))?;
        let (op, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
        let rest = rest.trim();
        let is = |name: &str| op.eq_ignore_ascii_case(name);
        let simple = if is("MSG") || is("HMSG") {
            None
        } else if is("PING") {
            Some(ServerOp::Ping)
        } else if is("PONG") {
            Some(ServerOp::Pong)
        } else if is("+OK") {
            Some(ServerOp::Ok)
        } else if is("-ERR") {
            Some(ServerOp::Err(rest.trim_matches('\'').to_owned()))
        } else if is("INFO") {
            Some(ServerOp::Info(rest.to_owned()))
        } else {
            return Err(ProtocolError(format!("unknown operation {op:?}")));
        };
        if let Some(op) = simple {
            self.buf.advance(end + 2);
            return Ok(Some(op));
        }
        let head = MsgHead::parse(rest, is("HMSG"))?;
        let need = end + 2 + head.total + 2;
        if self.buf.len() < need {
            // Room for the whole message at once, rather than growing in steps.
            self.buf.reserve(need - self.buf.len());
            return Ok(None);
        }
        if &self.buf[need - 2..need] != b"\r\n" {
            return Err(ProtocolError("message not ended by CRLF".into()));
        }
        self.buf.advance(end + 2);
        let mut body = self.buf.split_to(head.total).freeze();
        self.buf.advance(2);
        let status = match head.headers {
            Some(h) => {
                let status = status_of(&body[..h])?;
                body.advance(h);
                status
            }
            None => None,
        };
        Ok(Some(ServerOp::Msg(Msg {
            subject: head.subject,
            sid: head.sid,
            reply: head.reply,
            payload: body,
            status,
        })))
    }
}

/// A `MSG` or `HMSG` line's fields.
struct MsgHead {
    subject: String,
    sid: u64,
    reply: Option<String>,
    /// The headers' length, for an `HMSG`.
    headers: Option<usize>,
    total: usize,
}

impl MsgHead {
    fn parse(rest: &str, with_headers: bool) -> Result<MsgHead, ProtocolError> {
        let bad = || ProtocolError(format!("bad message line {rest:?}"));
        // At most 5 fields (HMSG with a reply): no vector per message.
        let mut parts = [""; 5];
        let mut n = 0;
        for p in rest.split_ascii_whitespace() {
            *parts.get_mut(n).ok_or_else(bad)? = p;
            n += 1;
        }
        let numbers = if with_headers { 2 } else { 1 };
        let (subject, sid, reply) = match n.checked_sub(numbers) {
            Some(2) => (parts[0], parts[1], None),
            Some(3) => (parts[0], parts[1], Some(parts[2])),
            _ => return Err(bad()),
        };
        let sid = sid.parse().map_err(|_| bad())?;
        let len = |i: usize| parts[i].parse::<usize>().map_err(|_| bad());
        let (headers, total) = if with_headers {
            let (h, total) = (len(n - 2)?, len(n - 1)?);
            if h > total {
                return Err(bad());
            }
            (Some(h), total)
        } else {
            (None, len(n - 1)?)
        };
        if total > MAX_MESSAGE {
            return Err(ProtocolError(format!("message of {total} bytes")));
        }
        Ok(MsgHead {
            subject: subject.to_owned(),
            sid,
            reply: reply.map(str::to_owned),
            headers,
            total,
        })
    }
}

/// The status in a header block's first line, `NATS/1.0 503` (none if it has only headers).
fn status_of(headers: &[u8]) -> Result<Option<u16>, ProtocolError> {
    let first = headers
        .split(|&b| b == b'\r')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or_else(|| ProtocolError("bad headers".into()))?;
    let rest = first
        .strip_prefix("NATS/1.0")
        .ok_or_else(|| ProtocolError(format!("bad headers line {first:?}")))?;
    Ok(rest
        .split_ascii_whitespace()
        .next()
        .and_then(|s| s.parse().ok()))
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(input: &[u8], chunk: usize) -> Result<Vec<ServerOp>, ProtocolError> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            p.buffer().extend_from_slice(c);
            while let Some(op) = p.next()? {
                out.push(op);
            }
        }
        Ok(out)
    }

    fn msg(subject: &str, sid: u64, reply: Option<&str>, payload: &[u8]) -> ServerOp {
        ServerOp::Msg(Msg {
            subject: subject.into(),
            sid,
            reply: reply.map(Into::into),
            payload: Bytes::copy_from_slice(payload),
            status: None,
        })
    }

    #[test]
    fn parses_every_operation_whatever_the_chunking() {
        let input = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\nPING\r\n+OK\r\n\
            MSG a.b 7 5\r\nhello\r\nMSG a.c 8 _INBOX.1 0\r\n\r\n\
            HMSG _INBOX.2 9 16 16\r\nNATS/1.0 503\r\n\r\n\r\n\
            MSG bin 1 4\r\n\r\n\r\n\r\n-ERR 'Permissions Violation'\r\npong\r\n";
        let want = vec![
            ServerOp::Info("{\"server_id\":\"x\",\"max_payload\":1048576}".into()),
            ServerOp::Ping,
            ServerOp::Ok,
            msg("a.b", 7, None, b"hello"),
            msg("a.c", 8, Some("_INBOX.1"), b""),
            ServerOp::Msg(Msg {
                subject: "_INBOX.2".into(),
                sid: 9,
                reply: None,
                payload: Bytes::new(),
                status: Some(503),
            }),
            // A payload may hold CRLFs: its length decides.
            msg("bin", 1, None, b"\r\n\r\n"),
            ServerOp::Err("Permissions Violation".into()),
            ServerOp::Pong,
        ];
        for chunk in [1, 2, 3, 7, 64, input.len()] {
            assert_eq!(ops(input, chunk).unwrap(), want, "chunks of {chunk}");
        }
        let ServerOp::Info(info) = &want[0] else {
            unreachable!()
        };
        assert_eq!(Info::parse(info).unwrap().max_payload, 1_048_576);
    }

    #[test]
    fn a_header_message_keeps_its_payload_after_the_headers() {
        let input = b"HMSG s 1 r 18 23\r\nNATS/1.0\r\nA: b\r\n\r\nhello\r\n";
        let got = ops(input, 5).unwrap();
        assert_eq!(
            got,
            vec![ServerOp::Msg(Msg {
                subject: "s".into(),
                sid: 1,
                reply: Some("r".into()),
                payload: Bytes::from_static(b"hello"),
                status: None,
            })]
        );
    }

    #[test]
    fn broken_input_is_an_error_not_a_panic() {
        for bad in [
            &b"MSG a 1\r\n"[..],
            b"MSG a x 1\r\nx\r\n",
            b"MSG a 1 3\r\nabcd\r\n",
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"HMSG a 1 3 3\r\nabc\r\n",
            b"MSG a 1 99999999999\r\n",
            b"WHAT\r\n",
            b"\xff\xfe\r\n",
            b"MSG a b c d e f 1\r\n",
        ] {
            assert!(ops(bad, 3).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'x'; MAX_CONTROL + 10];
        assert!(ops(&long, 4096).is_err());
    }

    #[test]
    fn writes_what_a_server_reads() {
        let mut out = BytesMut::new();
        sub(&mut out, "r.t.abc.*", 3);
        unsub(&mut out, 3);
        publish(&mut out, "r.hb", None, b"xy");
        publish(&mut out, "r.p", Some("_INBOX.a.1"), b"");
        assert_eq!(
            &out[..],
            &b"SUB r.t.abc.* 3\r\nUNSUB 3\r\nPUB r.hb 2\r\nxy\r\nPUB r.p _INBOX.a.1 0\r\n\r\n"[..]
        );
        let mut out = BytesMut::new();
        connect(
            &mut out,
            &Connect {
                name: "n".into(),
                headers: true,
                ..Connect::default()
            },
        );
        let line = std::str::from_utf8(&out).unwrap();
        assert!(
            line.starts_with("CONNECT {") && line.ends_with("}\r\n"),
            "{line}"
        );
        assert!(line.contains("\"headers\":true") && !line.contains("\"user\""));
    }
}
