//! events-bench: what presence events cost roster, measured on real sockets (loopback only).
//!
//! 1. Side by side in one run, rounds alternating: the same join/leave load against a roster
//!    without webhooks and one with a webhook to a fast receiver; the server's CPU time per
//!    presence change (from /proc, the events and webhook threads included) and the changes
//!    per second the clients got through.
//! 2. A slow receiver (each POST answered after --slow-ms) behind a small queue: the events a
//!    second the node delivers with its queue full, what it dropped (its /metrics), and the
//!    clients' join round trip meanwhile beside the run without webhooks.
//!
//! Starts its own roster processes (--roster, default target/release/roster) and stops them by
//! their PIDs; every load is bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use roster_bench::report::{median, percentiles};

#[derive(Parser)]
#[command(about = "Cost of presence events and webhooks in roster (loopback only)")]
struct Cli {
    /// The roster binary.
    #[arg(long, default_value = "target/release/roster")]
    roster: String,
    /// Client connections, each joining and leaving its own topic in turn.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds of the side-by-side comparison (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How long the slow receiver takes to answer each POST.
    #[arg(long, default_value_t = 50)]
    slow_ms: u64,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A webhook receiver: counts the events of every POST, answers 200 after `delay`.
struct Receiver {
    port: u16,
    events: Arc<AtomicU64>,
}

fn receiver(delay: Duration) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
    let port = listener.local_addr().expect("its address").port();
    let events = Arc::new(AtomicU64::new(0));
    let counted = events.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counted = counted.clone();
            std::thread::spawn(move || serve(stream, delay, &counted));
        }
    });
    Receiver { port, events }
}

fn serve(stream: TcpStream, delay: Duration, counted: &AtomicU64) {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = body.windows(5).filter(|w| w == b"\"id\":").count();
        std::thread::sleep(delay);
        counted.fetch_add(n as u64, Ordering::Relaxed);
        if out
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// A roster process of this run, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    admin: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(roster: &str, extra: &[String]) -> Server {
    let (port, admin) = (free_port(), free_port());
    let child = Command::new(roster)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--shards", "1"])
        // The clients send as fast as replies come, far past the default 200 a second.
        .args(["--max-msgs-per-sec", "0"])
        .args(extra)
        .env("ROSTER_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {roster}: {e}"));
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "roster did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port, admin }
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A metric's value from the server's /metrics (the sum of its series).
fn metric(admin: u16, name: &str) -> f64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What one load window did.
struct Window {
    changes: u64,
    seconds: f64,
    cpu: f64,
    joins: Histogram<u64>,
}

/// `clients` connections join (tracked, presence none) and leave a topic of their own in
/// turn for `seconds`, each waiting for every reply.
fn load(server: &Server, clients: usize, seconds: u64) -> Window {
    let stop = Arc::new(AtomicBool::new(false));
    let pid = server.child.id();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (port, stop) = (server.port, stop.clone());
            std::thread::spawn(move || churn_client(port, i, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut joins = Histogram::<u64>::new(3).expect("histogram");
    let mut changes = 0;
    for t in threads {
        let (n, h) = t.join().expect("client thread");
        changes += n;
        joins.add(&h).expect("same bounds");
    }
    Window {
        changes,
        seconds: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds(pid) - cpu0,
        joins,
    }
}

fn churn_client(port: u16, i: usize, stop: &AtomicBool) -> (u64, Histogram<u64>) {
    let mut joins = Histogram::<u64>::new(3).expect("histogram");
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = stream.set_nodelay(true);
    let url = format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0&user_id=bench{i}");
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("upgrade");
    let topic = format!("room:{i}");
    let mut changes = 0;
    let mut r = 0u64;
    let mut ask = |ws: &mut tungstenite::WebSocket<TcpStream>, event: &str, payload: &str| {
        r += 1;
        let text = format!(r#"["1","{r}","{topic}","{event}",{payload}]"#);
        ws.send(tungstenite::Message::text(text)).expect("send");
        let want = format!(r#","{r}","#);
        loop {
            match ws.read().expect("read") {
                tungstenite::Message::Text(t) if t.contains(&want) => return,
                _ => {}
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        ask(&mut ws, "phx_join", r#"{"meta":{"b":1},"presence":"none"}"#);
        joins.record(t.elapsed().as_micros() as u64).ok();
        ask(&mut ws, "phx_leave", "{}");
        changes += 2;
    }
    let _ = ws.close(None);
    (changes, joins)
}

fn main() {
    let cli = Cli::parse();
    println!(
        "roster events-bench: {} clients joining and leaving, 1 shard per server, {} s windows",
        cli.clients, cli.seconds
    );
    let fast = receiver(Duration::ZERO);
    let off = start(&cli.roster, &[]);
    let hook = format!("http://127.0.0.1:{}/hook", fast.port);
    let on = start(&cli.roster, &["--webhook-url".into(), hook]);
    let (mut us_off, mut us_on, mut rate_off, mut rate_on, mut ratio) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut delivered = 0.0;
    for round in 0..cli.rounds {
        // Alternate which goes first, so a drift of the machine's load falls on both.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut per = [0.0; 2];
        for webhook in order {
            let server = if webhook { &on } else { &off };
            let before = fast.events.load(Ordering::Relaxed);
            let w = load(server, cli.clients, cli.seconds);
            let us = 1e6 * w.cpu / w.changes.max(1) as f64;
            per[usize::from(webhook)] = us;
            let rate = w.changes as f64 / w.seconds;
            if webhook {
                us_on.push(us);
                rate_on.push(rate);
                std::thread::sleep(Duration::from_millis(300));
                delivered += (fast.events.load(Ordering::Relaxed) - before) as f64;
            } else {
                us_off.push(us);
                rate_off.push(rate);
            }
        }
        ratio.push(per[1] / per[0]);
        println!(
            "  round {round}: server CPU per change {:.2} us off, {:.2} us on ({:.2}x)",
            per[0],
            per[1],
            per[1] / per[0]
        );
    }
    let show = |xs: Vec<f64>| {
        let (m, lo, hi) = median(xs);
        format!("{m:.2} ({lo:.2}..{hi:.2})")
    };
    println!("side by side, medians of {} rounds (min..max):", cli.rounds);
    println!(
        "  server CPU per presence change, webhooks off: {} us",
        show(us_off)
    );
    println!(
        "  server CPU per presence change, webhooks on:  {} us",
        show(us_on)
    );
    println!("  ratio on/off: {}", show(ratio));
    println!(
        "  changes/s off: {}   on: {}",
        show(rate_off),
        show(rate_on)
    );
    println!("  events the fast receiver took: {delivered:.0} (each change is a presence event; a first join and a last leave also a user event)");

    let slow = receiver(Duration::from_millis(cli.slow_ms));
    let hook = format!("http://127.0.0.1:{}/hook", slow.port);
    let args = [
        "--webhook-url".to_owned(),
        hook,
        "--event-queue".into(),
        "1000".into(),
        "--webhook-batch".into(),
        "100".into(),
    ];
    let slowed = start(&cli.roster, &args);
    let base = load(&off, cli.clients, cli.seconds);
    let before = slow.events.load(Ordering::Relaxed);
    let w = load(&slowed, cli.clients, cli.seconds);
    let got = (slow.events.load(Ordering::Relaxed) - before) as f64;
    let dropped = metric(slowed.admin, "roster_events_dropped_total");
    let queued = metric(slowed.admin, "roster_events_queued_total");
    println!(
        "slow receiver ({} ms a POST, batches of 100, queue of 1000):",
        cli.slow_ms
    );
    println!(
        "  events delivered: {:.0}/s (the receiver's bound: {:.0}/s)",
        got / w.seconds,
        100.0 * 1000.0 / cli.slow_ms as f64
    );
    println!(
        "  events queued {queued:.0}, dropped {dropped:.0} ({:.0}/s), changes/s {:.0}",
        dropped / w.seconds,
        w.changes as f64 / w.seconds
    );
    println!(
        "  join round trip us, webhook slow: {}",
        percentiles(&w.joins)
    );
    println!(
        "  join round trip us, no webhook:   {}",
        percentiles(&base.joins)
    );
}
