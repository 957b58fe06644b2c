//! floor: the kernel's floor for fan-out on this machine, to put beside roster-bench's `fanout`.
//! No protocol and no parsing: one process writes one `--frame-bytes` frame (the size of a
//! fanout diff) to each of `--clients` loopback sockets per round, a receiver process (this
//! program again, so each side has its own descriptor limit) reads them with epoll and times
//! each frame against the send time written in it (CLOCK_MONOTONIC, shared by both processes).
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
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use roster_bench::report::percentiles;
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
    /// Bytes written to each socket per round (a fanout diff is ~120).
    #[arg(long, default_value_t = 120)]
    frame_bytes: usize,
    /// Source addresses for the receivers' connections, e.g. 127.0.0.2-127.0.0.21.
    #[arg(long)]
    source_addrs: Option<String>,
    /// Upper bound on the whole run.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Internal: receive from this port (the receiver process).
    #[arg(long, hide = true)]
    receive: Option<u16>,
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
    if cli.frame_bytes < 16 {
        return Err("--frame-bytes must be at least 16 (round and send time)".into());
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
    let mut frame = vec![b'x'; cli.frame_bytes];
    let mut write_ns = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for r in 0..cli.rounds {
        let t0 = mono_ns();
        frame[..8].copy_from_slice(&(r as u64).to_le_bytes());
        frame[8..16].copy_from_slice(&t0.to_le_bytes());
        for s in &mut socks {
            s.write_all(&frame).map_err(|e| format!("write: {e}"))?;
        }
        write_ns.record((mono_ns() - t0) / 1000).ok();
        std::thread::sleep(Duration::from_millis(cli.interval_ms));
    }
    drop(socks);
    let mut report = String::new();
    out.read_to_string(&mut report).map_err(|e| e.to_string())?;
    println!(
        "floor: {} loopback sockets, one {}-byte write each per round, {} rounds {} ms apart",
        cli.clients, cli.frame_bytes, cli.rounds, cli.interval_ms
    );
    println!(
        "  writing a round to every socket us: {}",
        percentiles(&write_ns)
    );
    print!("{report}");
    Ok(())
}

/// The receiving side: connects `--clients` sockets, then reads every frame with epoll.
fn receive(cli: &Cli, port: u16) -> Result<(), String> {
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let sources = sources(cli)?;
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
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
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let std_stream: TcpStream = socket.into();
        let mut stream = MioStream::from_std(std_stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        socks.push((stream, Vec::with_capacity(cli.frame_bytes)));
    }
    std::io::stdout()
        .write_all(b"ready\n")
        .and_then(|_| std::io::stdout().flush())
        .map_err(|e| e.to_string())?;
    let mut one = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut round_max = vec![0u64; cli.rounds];
    let mut got = 0usize;
    let want = cli.clients * cli.rounds;
    let deadline = Instant::now() + Duration::from_secs(cli.duration_s);
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 << 10];
    while got < want && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let (stream, pending) = &mut socks[ev.token().0];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let now = mono_ns();
                        pending.extend_from_slice(&buf[..n]);
                        while pending.len() >= cli.frame_bytes {
                            let r = u64::from_le_bytes(pending[..8].try_into().unwrap_or_default());
                            let t0 =
                                u64::from_le_bytes(pending[8..16].try_into().unwrap_or_default());
                            let us = now.saturating_sub(t0) / 1000;
                            one.record(us).ok();
                            if let Some(m) = round_max.get_mut(r as usize) {
                                *m = (*m).max(us);
                            }
                            pending.drain(..cli.frame_bytes);
                            got += 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
    }
    let mut all = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for m in round_max.into_iter().filter(|&m| m > 0) {
        all.record(m).ok();
    }
    println!("  frames delivered: {got} of {want}");
    println!("  write -> read by one socket us: {}", percentiles(&one));
    println!("  write -> read by all sockets us: {}", percentiles(&all));
    Ok(())
}
