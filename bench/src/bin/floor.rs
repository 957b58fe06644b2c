//! floor: the kernel's floor for fan-out on this machine, to put beside roster-bench's `fanout`.
//! No server: one process writes one `--frame-bytes` frame (a WebSocket text frame holding a
//! presence_diff the size of a fanout diff) to each of `--clients` loopback sockets per round,
//! with one write each; a receiver process (this program again, so each side has its own
//! descriptor limit) reads and parses them with the epoll receiver roster-bench's fanout uses
//! (`roster_bench::receiver`), timing each against the send time written in it
//! (CLOCK_MONOTONIC, shared by both processes). So the ratio fanout/floor is the server's.
//! Prints, as `fanout` does, the delivery to one client and the time until all had a round.
//!
//!   floor --clients 9999 --rounds 20 --interval-ms 250 [--source-addrs 127.0.0.2-127.0.0.21]
//!
//! Loopback only, bounded by --clients and --duration-s.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use roster_bench::receiver::{receive_rounds, Ended};
use roster_bench::report::{json_percentiles, percentiles};
use roster_bench::stamps::mono_ns;
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser, Clone)]
#[command(about = "Raw loopback fan-out, the floor beside roster-bench fanout (loopback only)")]
struct Cli {
    /// Receiving sockets (fanout's subscribers).
    #[arg(long, default_value_t = 9999)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    /// Threads writing, each to its share of the sockets (as many as the server has shards).
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Bytes written to each socket per round: a fanout update's diff is ~260 (its join and
    /// leave, each with a round, a send time and refs).
    #[arg(long, default_value_t = 264)]
    frame_bytes: usize,
    /// Source addresses for the receivers' connections, e.g. 127.0.0.2-127.0.0.21.
    #[arg(long)]
    source_addrs: Option<String>,
    /// Write the figures here as JSON (the keys of roster-bench fanout's --json).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Upper bound on the whole run.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Internal: receive from this port (the receiver process).
    #[arg(long, hide = true)]
    receive: Option<u16>,
}

fn main() {
    let cli = Cli::parse();
    let limit = Duration::from_secs(cli.duration_s + 10);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("floor: still running {limit:?} after start: stopping");
        std::process::exit(3);
    });
    let result = match cli.receive {
        Some(port) => receive(&cli, port),
        None => send(&cli),
    };
    if let Err(e) = result {
        eprintln!("floor: {e}");
        std::process::exit(1);
    }
}

fn sources(cli: &Cli) -> Result<Vec<IpAddr>, String> {
    let Some(range) = &cli.source_addrs else {
        return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    };
    let (a, b) = range.split_once('-').unwrap_or((range, range));
    let a: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: Ipv4Addr = b.parse().map_err(|e| format!("{b}: {e}"))?;
    let v: Vec<IpAddr> = (u32::from(a)..=u32::from(b))
        .map(|x| IpAddr::V4(Ipv4Addr::from(x)))
        .collect();
    if v.is_empty() || v.iter().any(|ip| !ip.is_loopback()) {
        return Err("source addresses must be a range in 127.0.0.0/8".into());
    }
    Ok(v)
}

/// The sending side: accepts the receiver's connections, then writes each round's frame to
/// every socket in turn, as a server's fan-out loop would.
fn send(cli: &Cli) -> Result<(), String> {
    if cli.frame_bytes < MIN_FRAME_BYTES {
        return Err(format!("--frame-bytes must be at least {MIN_FRAME_BYTES} (a diff with a round and a send time)"));
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.extend(["--receive".into(), port.to_string()]);
    let child = std::process::Command::new(exe)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("receiver: {e}"))?;
    let mut socks = Vec::with_capacity(cli.clients);
    while socks.len() < cli.clients {
        let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        socks.push(s);
    }
    // The receiver says when it is reading.
    let mut out = child.stdout.ok_or("receiver stdout")?;
    let mut ready = [0u8; 6];
    out.read_exact(&mut ready)
        .map_err(|e| format!("receiver: {e}"))?;
    let mut write_ns = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for r in 0..cli.rounds {
        let t0 = mono_ns();
        let frame = diff_frame(r, t0, cli.frame_bytes);
        // One thread per writer, each with its share of the sockets, as a server's shards.
        let share = socks.len().div_ceil(cli.writers.max(1));
        std::thread::scope(|scope| {
            let writers: Vec<_> = socks
                .chunks_mut(share.max(1))
                .map(|chunk| {
                    let frame = &frame;
                    scope.spawn(move || {
                        chunk
                            .iter_mut()
                            .try_for_each(|s| s.write_all(frame))
                            .map_err(|e| format!("write: {e}"))
                    })
                })
                .collect();
            writers
                .into_iter()
                .try_for_each(|w| w.join().map_err(|_| "a writer panicked".to_string())?)
        })?;
        write_ns.record((mono_ns() - t0) / 1000).ok();
        std::thread::sleep(Duration::from_millis(cli.interval_ms));
    }
    drop(socks);
    let mut report = String::new();
    out.read_to_string(&mut report).map_err(|e| e.to_string())?;
    println!(
        "floor: {} loopback sockets, one {}-byte write each per round from {} writer thread(s), {} rounds {} ms apart",
        cli.clients, cli.frame_bytes, cli.writers, cli.rounds, cli.interval_ms
    );
    println!(
        "  writing a round to every socket us: {}",
        percentiles(&write_ns)
    );
    for line in report.lines() {
        match line.strip_prefix(JSON_LINE) {
            Some(json) => {
                if let Some(path) = &cli.json {
                    std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => println!("{line}"),
        }
    }
    Ok(())
}

/// Starts the receiver's figures as JSON, in what it reports to the sender.
const JSON_LINE: &str = "json ";

/// The smallest frame [`diff_frame`] makes: its JSON with a 20-digit stamp and no padding.
const MIN_FRAME_BYTES: usize = 110;

/// Round `r`'s frame, `bytes` long: a WebSocket text frame holding a presence_diff shaped as
/// roster's fanout diff, whose one join carries the round and its send time, padded to size.
/// The receiver parses it exactly as roster-bench parses roster's.
fn diff_frame(r: usize, sent_ns: u64, bytes: usize) -> Vec<u8> {
    let text = |pad: &str| {
        format!(
            r#"[null,null,"room:fanout","presence_diff",{{"joins":{{"u0":{{"metas":[{{"round":{r},"sent_ns":{sent_ns},"p":"{pad}"}}]}}}},"leaves":{{}}}}]"#
        )
    };
    // Header: 2 bytes up to 125 payload bytes, 4 beyond.
    let header = if bytes - 2 < 126 { 2 } else { 4 };
    let pad = (bytes - header).saturating_sub(text("").len());
    let mut out = Vec::with_capacity(bytes);
    roster_engine::net::ws::write_text_frame(&mut out, text(&"x".repeat(pad)).as_bytes());
    out
}

/// The receiving side: connects `--clients` sockets, then reads every frame with the epoll
/// receiver roster-bench's fanout uses.
fn receive(cli: &Cli, port: u16) -> Result<(), String> {
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let sources = sources(cli)?;
    let mut socks = Vec::with_capacity(cli.clients);
    for i in 0..cli.clients {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| e.to_string())?;
        socket
            .bind(&SocketAddr::new(sources[i % sources.len()], 0).into())
            .map_err(|e| format!("bind: {e}"))?;
        socket
            .connect(&to.into())
            .map_err(|e| format!("connect {i}: {e}"))?;
        socks.push((TcpStream::from(socket), Vec::new()));
    }
    std::io::stdout()
        .write_all(b"ready\n")
        .and_then(|_| std::io::stdout().flush())
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + Duration::from_secs(cli.duration_s);
    let d = receive_rounds(socks, cli.rounds, until, None)?;
    let mut all = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for &m in d.round_max.iter().filter(|&&m| m > 0) {
        all.record(m).ok();
    }
    let done = d.ended.iter().filter(|&&e| e == Ended::Done).count();
    println!("  sockets that read every round: {done} of {}", cli.clients);
    println!("  write -> read by one socket us: {}", percentiles(&d.one));
    println!("  write -> read by all sockets us: {}", percentiles(&all));
    // For the sender's --json (the same keys as roster-bench fanout's).
    let json = serde_json::json!({"scenario": "floor", "clients": cli.clients, "writers": cli.writers,
        "frame_bytes": cli.frame_bytes, "rounds": cli.rounds, "saw_every_round": done,
        "delivery_us": json_percentiles(&d.one), "all_members_us": json_percentiles(&all), "round_max_us": d.round_max});
    println!("{JSON_LINE}{json}");
    Ok(())
}
