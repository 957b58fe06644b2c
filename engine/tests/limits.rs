//! Limits at the door and on the wire, on real sockets: allowed origins, connections in total
//! and per source address, and messages per second, each with its documented answer, leaving
//! everyone else working.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::server::{Client, Server};
use serde_json::json;
use tungstenite::Message;

fn from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

fn attempt(s: &Server, source: [u8; 4], headers: &[(&str, &str)]) -> Result<Client, String> {
    Client::with_request(from(source, s.addr), s.addr, "user_id=x", headers)
}

fn refused(r: Result<Client, String>) -> String {
    r.map(|_| "accepted".to_owned()).unwrap_or_else(|e| e)
}

#[test]
fn only_allowed_browser_origins_get_in() {
    let s = Server::start(&[
        "--allowed-origin",
        "https://app.example",
        "--allowed-origin",
        "https://b.example",
    ]);
    let local = [127, 0, 0, 1];
    assert!(attempt(&s, local, &[("Origin", "https://app.example")]).is_ok());
    assert!(attempt(&s, local, &[("Origin", "https://b.example")]).is_ok());
    assert_eq!(
        refused(attempt(&s, local, &[("Origin", "https://evil.example")])),
        "403 origin not allowed"
    );
    assert!(
        attempt(&s, local, &[]).is_ok(),
        "no Origin: not a browser, not checked"
    );
}

#[test]
fn connections_are_limited_per_address_and_in_total() {
    let s = Server::start(&[
        "--shards",
        "2",
        "--max-conns-per-ip",
        "2",
        "--max-connections",
        "3",
    ]);
    let (a, b, c) = ([127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]);
    let a1 = attempt(&s, a, &[]).expect("a1");
    let _a2 = attempt(&s, a, &[]).expect("a2");
    assert_eq!(
        refused(attempt(&s, a, &[])),
        "429 too many connections from this address"
    );
    let _b1 = attempt(&s, b, &[]).expect("b1");
    assert_eq!(
        refused(attempt(&s, c, &[])),
        "503 server full: too many connections"
    );
    // A place comes back when a connection ends.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c1 = loop {
        match attempt(&s, c, &[]) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "no place came back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(c1.join("room:limits", json!({})).is_object());
}

#[test]
fn a_client_over_its_message_rate_is_closed_and_leaves() {
    let s = Server::start(&["--shards", "2", "--max-msgs-per-sec", "20"]);
    let mut watcher = Client::connect(s.addr, "watcher").unwrap();
    watcher.join("room:rate", json!({"track": false}));
    let mut fast = Client::connect(s.addr, "fast").unwrap();
    fast.join("room:rate", json!({}));
    watcher.until(|f| f[3] == "presence_diff" && f[4]["joins"]["fast"].is_object());
    // A second's worth is fine; then far more than 20 a second.
    for _ in 0..100 {
        if fast
            .ws
            .send(Message::text(r#"[null,"h","phoenix","heartbeat",{}]"#))
            .is_err()
        {
            break;
        }
    }
    assert_eq!(
        close_of(&mut fast),
        Some((1008, "rate limit: too many messages per second".to_owned()))
    );
    let left = watcher.until(|f| f[3] == "presence_diff" && f[4]["leaves"]["fast"].is_object());
    assert!(left[4]["leaves"]["fast"]["metas"].is_array());
    // Pings count too (they are answered, but a flood of them is still a flood).
    let mut pinger = Client::connect(s.addr, "pinger").unwrap();
    pinger.join("room:rate", json!({}));
    watcher.until(|f| f[3] == "presence_diff" && f[4]["joins"]["pinger"].is_object());
    for _ in 0..100 {
        if pinger.ws.send(Message::Ping(vec![1].into())).is_err() {
            break;
        }
    }
    assert_eq!(
        close_of(&mut pinger),
        Some((1008, "rate limit: too many messages per second".to_owned()))
    );
    watcher.until(|f| f[3] == "presence_diff" && f[4]["leaves"]["pinger"].is_object());
    // The watcher, under its rate, is fine.
    let r = watcher.push("", "phoenix", "heartbeat", json!({}));
    assert_eq!(watcher.until(|f| f[1] == r.as_str())[4]["status"], "ok");
}

/// The close frame the server sends next (frames before it are skipped).
fn close_of(c: &mut Client) -> Option<(u16, String)> {
    loop {
        match c.ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Ok(_) => {}
            Err(e) => panic!("expected a close frame: {e}"),
        }
    }
}
