//! Signed tokens at the handshake, topic permissions and meta claims, on real sockets: with a
//! secret configured, only a valid HS256 token gets in, as the key its `sub` names.

mod common;

use common::server::{Client, Server};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "an HS256 secret of at least 32 bytes, for tests only";

fn server() -> (Server, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("roster-secret-{}", std::process::id()));
    std::fs::write(&path, format!("{SECRET}\n")).expect("secret file");
    let s = Server::start(&[
        "--shards",
        "2",
        "--secret-file",
        path.to_str().expect("path"),
    ]);
    (s, path)
}

fn token(alg: Algorithm, secret: &str, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn refusal(r: Result<Client, String>) -> String {
    match r {
        Ok(_) => "accepted".into(),
        Err(e) => e,
    }
}

#[test]
fn tokens_are_checked_at_the_handshake() {
    let (s, path) = server();
    let good = token(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "alice", "exp": now() + 60}),
    );
    let cases = [
        ("user_id=alice".to_owned(), None, "401 missing token"),
        (
            format!(
                "token={}",
                token(
                    Algorithm::HS256,
                    "another secret, also 32 bytes long!!",
                    json!({"sub": "alice"})
                )
            ),
            None,
            "401 token signature does not verify",
        ),
        (
            format!(
                "token={}",
                token(
                    Algorithm::HS256,
                    SECRET,
                    json!({"sub": "alice", "exp": now() - 5})
                )
            ),
            None,
            "401 token expired",
        ),
        (
            format!(
                "token={}",
                token(Algorithm::HS512, SECRET, json!({"sub": "alice"}))
            ),
            None,
            "401 token must be signed with HS256",
        ),
        ("token=garbage".to_owned(), None, "401 malformed token"),
        (
            format!(
                "token={}",
                token(Algorithm::HS256, SECRET, json!({"exp": now() + 60}))
            ),
            None,
            "401 token has no sub",
        ),
        (String::new(), Some("not base64 !"), "401 malformed token"),
    ];
    for (query, protocol, want) in cases {
        assert_eq!(
            refusal(Client::with_query(s.addr, &query, protocol)),
            want,
            "{query}"
        );
    }
    // A valid token, either way it may come; user_id cannot override its sub.
    for (query, protocol) in [
        (format!("token={good}&user_id=mallory"), None),
        ("user_id=mallory".to_owned(), Some(good.as_str())),
    ] {
        let mut c = Client::with_query(s.addr, &query, protocol).expect("accepted");
        c.join("room:auth", json!({"meta": {}}));
        let own = c.until(|f| f[3] == "presence_diff");
        assert!(own[4]["joins"]["alice"].is_object(), "{own}");
    }
    let _ = std::fs::remove_file(path);
}

#[test]
fn topics_and_meta_claims_are_enforced() {
    let (s, path) = server();
    let t = token(
        Algorithm::HS256,
        SECRET,
        json!({"sub": "bob", "topics": ["room:*", "doc:7"], "meta": {"role": "member", "name": "Bob"}}),
    );
    let mut c = Client::with_query(s.addr, &format!("token={t}"), None).expect("accepted");
    for topic in ["lobby", "doc:8", "watch:friends", "roo"] {
        let r = c.push("j", topic, "phx_join", json!({"meta": {}}));
        let reply = c.until(|f| f[1] == r.as_str());
        assert_eq!(
            reply[4]["response"]["reason"], "unauthorized",
            "{topic}: {reply}"
        );
    }
    // Allowed topics work; the claims win over the client's own fields.
    c.join("doc:7", json!({"meta": {"role": "admin", "page": 3}}));
    let own = c.until(|f| f[3] == "presence_diff");
    let meta = &own[4]["joins"]["bob"]["metas"][0];
    assert_eq!(
        (&meta["role"], &meta["name"], &meta["page"]),
        (&json!("member"), &json!("Bob"), &json!(3)),
        "{own}"
    );
    let r = c.push(
        "jdoc:7",
        "doc:7",
        "presence_update",
        json!({"meta": {"role": "owner"}}),
    );
    c.until(|f| f[1] == r.as_str());
    let d = c.until(|f| f[3] == "presence_diff");
    assert_eq!(d[4]["joins"]["bob"]["metas"][0]["role"], "member", "{d}");
    assert!(c.join("room:anything", json!({})).is_object());
    // Nothing was tracked for the refused joins.
    let mut watcher = Client::with_query(
        s.addr,
        &format!(
            "token={}",
            token(Algorithm::HS256, SECRET, json!({"sub": "w"}))
        ),
        None,
    )
    .expect("accepted");
    assert_eq!(watcher.join("lobby", json!({"track": false})), json!({}));
    let _ = std::fs::remove_file(path);
}
