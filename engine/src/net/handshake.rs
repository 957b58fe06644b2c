//! The HTTP upgrade that opens a connection, as pure functions over the bytes received so far:
//! checks the path, the WebSocket headers and the Phoenix `vsn`, picks the `phoenix` subprotocol
//! when offered, and pulls out what identifies the client. Refusals carry an HTTP status and a
//! reason the client can read.

use tungstenite::handshake::derive_accept_key;

/// Path phoenix.js connects to for `new Socket("ws://HOST:PORT/socket")`.
const PATH: &str = "/socket/websocket";
const BEARER_PREFIX: &str = "base64url.bearer.phx.";
/// A presence key is kept in every table entry of its presences.
const MAX_USER_ID_BYTES: usize = 255;

#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The request's headers have not all arrived yet.
    Incomplete,
    Accept(Upgrade),
    Reject(Reject),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// The `101 Switching Protocols` response to write.
    pub response: Vec<u8>,
    /// Bytes of the buffer the request took; anything after them is WebSocket data.
    pub consumed: usize,
    /// `user_id` query parameter (development identity).
    pub user_id: Option<String>,
    /// `token` query parameter.
    pub token: Option<String>,
    /// Token sent as phoenix.js 1.8's `authToken`, still base64url-encoded.
    pub protocol_token: Option<String>,
    /// The `Origin` header (browsers send it).
    pub origin: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

/// The reason phrase of every status roster answers with (upgrades and the admin listener).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

impl Reject {
    pub const fn new(status: u16, reason: &'static str) -> Reject {
        Reject { status, reason }
    }

    pub fn response(&self) -> Vec<u8> {
        // RFC 6455 4.4: a server that does not speak the client's version says which it does.
        let version = if self.reason == WRONG_VERSION {
            "Sec-WebSocket-Version: 13\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\n{version}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}\n",
            self.status,
            reason_phrase(self.status),
            self.reason.len() + 1,
            self.reason
        )
        .into_bytes()
    }
}

const WRONG_VERSION: &str = "unsupported WebSocket version; 13 is required";

fn reject(status: u16, reason: &'static str) -> Handshake {
    Handshake::Reject(Reject { status, reason })
}

/// RFC 6455 4.1: the key is 16 random bytes, base64-encoded (24 characters).
fn valid_key(key: &str) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// Reads an upgrade request from `buf`; requests longer than `max` bytes are refused.
pub fn parse(buf: &[u8], max: usize) -> Handshake {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max => {
            return reject(431, "request too large")
        }
        Ok(httparse::Status::Partial) => return Handshake::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many headers"),
        Err(_) => return reject(400, "malformed HTTP request"),
    };
    if req.method != Some("GET") {
        return reject(405, "only GET upgrades to a WebSocket");
    }
    // RFC 6455 4.1: the upgrade is an HTTP/1.1 (or later) request; httparse reads 1.0 and 1.1.
    if req.version != Some(1) {
        return reject(400, "HTTP/1.1 is required for a WebSocket upgrade");
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != PATH && path != "/socket/websocket/" {
        return reject(404, "no such endpoint; connect to /socket/websocket");
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return reject(400, "not a WebSocket upgrade");
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return reject(400, WRONG_VERSION);
    }
    let Some(key) = header("sec-websocket-key")
        .map(str::trim)
        .filter(|k| !k.is_empty())
    else {
        return reject(400, "missing Sec-WebSocket-Key");
    };
    if !valid_key(key) {
        return reject(400, "Sec-WebSocket-Key must be base64 of 16 bytes");
    }
    let mut user_id = None;
    let mut token = None;
    let mut vsn = false;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "vsn" if !v.starts_with("2.") => {
                return reject(
                    400,
                    "unsupported vsn: roster speaks the Phoenix V2 serializer (vsn=2.0.0)",
                )
            }
            "vsn" => vsn = true,
            "user_id" if v.len() > MAX_USER_ID_BYTES => return reject(400, "user_id too long"),
            "user_id" => user_id = Some(v.into_owned()),
            "token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    // Phoenix reads a missing vsn as 1.0.0, the V1 serializer, which roster does not speak.
    if !vsn {
        return reject(
            400,
            "missing vsn: roster speaks the Phoenix V2 serializer (add vsn=2.0.0)",
        );
    }
    let offered: Vec<&str> = header("sec-websocket-protocol")
        .map(|v| v.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let protocol_token = offered
        .iter()
        .find_map(|p| p.strip_prefix(BEARER_PREFIX))
        .map(str::to_owned);
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        derive_accept_key(key.as_bytes())
    );
    // A browser drops a connection whose requested subprotocol the server does not select.
    if offered.contains(&"phoenix") {
        response.push_str("Sec-WebSocket-Protocol: phoenix\r\n");
    }
    response.push_str("\r\n");
    Handshake::Accept(Upgrade {
        response: response.into_bytes(),
        consumed,
        user_id,
        token,
        protocol_token,
        origin: header("origin").map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn accept(req: &str) -> Upgrade {
        match parse(req.as_bytes(), 8192) {
            Handshake::Accept(u) => u,
            other => panic!("{other:?}"),
        }
    }

    fn status(req: &str) -> u16 {
        match parse(req.as_bytes(), 8192) {
            Handshake::Reject(r) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn phoenix_js_request_is_accepted() {
        let req = request("/socket/websocket?token=a%2Bb&vsn=2.0.0&user_id=alice", "");
        let u = accept(&(req.clone() + "trailing"));
        assert_eq!(u.consumed, req.len());
        assert_eq!(
            (u.user_id.as_deref(), u.token.as_deref()),
            (Some("alice"), Some("a+b"))
        );
        let text = String::from_utf8(u.response).unwrap();
        // RFC 6455's worked example.
        assert!(
            text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{text}"
        );
        assert!(!text.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn phoenix_subprotocol_is_selected_and_bearer_token_kept() {
        let u = accept(&request(
            "/socket/websocket?vsn=2.0.0",
            "Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.dG9r\r\n",
        ));
        assert!(String::from_utf8(u.response)
            .unwrap()
            .contains("Sec-WebSocket-Protocol: phoenix\r\n"));
        assert_eq!(u.protocol_token.as_deref(), Some("dG9r"));
    }

    #[test]
    fn refusals_have_statuses() {
        assert_eq!(status(&request("/socket/websocket?vsn=1.0.0", "")), 400);
        assert_eq!(status(&request("/other", "")), 404);
        assert_eq!(
            status(&request(
                &format!("/socket/websocket?user_id={}", "u".repeat(256)),
                ""
            )),
            400
        );
        assert_eq!(status("POST /socket/websocket HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(
            status("GET /socket/websocket HTTP/1.1\r\nHost: x\r\n\r\n"),
            400
        );
        assert_eq!(status("\x00\x01 garbage\r\n\r\n"), 400);
        assert_eq!(
            parse(b"GET /socket/websocket HTTP/1.1\r\nHost:", 8192),
            Handshake::Incomplete
        );
        assert!(matches!(
            parse(&[b'a'; 100], 50),
            Handshake::Reject(Reject {
                status: 400 | 431,
                ..
            })
        ));
        let r = Reject {
            status: 400,
            reason: "why",
        }
        .response();
        assert!(String::from_utf8(r).unwrap().ends_with("\r\n\r\nwhy\n"));
    }

    fn refusal(req: &str) -> String {
        match parse(req.as_bytes(), 8192) {
            Handshake::Reject(r) => String::from_utf8(r.response()).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conformance_refusals() {
        let good = "/socket/websocket?vsn=2.0.0";
        for bad_key in [
            "short",
            "dGhlIHNhbXBsZSBub25jZQ",
            "!!!!!!!!!!!!!!!!!!!!!!==",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            let req = request(good, "").replace("dGhlIHNhbXBsZSBub25jZQ==", bad_key);
            assert!(
                refusal(&req).contains("Sec-WebSocket-Key must be base64 of 16 bytes"),
                "{bad_key}"
            );
        }
        let http10 = request(good, "").replace("HTTP/1.1", "HTTP/1.0");
        assert!(refusal(&http10).starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(refusal(&http10).contains("HTTP/1.1 is required"));
        // Phoenix reads no vsn as 1.0.0 (V1), which roster does not speak.
        assert!(refusal(&request("/socket/websocket?user_id=a", "")).contains("missing vsn"));
        let v8 = request(good, "").replace("Version: 13", "Version: 8");
        let text = refusal(&v8);
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
        assert!(!refusal(&http10).contains("Sec-WebSocket-Version"));
        for (status, phrase) in [
            (429, "Too Many Requests"),
            (503, "Service Unavailable"),
            (408, "Request Timeout"),
        ] {
            let r = String::from_utf8(Reject::new(status, "x").response()).unwrap();
            assert!(
                r.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\n")),
                "{r}"
            );
        }
    }
}
