//! The client contract of PROTOCOL.md on real sockets, from Rust: join, state, diffs, update,
//! leave, close, and the errors and close codes. (The phoenix.js tests in tests/js check the same
//! with the official client.)

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::server::{Client, Server};
use serde_json::json;
use tungstenite::Message;

fn server() -> Server {
    Server::start(&[
        "--shards",
        "3",
        "--max-topics-per-conn",
        "2",
        "--max-meta-bytes",
        "64",
        "--max-frame-bytes",
        "4096",
    ])
}

#[test]
fn join_state_diffs_update_leave_across_shards() {
    let s = server();
    let mut a = Client::connect(s.addr, "alice").unwrap();
    let mut b = Client::connect(s.addr, "bob").unwrap();
    // Alice's state is taken before her own presence, which reaches her in the next diff.
    assert_eq!(a.join("room:1", json!({"meta": {"p": 1}})), json!({}));
    let own = a.until(|f| f[3] == "presence_diff");
    assert_eq!(own[0], json!(null));
    assert_eq!(own[1], json!(null));
    assert_eq!(own[4]["joins"]["alice"]["metas"][0]["p"], 1);
    let state = b.join("room:1", json!({"meta": {"p": 2}}));
    assert_eq!(state["alice"]["metas"][0]["p"], 1);
    let d = a.until(|f| f[3] == "presence_diff");
    assert_eq!(d[4]["joins"]["bob"]["metas"][0]["p"], 2);
    let r = b.push(
        "jroom:1",
        "room:1",
        "presence_update",
        json!({"meta": {"p": 3}}),
    );
    assert_eq!(b.until(|f| f[1] == r.as_str())[4]["status"], "ok");
    let d = a.until(|f| f[3] == "presence_diff");
    let (joined, left) = (
        &d[4]["joins"]["bob"]["metas"][0],
        &d[4]["leaves"]["bob"]["metas"][0],
    );
    assert_eq!(
        (joined["p"].clone(), left["p"].clone()),
        (json!(3), json!(2))
    );
    assert_eq!(joined["phx_ref_prev"], left["phx_ref"]);
    let r = b.push("jroom:1", "room:1", "phx_leave", json!({}));
    assert_eq!(b.until(|f| f[1] == r.as_str())[4]["status"], "ok");
    let d = a.until(|f| f[3] == "presence_diff");
    assert_eq!(d[4]["leaves"]["bob"]["metas"][0]["p"], 3);
    drop(b);
    // Closing leaves every topic: Carol sees Alice go when Alice's socket closes.
    let mut c = Client::connect(s.addr, "carol").unwrap();
    assert!(c.join("room:1", json!({"track": false}))["alice"].is_object());
    a.ws.close(None).unwrap();
    let d = c.until(|f| f[3] == "presence_diff");
    assert_eq!(d[4]["leaves"]["alice"]["metas"][0]["p"], 1);
}

#[test]
fn error_replies_leave_the_connection_working() {
    let s = server();
    let mut c = Client::connect(s.addr, "erin").unwrap();
    let reason = |c: &mut Client, r: String| {
        c.until(|f| f[1] == r.as_str())[4]["response"]["reason"].clone()
    };
    let r = c.push("x", "room:none", "presence_update", json!({"meta": {}}));
    assert_eq!(reason(&mut c, r), "unmatched topic");
    c.join("room:a", json!({}));
    let r = c.push("jroom:a", "room:a", "shout", json!({}));
    assert_eq!(reason(&mut c, r), "unknown event");
    let r = c.push(
        "jroom:b",
        "room:b",
        "phx_join",
        json!({"meta": {"pad": "z".repeat(100)}}),
    );
    assert_eq!(reason(&mut c, r), "meta too large");
    c.join("room:b", json!({}));
    let r = c.push("jroom:c", "room:c", "phx_join", json!({}));
    assert_eq!(reason(&mut c, r), "too many channels joined");
    let r = c.push(
        "jroom:a",
        "room:a",
        "presence_update",
        json!({"meta": {"ok": true}}),
    );
    assert_eq!(c.until(|f| f[1] == r.as_str())[4]["status"], "ok");
    let r = c.push("", "phoenix", "heartbeat", json!({}));
    assert_eq!(
        c.until(|f| f[1] == r.as_str())[4],
        json!({"status": "ok", "response": {}})
    );
}

fn close_code(c: &mut Client) -> (u16, String) {
    loop {
        match c.ws.read() {
            Ok(Message::Close(Some(f))) => return (f.code.into(), f.reason.to_string()),
            Ok(Message::Close(None)) => return (0, String::new()),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

#[test]
fn bad_frames_close_with_their_codes_and_presences_leave() {
    let s = server();
    let mut watcher = Client::connect(s.addr, "watcher").unwrap();
    watcher.join("room:w", json!({"track": false}));
    for (i, (frame, code)) in [
        (Message::text("[1,2]"), 1007),
        (Message::text("{"), 1007),
        (Message::binary(vec![1u8, 2, 3]), 1003),
        (
            Message::text(format!(
                "[null,\"1\",\"t\",\"e\",{{\"x\":\"{}\"}}]",
                "y".repeat(8000)
            )),
            1009,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let key = format!("bad{i}");
        let mut bad = Client::connect(s.addr, &key).unwrap();
        bad.join("room:w", json!({}));
        watcher.until(|f| f[3] == "presence_diff" && f[4]["joins"][&key].is_object());
        bad.ws.send(frame).unwrap();
        let (got, reason) = close_code(&mut bad);
        assert_eq!(got, code, "{reason}");
        assert!(!reason.is_empty());
        watcher.until(|f| f[3] == "presence_diff" && f[4]["leaves"][&key].is_object());
    }
}

#[test]
fn handshake_refusals_are_http_errors_with_reasons() {
    use std::io::{Read, Write};
    let s = server();
    for (target, status) in [("/socket/websocket?vsn=1.0.0", "400"), ("/nowhere", "404")] {
        let mut t = TcpStream::connect(s.addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(t, "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5a2V5\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut text = String::new();
        let _ = t.read_to_string(&mut text);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(
            text.lines().last().is_some_and(|l| !l.is_empty()),
            "a reason in the body: {text}"
        );
    }
}

/// A state over 64 KiB is written from the shared frame rather than copied per connection; what
/// is queued after it (replies, diffs, pongs) must still arrive after it, whole.
#[test]
fn a_large_state_arrives_whole_and_in_order() {
    let s = Server::start(&["--shards", "2", "--max-meta-bytes", "4096"]);
    let pad = "m".repeat(3000);
    let members: Vec<Client> = (0..40)
        .map(|i| {
            let mut c = Client::connect(s.addr, &format!("member{i}")).unwrap();
            let r = c.push(
                "m",
                "room:big",
                "phx_join",
                json!({"meta": {"pad": pad}, "presence": "none"}),
            );
            c.until(|f| f[1] == r.as_str());
            c
        })
        .collect();
    for round in 0..3 {
        // A key of its own each round: the last round's joiner may still be leaving (its leave
        // and this join reach the owner over different rings, in either order).
        let key = format!("joiner{round}");
        let mut joiner = Client::connect(s.addr, &key).unwrap();
        let r = joiner.push("j", "room:big", "phx_join", json!({"meta": {"me": 1}}));
        // Queued right behind the state: a heartbeat reply, and a ping's pong.
        let hb = joiner.push("", "phoenix", "heartbeat", json!({}));
        joiner.ws.send(Message::Ping(vec![7u8; 4].into())).unwrap();
        let mut frames = Vec::new();
        // (The heartbeat may be read only once the state is out: roster stops reading a client
        // it owes more than 64 KiB.)
        let seen = |frames: &[serde_json::Value], p: &dyn Fn(&serde_json::Value) -> bool| {
            frames.iter().any(p)
        };
        let own_join = |f: &serde_json::Value| {
            f[3] == "presence_diff" && f[4]["joins"].get(key.as_str()).is_some()
        };
        while !seen(&frames, &own_join) || !seen(&frames, &|f| f[1] == hb.as_str()) {
            frames.push(joiner.recv().expect("connection open"));
        }
        let at = |pred: &dyn Fn(&serde_json::Value) -> bool| frames.iter().position(pred);
        let reply = at(&|f| f[1] == r.as_str()).expect("join reply");
        let state = at(&|f| f[3] == "presence_state").expect("state");
        let own = at(&own_join).expect("own join");
        assert!(reply < state && state < own, "{:?}", (reply, state, own));
        let members = frames[state][4]
            .as_object()
            .map_or(0, |o| o.keys().filter(|k| k.starts_with("member")).count());
        assert_eq!(members, 40);
        assert!(frames[state].to_string().len() > 120_000);
        assert_eq!(frames[own][4]["joins"][&key]["metas"][0]["me"], 1);
    }
    // Nothing else from the client this time: what is queued behind the big state (its own
    // join's diff) must still go out without any further event to wake the connection.
    let mut quiet = Client::connect(s.addr, "quiet").unwrap();
    quiet
        .ws
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    quiet.push("j", "room:big", "phx_join", json!({"meta": {"me": 2}}));
    let own = quiet.until(|f| f[3] == "presence_diff");
    assert_eq!(own[4]["joins"]["quiet"]["metas"][0]["me"], 2);
    drop(members);
}

/// SO_REUSEPORT would let a second server share the port with the first and split the clients
/// between two servers that know nothing of each other; the second must refuse to start.
#[test]
fn a_second_server_on_the_same_address_refuses_to_start() {
    let s = Server::start(&["--shards", "2"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["--listen", &s.addr.to_string(), "--shards", "1"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    // The first one is untouched.
    let mut c = Client::connect(s.addr, "still-here").unwrap();
    assert!(c.join("room:x", json!({})).is_object());
}
