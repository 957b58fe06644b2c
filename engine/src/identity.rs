//! Who a connection is. With a secret, the token (the `token` query parameter, or phoenix.js
//! 1.8's `authToken` in Sec-WebSocket-Protocol) must be an HS256 JWT signed with it: `sub` is
//! the presence key, `exp` is honoured when present, `topics` limits what it may join, `meta` is
//! merged into its metas. Without a secret (development mode) `user_id` names the key. Pure: the
//! handshake calls it before answering.

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::core::{Grants, TopicPattern, UserKey};
use crate::net::handshake::{Reject, Upgrade};

/// A presence key is kept in every table entry of its presences.
const MAX_KEY_BYTES: usize = 255;

#[derive(Debug)]
pub struct Identity {
    pub key: UserKey,
    pub grants: Option<Box<Grants>>,
    /// The token's `exp` (seconds since the Unix epoch), if it has one.
    pub expires: Option<f64>,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Read here rather than by the JWT crate, which skips an `exp` it cannot parse. Present
    /// as null is Some(Null), not None: such a token is malformed, not unlimited.
    #[serde(default, deserialize_with = "present")]
    exp: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<serde_json::Value>,
    topics: Option<Vec<String>>,
    meta: Option<Box<RawValue>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

fn refuse(status: u16, reason: &'static str) -> Reject {
    Reject { status, reason }
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are honoured when present, not required, and checked by `verify`
        // against the time it is given (no clock leeway).
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        // roster does not know its audience: an `aud` claim is allowed and not checked.
        validation.validate_aud = false;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The identity a token proves at `now` (seconds since the Unix epoch), or why it proves
    /// none (HTTP 401).
    fn verify(&self, token: &str, now: u64) -> Result<Identity, Reject> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => refuse(401, "token signature does not verify"),
                ErrorKind::InvalidAlgorithm => refuse(401, "token must be signed with HS256"),
                _ => refuse(401, "malformed token"),
            },
        )?;
        let claims = data.claims;
        let mut expires = None;
        if let Some(exp) = &claims.exp {
            let exp = numeric_date(exp)
                .ok_or(refuse(401, "malformed token: exp must be a NumericDate"))?;
            if now as f64 >= exp {
                return Err(refuse(401, "token expired"));
            }
            expires = Some(exp);
        }
        if let Some(nbf) = &claims.nbf {
            let nbf = numeric_date(nbf)
                .ok_or(refuse(401, "malformed token: nbf must be a NumericDate"))?;
            if (now as f64) < nbf {
                return Err(refuse(401, "token not valid yet"));
            }
        }
        let sub = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(refuse(401, "token has no sub"))?;
        if sub.len() > MAX_KEY_BYTES {
            return Err(refuse(401, "token sub too long"));
        }
        let meta = match claims.meta {
            Some(m) if m.get().trim_start().starts_with('{') => Some(m.get().into()),
            Some(_) => return Err(refuse(401, "token meta must be an object")),
            None => None,
        };
        let topics = claims
            .topics
            .map(|ts| ts.iter().map(|t| TopicPattern::new(t)).collect());
        Ok(Identity {
            key: UserKey::new(&sub),
            grants: Some(Box::new(Grants { topics, meta })),
            expires,
        })
    }

    /// A fresh token sent on a live connection (see `core::shard::token`), at `now` (Unix
    /// seconds).
    pub fn refresh(&self, token: &str, now: u64) -> Result<Identity, Reject> {
        self.verify(token, now)
    }

    /// The connection's identity from its upgrade request, at `now` (Unix seconds).
    pub fn identify(&self, upgrade: &Upgrade, now: u64) -> Result<Identity, Reject> {
        if let Some(token) = upgrade.token.as_deref() {
            return self.verify(token, now);
        }
        if let Some(encoded) = upgrade.protocol_token.as_deref() {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|_| refuse(401, "malformed token"))?;
            let token = std::str::from_utf8(&bytes).map_err(|_| refuse(401, "malformed token"))?;
            return self.verify(token, now);
        }
        Err(refuse(401, "missing token"))
    }
}

/// RFC 7519's NumericDate: seconds since the epoch, a non-negative number (fractions allowed).
/// Anything else (a string, a boolean, null, a negative number, one past any real date such as
/// 2^64) makes the token malformed rather than silently unlimited.
fn numeric_date(v: &serde_json::Value) -> Option<f64> {
    /// Year 10000: later dates are not dates a token means.
    const LATEST: f64 = 253_402_300_800.0;
    let n = v.as_f64()?;
    (n.is_finite() && (0.0..LATEST).contains(&n)).then_some(n)
}

/// Development mode: `user_id` names the key, or a random one is made; nothing is verified.
pub fn unverified(upgrade: &Upgrade) -> Identity {
    let key = match upgrade.user_id.as_deref().filter(|u| !u.is_empty()) {
        Some(id) => UserKey::new(id),
        None => UserKey::new(&format!("anon-{:016x}", fastrand::u64(..))),
    };
    Identity {
        key,
        grants: None,
        expires: None,
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"test secret";

    fn token(alg: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn reason(r: Result<Identity, Reject>) -> &'static str {
        r.map(|_| "accepted").unwrap_or_else(|e| e.reason)
    }

    #[test]
    fn good_tokens_give_key_topics_and_meta() {
        let v = Verifier::new(SECRET);
        let t = token(
            Algorithm::HS256,
            SECRET,
            json!({"sub": "alice", "exp": now() + 60, "topics": ["room:*"], "meta": {"role": "admin"}}),
        );
        let id = v.verify(&t, now()).unwrap();
        assert_eq!(id.key.as_str(), "alice");
        let g = id.grants.unwrap();
        assert!(g.allows("room:1") && !g.allows("doc:1"));
        assert_eq!(g.meta.as_deref(), Some(r#"{"role":"admin"}"#));
        // An audience roster cannot check is no reason to refuse.
        let t = token(
            Algorithm::HS256,
            SECRET,
            json!({"sub": "carol", "aud": "some-api"}),
        );
        assert_eq!(v.verify(&t, now()).unwrap().key.as_str(), "carol");
        // No exp, no topics, no meta: fine.
        let id = v
            .verify(
                &token(Algorithm::HS256, SECRET, json!({"sub": "bob"})),
                now(),
            )
            .unwrap();
        assert_eq!(*id.grants.unwrap(), Grants::default());
    }

    #[test]
    fn bad_tokens_are_refused_with_reasons() {
        let v = Verifier::new(SECRET);
        let cases = [
            (
                token(Algorithm::HS256, b"other", json!({"sub": "a"})),
                "token signature does not verify",
            ),
            (
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "a", "exp": now() - 10}),
                ),
                "token expired",
            ),
            (
                token(Algorithm::HS512, SECRET, json!({"sub": "a"})),
                "token must be signed with HS256",
            ),
            (
                token(Algorithm::HS256, SECRET, json!({"exp": now() + 60})),
                "token has no sub",
            ),
            (
                token(Algorithm::HS256, SECRET, json!({"sub": ""})),
                "token has no sub",
            ),
            (
                token(Algorithm::HS256, SECRET, json!({"sub": "a", "meta": [1]})),
                "token meta must be an object",
            ),
            (
                token(Algorithm::HS256, SECRET, json!({"sub": 5})),
                "malformed token",
            ),
            ("not.a.jwt".to_owned(), "malformed token"),
            (
                // alg "none", unsigned.
                format!(
                    "{}.{}.",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(r#"{"alg":"none","typ":"JWT"}"#),
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"a"}"#)
                ),
                "malformed token",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(reason(v.verify(&t, now())), want, "{t}");
        }
    }

    #[test]
    fn exp_and_nbf_must_be_numeric_dates() {
        let v = Verifier::new(SECRET);
        let with = |claims: serde_json::Value| {
            reason(v.verify(&token(Algorithm::HS256, SECRET, claims), now()))
        };
        let bad_exp = "malformed token: exp must be a NumericDate";
        // The JWT crate itself refuses some shapes (then the reason is plain "malformed token").
        for exp in [
            json!(-1),
            json!("9999999999"),
            json!(true),
            json!(null),
            json!([]),
            json!({}),
        ] {
            let r = with(json!({"sub": "a", "exp": exp}));
            assert!(r == bad_exp || r == "malformed token", "exp {exp}: {r}");
        }
        // 2^64 and 1e400 as written in the token, not as any Rust number holds them.
        for exp in ["18446744073709551616", "1e400"] {
            let claims = RawValue::from_string(format!(r#"{{"sub":"a","exp":{exp}}}"#)).unwrap();
            let t = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap();
            assert_ne!(reason(v.verify(&t, now())), "accepted", "exp {exp}");
        }
        let bad_nbf = "malformed token: nbf must be a NumericDate";
        for nbf in [json!(-1), json!("0"), json!(false), json!(null), json!([1])] {
            let r = with(json!({"sub": "a", "nbf": nbf}));
            assert!(r == bad_nbf || r == "malformed token", "nbf {nbf}: {r}");
        }
        assert_eq!(
            with(json!({"sub": "a", "exp": now() as f64 + 60.5})),
            "accepted"
        );
        assert_eq!(with(json!({"sub": "a", "exp": now()})), "token expired");
        assert_eq!(
            with(json!({"sub": "a", "nbf": now() + 60})),
            "token not valid yet"
        );
        assert_eq!(
            with(json!({"sub": "a", "nbf": now() - 1, "exp": now() + 60})),
            "accepted"
        );
        // The clock is an input: the same token is fine before its exp and expired after.
        let t = token(Algorithm::HS256, SECRET, json!({"sub": "a", "exp": 1000}));
        assert_eq!(reason(v.verify(&t, 999)), "accepted");
        assert_eq!(reason(v.verify(&t, 1000)), "token expired");
    }
}
