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
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    topics: Option<Vec<String>>,
    meta: Option<Box<RawValue>>,
}

fn refuse(status: u16, reason: &'static str) -> Reject {
    Reject { status, reason }
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is honoured when present, not required; no clock leeway.
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        // roster does not know its audience: an `aud` claim is allowed and not checked.
        validation.validate_aud = false;
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The identity a token proves, or why it proves none (HTTP 401).
    pub fn verify(&self, token: &str) -> Result<Identity, Reject> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => refuse(401, "token expired"),
                ErrorKind::InvalidSignature => refuse(401, "token signature does not verify"),
                ErrorKind::InvalidAlgorithm => refuse(401, "token must be signed with HS256"),
                _ => refuse(401, "malformed token"),
            },
        )?;
        let claims = data.claims;
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
        })
    }

    /// The connection's identity from its upgrade request.
    pub fn identify(&self, upgrade: &Upgrade) -> Result<Identity, Reject> {
        if let Some(token) = upgrade.token.as_deref() {
            return self.verify(token);
        }
        if let Some(encoded) = upgrade.protocol_token.as_deref() {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .map_err(|_| refuse(401, "malformed token"))?;
            let token = std::str::from_utf8(&bytes).map_err(|_| refuse(401, "malformed token"))?;
            return self.verify(token);
        }
        Err(refuse(401, "missing token"))
    }
}

/// Development mode: `user_id` names the key, or a random one is made; nothing is verified.
pub fn unverified(upgrade: &Upgrade) -> Identity {
    let key = match upgrade.user_id.as_deref().filter(|u| !u.is_empty()) {
        Some(id) => UserKey::new(id),
        None => UserKey::new(&format!("anon-{:016x}", fastrand::u64(..))),
    };
    Identity { key, grants: None }
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
        let id = v.verify(&t).unwrap();
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
        assert_eq!(v.verify(&t).unwrap().key.as_str(), "carol");
        // No exp, no topics, no meta: fine.
        let id = v
            .verify(&token(Algorithm::HS256, SECRET, json!({"sub": "bob"})))
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
            assert_eq!(reason(v.verify(&t)), want, "{t}");
        }
    }
}
