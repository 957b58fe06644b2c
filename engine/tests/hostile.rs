//! What hostile or broken clients do, on real sockets against the released binary: starve the
//! admin listener, hold upgrades open, leave big buffers behind, close oddly, send tokens and
//! metas that break strict decoders. Each test bounds itself in count and time.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::http::{
    self, client_frame, close_payload, free_port, get, raw_ws, read_all, read_close, read_frame,
    send_request, upgrade_request,
};
use common::server::{Client, Server};
use serde_json::{json, Value};

fn from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

fn eventually(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time (clock ticks) the process's thread named `name` has used.
fn thread_ticks(pid: u32, name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, r)| r.split_whitespace().collect());
        total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    total
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn out_of_descriptors_the_admin_listener_backs_off_and_recovers() {
    let admin = free_port();
    let s = Server::start_with_fd_limit(
        96,
        &[
            "--admin-listen",
            &admin.to_string(),
            "--handshake-timeout-ms",
            "60000",
        ],
    );
    // Upgrades that never finish hold every descriptor the server has.
    let hogs: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Admin connections waiting in the backlog while accept fails with EMFILE.
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = thread_ticks(s.pid(), "roster-admin");
    std::thread::sleep(Duration::from_secs(2));
    let spent = thread_ticks(s.pid(), "roster-admin") - before;
    // 2 s at 100 ticks/s: a spinning accept loop takes ~200.
    assert!(
        spent < 20,
        "admin thread used {spent} ticks in 2 s out of descriptors"
    );
    drop(waiting);
    drop(hogs);
    eventually(
        "/healthz answers once descriptors are back",
        Duration::from_secs(5),
        || get(admin, "/healthz", None).0 == 200,
    );
}

#[test]
fn idle_admin_sockets_cannot_shut_out_healthz() {
    let admin = free_port();
    let _s = Server::start(&[
        "--admin-listen",
        &admin.to_string(),
        "--admin-timeout-ms",
        "1000",
    ]);
    // Far more idle sockets than the listener has slots (64).
    let mut idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut ok = 0;
    for _ in 0..40 {
        if get(admin, "/healthz", None) == (200, "ok\n".into()) {
            ok += 1;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(ok, 40, "every health check answered");
    // Each idle socket got a readable answer: 503 when pushed out, 408 at its deadline.
    for s in idle.iter_mut().take(20) {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let text = read_all(s);
        assert!(
            matches!(http::status(&text), 408 | 503),
            "idle socket got {text:?}"
        );
    }
    let late = &mut idle[199];
    late.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let text = read_all(late);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text:?}"
    );
}

#[test]
fn unfinished_upgrades_count_and_are_bounded() {
    let s = Server::start(&[
        "--shards",
        "2",
        "--max-conns-per-ip",
        "10",
        "--max-connections",
        "100",
        "--handshake-timeout-ms",
        "1500",
    ]);
    let base = open_fds(s.pid());
    let attacker = [127, 0, 0, 2];
    let mut held: Vec<TcpStream> = (0..300).map(|_| from(attacker, s.addr)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(s.pid());
    assert!(
        fds <= base + 12,
        "300 silent sockets from one address hold {} descriptors",
        fds - base
    );
    // The refused ones were told why; the ten admitted (which ten depends on how the shards
    // took them from their queues) still wait.
    let (waiting, refused) = split_by_answer(&mut held);
    assert_eq!((waiting.len(), refused.len()), (10, 290));
    for text in &refused {
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text:?}"
        );
        assert!(text.contains("too many connections from this address"));
    }
    // An honest client from elsewhere gets in while the attacker's ten wait.
    let honest = Client::with_request(from([127, 0, 0, 3], s.addr), s.addr, "user_id=ok", &[]);
    assert!(honest.is_ok(), "{:?}", honest.err());
    // The silent ten get 408 at the handshake deadline.
    let first = &mut held[waiting[0]];
    first
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let text = read_all(first);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text:?}"
    );
    assert!(text.contains("upgrade request not received in time"));
}

/// Which sockets have been answered (their answer, read whole) and which still wait (indices).
fn split_by_answer(sockets: &mut [TcpStream]) -> (Vec<usize>, Vec<String>) {
    let (mut waiting, mut answered) = (Vec::new(), Vec::new());
    for (i, s) in sockets.iter_mut().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut first = [0u8; 1];
        let got = s.peek(&mut first);
        s.set_nonblocking(false).unwrap();
        match got {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => waiting.push(i),
            _ => {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                answered.push(read_all(s));
            }
        }
    }
    (waiting, answered)
}

#[test]
fn upgrades_in_progress_are_bounded_in_total_and_per_address() {
    let s = Server::start(&[
        "--shards",
        "2",
        "--max-handshakes",
        "40",
        "--max-handshakes-per-ip",
        "15",
        "--handshake-timeout-ms",
        "30000",
    ]);
    let base = open_fds(s.pid());
    let mut held = Vec::new();
    for a in 2..8u8 {
        for _ in 0..30 {
            held.push(from([127, 0, 0, a], s.addr));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(s.pid());
    assert!(fds <= base + 45, "{} descriptors held", fds - base);
    let (waiting, answered) = split_by_answer(&mut held);
    // 40 wait, at most 15 of them from any one address (30 sockets each, in order).
    assert_eq!(waiting.len(), 40);
    for a in 0..6 {
        let from_a = waiting.iter().filter(|i| **i / 30 == a).count();
        assert!(
            from_a <= 15,
            "{from_a} upgrades in progress from one address"
        );
    }
    // Every other one was refused, readably.
    for text in &answered {
        let ok = text.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && text.contains("too many upgrades in progress")
            || text.starts_with("HTTP/1.1 429 Too Many Requests\r\n")
                && text.contains("too many upgrades in progress from this address");
        assert!(ok, "{text:?}");
    }
    // A finished upgrade gives its place back at once.
    drop(held);
    eventually("places come back", Duration::from_secs(5), || {
        Client::connect(s.addr, "later").is_ok()
    });
}

/// Heap bytes in use in the server (roster_heap_bytes).
fn heap(admin: SocketAddr) -> i64 {
    let (_, body) = get(admin, "/metrics", None);
    body.lines()
        .find_map(|l| l.strip_prefix("roster_heap_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("roster_heap_bytes")
}

#[test]
fn buffers_shrink_back_after_large_frames() {
    let admin = free_port();
    let s = Server::start(&["--admin-listen", &admin.to_string()]);
    const N: usize = 300;
    let mut clients: Vec<Client> = (0..N)
        .map(|i| Client::connect(s.addr, &format!("u{i}")).unwrap())
        .collect();
    for c in clients.iter_mut() {
        c.push("", "phoenix", "heartbeat", json!({}));
        c.until(|f| f[3] == "phx_reply");
    }
    std::thread::sleep(Duration::from_millis(200));
    let idle = heap(admin);
    // One large frame each: a heartbeat padded to 60 KB.
    let pad = "x".repeat(60_000);
    for c in clients.iter_mut() {
        c.push("", "phoenix", "heartbeat", json!({ "pad": pad }));
    }
    for c in clients.iter_mut() {
        c.until(|f| f[3] == "phx_reply");
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = heap(admin);
    let per_conn = (after - idle) / N as i64;
    assert!(
        per_conn < 2048,
        "each connection kept {per_conn} bytes after a 60 KB frame (heap {idle} -> {after})"
    );
    // A fragmented message, finished, leaves nothing behind either.
    let mut raw: Vec<TcpStream> = (0..50).map(|i| raw_ws(s.addr, &format!("f{i}"))).collect();
    let before_fragments = heap(admin);
    let frame = r#"[null,"1","phoenix","heartbeat",{}]"#.as_bytes();
    for r in raw.iter_mut() {
        r.write_all(&client_frame(false, 1, &frame[..10])).unwrap();
        r.write_all(&client_frame(false, 0, &[])).unwrap();
        r.write_all(&client_frame(true, 0, &frame[10..])).unwrap();
    }
    for r in raw.iter_mut() {
        let (op, payload) = read_frame(r).unwrap();
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&payload).contains("phx_reply"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let per_conn = (heap(admin) - before_fragments) / 50;
    assert!(
        per_conn < 2048,
        "{per_conn} bytes kept after a fragmented message"
    );
}

#[test]
fn unfinished_messages_and_pings_alone_do_not_keep_a_connection() {
    let s = Server::start(&[
        "--message-timeout-ms",
        "500",
        "--heartbeat-timeout-ms",
        "1500",
    ]);
    // The first fragment of a message, then only pings.
    let mut half = raw_ws(s.addr, "half");
    half.write_all(&client_frame(false, 1, b"[null,\"1\","))
        .unwrap();
    let started = Instant::now();
    let mut pinger = raw_ws(s.addr, "pinger");
    let pings = std::thread::spawn({
        let mut a = half.try_clone().unwrap();
        let mut b = pinger.try_clone().unwrap();
        move || {
            for _ in 0..45 {
                let _ = a.write_all(&client_frame(true, 9, b"p"));
                let _ = b.write_all(&client_frame(true, 9, b"p"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    assert_eq!(
        read_close(&mut half),
        Some((1008, "message not completed in time".into()))
    );
    // Closed within the message timeout plus a tick or two (generous: tests share the cores).
    assert!(started.elapsed() < Duration::from_secs(3));
    // Pongs come back, but pings are not activity: the heartbeat timeout still applies.
    let (op, _) = read_frame(&mut pinger).unwrap();
    assert_eq!(op, 10, "a pong");
    assert_eq!(
        read_close(&mut pinger),
        Some((1000, "heartbeat timeout".into()))
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    pings.join().unwrap();
}

#[test]
fn close_frames_are_echoed_and_bad_codes_get_1002() {
    let s = Server::start(&[]);
    for (sent, want) in [
        (1000, 1000),
        (1001, 1001),
        (4000, 4000),
        (3999, 3999),
        (999, 1002),
        (1004, 1002),
        (1005, 1002),
        (1006, 1002),
        (1015, 1002),
        (2999, 1002),
        (5000, 1002),
    ] {
        let mut ws = raw_ws(s.addr, "closer");
        ws.write_all(&client_frame(true, 8, &close_payload(sent, "bye")))
            .unwrap();
        let got = read_close(&mut ws).map(|(code, _)| code);
        assert_eq!(got, Some(want), "close {sent}");
    }
    // A client library sees its own code come back rather than 1006.
    let mut c = Client::connect(s.addr, "lib").unwrap();
    c.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: 4001.into(),
        reason: "done".into(),
    }))
    .unwrap();
    let echoed = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Close(f)) => break f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(echoed, Some(4001));
}

#[test]
fn metas_strict_decoders_refuse_get_an_error_reply() {
    let s = Server::start(&[]);
    let mut c = Client::connect(s.addr, "meta").unwrap();
    let mut watcher = Client::connect(s.addr, "watcher").unwrap();
    watcher.join("room:m", json!({"track": false}));
    let reason = "meta must be valid JSON: no lone surrogate escapes, numbers within range";
    for (i, meta) in [
        r#"{"a":"\ud800"}"#,
        r#"{"n":1e400}"#,
        r#"{"\udc00":1,"b":2}"#,
    ]
    .iter()
    .enumerate()
    {
        let frame = format!(r#"["{i}","r{i}","room:m","phx_join",{{"meta":{meta}}}]"#);
        c.ws.send(tungstenite::Message::text(frame)).unwrap();
        let reply = c.until(|f| f[1] == format!("r{i}").as_str());
        assert_eq!(reply[4]["status"], "error", "{meta}: {reply}");
        assert_eq!(reply[4]["response"]["reason"], reason, "{meta}");
    }
    // The same on an update, and the connection lives on.
    c.join("room:m", json!({"meta": {"a": 1}}));
    let diff = watcher.until(|f| f[3] == "presence_diff");
    assert!(diff[4]["joins"]["meta"].is_object(), "{diff}");
    c.ws.send(tungstenite::Message::text(
        r#"["jroom:m","u1","room:m","presence_update",{"meta":{"x":"\udfff"}}]"#,
    ))
    .unwrap();
    let reply = c.until(|f| f[1] == "u1");
    assert_eq!(reply[4]["response"]["reason"], reason, "{reply}");
    // Nothing but valid JSON reached the watcher.
    c.push(
        "jroom:m",
        "room:m",
        "presence_update",
        json!({"meta": {"a": 2}}),
    );
    let diff: Value = watcher.until(|f| f[3] == "presence_diff");
    assert_eq!(diff[4]["joins"]["meta"]["metas"][0]["a"], 2, "{diff}");
}

#[test]
fn tokens_with_bad_dates_are_refused() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let secret = "hostile-test-secret-of-at-least-32-bytes";
    let dir = std::env::temp_dir().join(format!("roster-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, secret).unwrap();
    let s = Server::start(&["--secret-file", file.to_str().unwrap()]);
    let key = EncodingKey::from_secret(secret.as_bytes());
    let raw = |claims: &str| {
        let claims = serde_json::value::RawValue::from_string(claims.to_owned()).unwrap();
        encode(&Header::default(), &claims, &key).unwrap()
    };
    for exp in [
        "-1",
        "18446744073709551616",
        "\"9999999999\"",
        "true",
        "null",
        "[]",
    ] {
        let t = raw(&format!(r#"{{"sub":"a","exp":{exp}}}"#));
        let r = Client::with_query(s.addr, &format!("token={t}"), None);
        let refusal = r.err().unwrap_or_default();
        assert!(
            refusal.starts_with("401 malformed token"),
            "exp {exp}: {refusal}"
        );
    }
    let t = raw(r#"{"sub":"a","nbf":4102444800}"#);
    assert_eq!(
        Client::with_query(s.addr, &format!("token={t}"), None).err(),
        Some("401 token not valid yet".to_owned())
    );
    let good = raw(r#"{"sub":"a","exp":4102444800}"#);
    assert!(Client::with_query(s.addr, &format!("token={good}"), None).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn upgrade_requests_are_held_to_rfc_6455() {
    let s = Server::start(&[]);
    let good = upgrade_request("vsn=2.0.0&user_id=a");
    let cases = [
        (
            good.replace("dGhlIHNhbXBsZSBub25jZQ==", "not-a-key"),
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        ),
        (
            good.replace("dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAA"),
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        ),
        (
            good.replace("HTTP/1.1\r\n", "HTTP/1.0\r\n"),
            "HTTP/1.1 is required",
        ),
        (upgrade_request("user_id=a"), "missing vsn"),
    ];
    for (req, reason) in cases {
        let (status, text) = send_request(s.addr, &req);
        assert_eq!(status, 400, "{text}");
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains(reason), "{text}");
    }
    let (status, text) = send_request(s.addr, &good.replace("Version: 13", "Version: 8"));
    assert_eq!(status, 400);
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
}

#[test]
fn a_client_that_half_closes_after_its_join_still_gets_its_reply() {
    let s = Server::start(&["--shards", "2"]);
    // Topics on both shards: one join answered here, one by the other shard's owner.
    for topic in ["room:half-1", "room:half-2", "room:half-3"] {
        let mut ws = raw_ws(s.addr, "half");
        let join = format!(r#"["1","1","{topic}","phx_join",{{"meta":{{}}}}]"#);
        ws.write_all(&client_frame(true, 1, join.as_bytes()))
            .unwrap();
        ws.shutdown(Shutdown::Write).unwrap();
        let mut events = Vec::new();
        while let Some((op, payload)) = read_frame(&mut ws) {
            if op == 1 {
                let f: Value = serde_json::from_slice(&payload).unwrap();
                events.push(f[3].as_str().unwrap().to_owned());
            }
        }
        // Its own join's diff may follow: it is subscribed until the server ends it.
        assert!(
            events.starts_with(&["phx_reply".to_owned(), "presence_state".to_owned()]),
            "{topic}: {events:?}"
        );
    }
}
