//! roster-bench: load generator speaking Phoenix Channels V2 over WebSocket, so it measures roster
//! or any Phoenix Presence server. Today it has the `connect` scenario; the others (fanout,
//! join-storm, churn, reconnect-storm), lean clients and multi-process runs are the load
//! generator issue's work.
//!
//! Every run targets the given URL (keep it on loopback), is bounded in count and time, and
//! stops on its own.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use roster_bench::report::percentiles;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

#[derive(Parser)]
#[command(about = "Load generator for Phoenix Channels V2 presence servers")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N clients connect and join (tracked, full presence) one of T topics each; prints
    /// connects+joins per second, join latency and the server's memory per connection.
    Connect {
        /// Socket URL as phoenix.js takes it.
        #[arg(long, default_value = "ws://127.0.0.1:4000/socket")]
        url: String,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        topics: usize,
        /// Presence mode of every join: full, count or none.
        #[arg(long, default_value = "full")]
        presence: String,
        /// Client threads connecting at once.
        #[arg(long, default_value_t = 32)]
        threads: usize,
        /// The server's pid, to read its resident memory before and after.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Give up after this long.
        #[arg(long, default_value_t = 300)]
        max_seconds: u64,
    },
}

fn rss_of(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn socket_addr(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, "socket"));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; roster-bench only targets 127.0.0.0/8"
        ));
    }
    Ok((addr, format!("ws://{host}/{path}/websocket?vsn=2.0.0")))
}

struct Sample {
    handshake: Histogram<u64>,
    join: Histogram<u64>,
    errors: usize,
}

fn connect_one(
    addr: SocketAddr,
    url: &str,
    user: usize,
    topic: &str,
    mode: &str,
    s: &mut Sample,
    deadline: Instant,
) -> Option<WebSocket<TcpStream>> {
    let t0 = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let config = WebSocketConfig::default().read_buffer_size(1024);
    let (mut ws, _) = tungstenite::client::client_with_config(
        format!("{url}&user_id=u{user}"),
        stream,
        Some(config),
    )
    .ok()?;
    let t1 = Instant::now();
    s.handshake
        .record(t1.duration_since(t0).as_micros() as u64)
        .ok();
    ws.send(Message::text(
        json!(["1", "1", topic, "phx_join", {"meta": {"user": user}, "presence": mode}])
            .to_string(),
    ))
    .ok()?;
    loop {
        if Instant::now() > deadline {
            return None;
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let f: Value = serde_json::from_str(&t).ok()?;
                if f[3] == "phx_reply" && f[4]["status"] != "ok" {
                    return None;
                }
                // The join is complete with its state (full), its count (count) or its ok (none).
                let done = match mode {
                    "full" => f[3] == "presence_state",
                    "count" => f[3] == "presence_count",
                    _ => f[3] == "phx_reply",
                };
                if done {
                    s.join.record(t1.elapsed().as_micros() as u64).ok();
                    // Idle from here: diffs about later joiners stay in the socket buffer.
                    return Some(ws);
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(_) => return None,
        }
    }
}

fn connect(
    url: &str,
    clients: usize,
    topics: usize,
    mode: &str,
    threads: usize,
    server_pid: Option<u32>,
    max_seconds: u64,
) -> Result<(), String> {
    if !["full", "count", "none"].contains(&mode) {
        return Err(format!(
            "--presence must be full, count or none, not {mode}"
        ));
    }
    let (addr, ws_url) = socket_addr(url)?;
    let before = server_pid.and_then(rss_of);
    let deadline = Instant::now() + Duration::from_secs(max_seconds);
    let merged = Mutex::new(Sample {
        handshake: Histogram::new(3).map_err(|e| e.to_string())?,
        join: Histogram::new(3).map_err(|e| e.to_string())?,
        errors: 0,
    });
    let held = Mutex::new(Vec::with_capacity(clients));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (merged, held, ws_url) = (&merged, &held, &ws_url);
            scope.spawn(move || {
                let mut s = Sample {
                    handshake: Histogram::new(3).expect("hist"),
                    join: Histogram::new(3).expect("hist"),
                    errors: 0,
                };
                let mut mine = Vec::new();
                for i in (t..clients).step_by(threads) {
                    if Instant::now() > deadline {
                        s.errors += 1;
                        continue;
                    }
                    match connect_one(
                        addr,
                        ws_url,
                        i,
                        &format!("room:{}", i % topics),
                        mode,
                        &mut s,
                        deadline,
                    ) {
                        Some(ws) => mine.push(ws),
                        None => s.errors += 1,
                    }
                }
                let mut m = merged.lock().expect("lock");
                m.handshake.add(&s.handshake).ok();
                m.join.add(&s.join).ok();
                m.errors += s.errors;
                held.lock().expect("lock").extend(mine);
            });
        }
    });
    let took = started.elapsed();
    let m = merged.into_inner().map_err(|e| e.to_string())?;
    let ok = held.lock().map_err(|e| e.to_string())?.len();
    println!("connect: {ok} of {clients} clients connected and joined one of {topics} topics (presence {mode}) in {:.2} s", took.as_secs_f64());
    println!(
        "  connects+joins per second: {:.0}",
        ok as f64 / took.as_secs_f64()
    );
    println!("  errors: {}", m.errors);
    println!("  handshake us: {}", percentiles(&m.handshake));
    println!(
        "  phx_join -> {} us: {}",
        match mode {
            "full" => "presence_state",
            "count" => "presence_count",
            _ => "reply",
        },
        percentiles(&m.join)
    );
    if let (Some(pid), Some(before)) = (server_pid, before) {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(after) = rss_of(pid) {
            println!(
                "  server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per connection (user space)",
                before as f64 / 1048576.0,
                after as f64 / 1048576.0,
                after.saturating_sub(before) as f64 / ok.max(1) as f64
            );
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let result = match args.scenario {
        Scenario::Connect {
            url,
            clients,
            topics,
            presence,
            threads,
            server_pid,
            max_seconds,
        } => connect(
            &url,
            clients,
            topics.max(1),
            &presence,
            threads.max(1),
            server_pid,
            max_seconds,
        ),
    };
    if let Err(e) = result {
        eprintln!("roster-bench: {e}");
        std::process::exit(1);
    }
}
