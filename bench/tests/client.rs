//! The load generator's client against a scripted WebSocket server (tungstenite on a thread):
//! it rejoins a channel the server crashed (`phx_error`) after phoenix.js's first backoff,
//! counting the crash, and sends heartbeats while it reads.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use roster_bench::client::{set_heartbeat, Client, CRASHED_CHANNELS};
use tungstenite::Message;

#[test]
fn a_crashed_channel_is_rejoined_and_heartbeats_go_out_while_reading() {
    set_heartbeat(Some(Duration::from_millis(300)));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The server: takes the join, crashes the channel, then records what comes for 2.6 s.
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut ws = tungstenite::accept(stream).expect("handshake");
        let mut got: Vec<(Duration, String)> = Vec::new();
        let start = Instant::now();
        let mut crashed = false;
        while start.elapsed() < Duration::from_millis(2600) {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let t = t.as_str().to_owned();
                    if t.contains("phx_join") && !crashed {
                        crashed = true;
                        let error = r#"["1","1","room:x","phx_error",{}]"#;
                        ws.send(Message::text(error)).expect("send");
                    }
                    got.push((start.elapsed(), t));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                // The client is done (it holds 2.5 s, then drops the connection).
                Err(_) => break,
            }
        }
        got
    });
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let mut client = Client::connect(addr, None, "/socket", "vsn=2.0.0")
                .await
                .expect("connect");
            let join = r#"["1","1","room:x","phx_join",{}]"#.to_owned();
            client.send(join).await.expect("join");
            let until = Instant::now() + Duration::from_millis(2500);
            client.hold(until).await;
        })
        .expect("executor")
        .join()
        .expect("client");
    let got = server.join().expect("server");
    let joins: Vec<Duration> = got
        .iter()
        .filter(|(_, t)| t.contains("phx_join"))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(joins.len(), 2, "the join and one rejoin: {got:?}");
    let backoff = joins[1] - joins[0];
    assert!(
        backoff >= Duration::from_millis(950) && backoff < Duration::from_millis(2000),
        "rejoined after phoenix.js's 1 s: {backoff:?}"
    );
    assert_eq!(CRASHED_CHANNELS.load(Ordering::Relaxed), 1);
    let beats = got.iter().filter(|(_, t)| t.contains("heartbeat")).count();
    assert!(
        beats >= 3,
        "a heartbeat every 300 ms while reading: {got:?}"
    );
}
