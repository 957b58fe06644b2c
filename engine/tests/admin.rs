//! The admin listener on real sockets: health, Prometheus metrics that move as connections come
//! and go, the topic and user API answering what the clients see, and its API key.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::http::{free_port, get};
use common::server::{Client, Server};
use serde_json::{json, Value};

const KEY: &str = "admin-test-key";

/// Sum over shards of a metric's samples.
fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (_, body) = get(admin, "/metrics", Some(KEY));
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_metrics_and_api() {
    let admin = free_port();
    let s = Server::start(&[
        "--shards",
        "2",
        "--admin-listen",
        &admin.to_string(),
        "--api-key",
        KEY,
    ]);
    assert_eq!(get(admin, "/healthz", None), (200, "ok\n".into()));
    assert_eq!(get(admin, "/metrics", None).0, 401);
    assert_eq!(get(admin, "/metrics", Some("wrong")).0, 401);
    assert_eq!(get(admin, "/api/users/alice", None).0, 401);
    assert_eq!(get(admin, "/nope", Some(KEY)).0, 404);
    let (status, body) = get(admin, "/metrics", Some(KEY));
    assert_eq!(status, 200);
    assert!(body.contains("roster_connections{shard=\"0\"}"), "{body}");
    assert!(body.contains("# EOF"), "{body}");

    // Metrics move as connections come and go.
    let before = metric(admin, "roster_connections");
    let mut alice = Client::connect(s.addr, "alice").unwrap();
    let mut bob = Client::connect(s.addr, "bob").unwrap();
    eventually("2 more connections", || {
        metric(admin, "roster_connections") == before + 2
    });
    let state = alice.join("room:api", json!({"meta": {"page": "/a"}}));
    assert_eq!(state, json!({}));
    bob.join("room:api", json!({"meta": {"page": "/b"}}));
    bob.join("doc:\"7\"", json!({"meta": {"x": 1}}));
    eventually("3 presences", || metric(admin, "roster_presences") == 3);

    // The API answers what a client of the topic sees.
    let mut view = Value::Null;
    eventually("alice's view has both", || {
        if let Some(f) = alice.recv() {
            if f[3] == "presence_diff" && f[4]["joins"]["bob"].is_object() {
                view = f;
                return true;
            }
        }
        false
    });
    let (status, body) = get(admin, "/api/topics/room:api", Some(KEY));
    assert_eq!(status, 200, "{body}");
    let t: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (&t["topic"], &t["keys"], &t["metas"]),
        (&json!("room:api"), &json!(2), &json!(2))
    );
    assert_eq!(
        t["presences"]["bob"]["metas"][0],
        view[4]["joins"]["bob"]["metas"][0]
    );
    assert_eq!(t["presences"]["alice"]["metas"][0]["page"], "/a");
    let (_, body) = get(admin, "/api/topics/room:api?limit=1", Some(KEY));
    let t: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (
            t["keys"].clone(),
            t["presences"].as_object().map(|o| o.len())
        ),
        (json!(2), Some(1))
    );
    // Topic names are percent-decoded.
    let (_, body) = get(admin, "/api/topics/doc:%227%22", Some(KEY));
    let t: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(t["topic"], "doc:\"7\"");
    assert_eq!(t["presences"]["bob"]["metas"][0]["x"], 1);

    let (_, body) = get(admin, "/api/users/bob", Some(KEY));
    let u: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(u["online"], true);
    let mut topics: Vec<&str> = u["presences"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["topic"].as_str())
        .collect();
    topics.sort();
    assert_eq!(topics, ["doc:\"7\"", "room:api"]);
    drop(bob);
    eventually("bob offline", || {
        let (_, body) = get(admin, "/api/users/bob", Some(KEY));
        serde_json::from_str::<Value>(&body)
            .is_ok_and(|u| u["online"] == false && u["presences"] == json!([]))
    });
    eventually("a connection fewer", || {
        metric(admin, "roster_connections") == before + 1
    });
    let (_, body) = get(admin, "/metrics", Some(KEY));
    assert_eq!(
        metric(admin, "roster_messages_in_total"),
        3,
        "three joins: {body}"
    );

    // Errors and refused upgrades are counted by reason, as valid exposition even when the
    // reason quotes.
    let r = alice.push("", "room:never", "shout", json!({}));
    alice.until(|f| f[1] == r.as_str());
    let r = alice.push("q", "room:q", "phx_join", json!({"presence": "bogus"}));
    alice.until(|f| f[1] == r.as_str());
    let refused = Client::with_request(
        TcpStream::connect(s.addr).unwrap(),
        s.addr,
        "vsn=1.0.0",
        &[],
    );
    assert!(refused.is_err());
    eventually("errors by reason", || {
        let (_, body) = get(admin, "/metrics", Some(KEY));
        let has = |metric: &str, reason: &str| {
            body.lines()
                .any(|l| l.starts_with(metric) && l.contains(reason))
        };
        has("roster_errors_total{", "reason=\"unmatched topic\"")
            && has("roster_handshake_refusals_total{", "unsupported vsn")
            && has(
                "roster_errors_total{",
                r#"reason="presence must be \"full\", \"count\" or \"none\"""#,
            )
    });
}

#[test]
fn a_slow_admin_client_does_not_hold_up_health_checks() {
    let admin = free_port();
    let _s = Server::start(&["--admin-listen", &admin.to_string()]);
    // Dribbles half a request and never finishes it; another never reads its answer.
    let mut slow = TcpStream::connect(admin).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let mut deaf = TcpStream::connect(admin).unwrap();
    deaf.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let started = Instant::now();
    assert_eq!(get(admin, "/healthz", None), (200, "ok\n".into()));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
