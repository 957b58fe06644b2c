//! roster-bench: load generator speaking Phoenix Channels V2 over WebSocket and nothing
//! engine-specific, so `--url` can point at roster or at a Phoenix app using Phoenix.Presence.
//!
//! Clients are lean glommio tasks (see `roster_bench::client`), spread over `--executors`
//! threads. Scenarios: `connect`, `join-storm`, `fanout`. Every run targets loopback only, is
//! bounded by `--clients` and `--duration-s`, and stops on its own. Not yet here (issue 4):
//! `churn`, `reconnect-storm`, `--procs` worker processes, charts.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use roster_bench::client::Client;
use roster_bench::report::percentiles;
use roster_bench::view::View;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Load generator for Phoenix Channels V2 presence servers (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Socket URL as phoenix.js takes it.
    #[arg(long, default_value = "ws://127.0.0.1:4000/socket")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Upper bound on the whole run.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Client threads (glommio executors).
    #[arg(long, default_value_t = 1)]
    executors: usize,
    /// Connections being set up at once, per executor.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Source addresses to spread clients over, e.g. 127.0.0.2-127.0.0.60 (one address allows
    /// ~28k connections to one server port).
    #[arg(long)]
    source_addrs: Option<String>,
    /// The server's pid, to report its resident memory per connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Worker processes to spread the clients over (`connect` only): one process may hold only
    /// so many descriptors (~20k here), so a million clients need many.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Internal: this process is worker W of N ("W/N"), run by a parent with --procs.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

#[derive(Subcommand)]
enum Scenario {
    /// N clients connect and sit idle; then each sends one large text frame (a heartbeat padded to
    /// --frame-bytes) and waits for its reply: the server's resident memory per connection idle,
    /// and idle again after the burst (read after --settle-s, past the server's 10 s heap trim).
    IdleMemory {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 60_000)]
        frame_bytes: usize,
        #[arg(long, default_value_t = 12)]
        settle_s: u64,
    },
    /// N clients connect and join (tracked) one of T topics each: connects+joins per second, join
    /// latency, the server's memory per connection.
    Connect {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        topics: usize,
        /// Presence mode of the joins: full, count or none.
        #[arg(long, default_value = "full")]
        presence: String,
        /// Seconds the connections are held before the server's memory is read.
        #[arg(long, default_value_t = 1)]
        settle_s: u64,
    },
    /// N connected clients join one topic at once: time until every client's view holds all N.
    JoinStorm {
        #[command(flatten)]
        common: Common,
    },
    /// One tracked member and N-1 subscribers of one topic; the member updates its meta every
    /// interval: time until each subscriber saw each update, and until all had. With
    /// `--presence count` the subscribers get counts, and the member leaves and rejoins each
    /// round instead (an update changes no count): time until each saw each new count.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        /// What the subscribers receive: full (diffs) or count (throttled counts; needs
        /// --procs 1, as the send times are shared in memory).
        #[arg(long, default_value = "full")]
        presence: String,
    },
    /// N-1 subscribers of one topic while churners join and leave it at a steady rate: latency
    /// from a join to each subscriber seeing it, and the server's CPU.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Joins plus leaves per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Clients taking turns joining and leaving (on top of --clients subscribers).
        #[arg(long, default_value_t = 50)]
        churners: usize,
        /// How long the churn lasts.
        #[arg(long, default_value_t = 10)]
        window_s: u64,
    },
    /// N clients joined (full) across T topics; a fraction of them drop their connections at
    /// once and reconnect and rejoin: time until all are back, and how many presence changes the
    /// clients that stayed saw meanwhile.
    ReconnectStorm {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        topics: usize,
        /// Fraction of the clients that drop and reconnect (the rest watch).
        #[arg(long, default_value_t = 0.5)]
        reconnect_fraction: f64,
        /// How long the staying clients count diffs after the drop.
        #[arg(long, default_value_t = 5)]
        window_s: u64,
        /// Instead of dropping connections, run this shell command, which must restart the server
        /// on the same address (e.g. "kill $PID; roster --listen ... &"): every client sees its
        /// connection end and reconnects (retrying while the server is down).
        #[arg(long)]
        restart_cmd: Option<String>,
    },
}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    path: String,
    sources: Vec<IpAddr>,
}

impl Target {
    fn parse(c: &Common) -> Result<Target, String> {
        let rest = c.url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
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
        let sources = match &c.source_addrs {
            None => Vec::new(),
            Some(range) => parse_range(range)?,
        };
        Ok(Target {
            addr,
            path: format!("/{}", path.trim_end_matches('/')),
            sources,
        })
    }

    fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

fn parse_range(s: &str) -> Result<Vec<IpAddr>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: Ipv4Addr = b.parse().map_err(|e| format!("{b}: {e}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_536 {
        return Err(format!("bad source range {s}"));
    }
    let v: Vec<IpAddr> = (a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))).collect();
    if v.iter().any(|ip| !ip.is_loopback()) {
        return Err("source addresses must be in 127.0.0.0/8".into());
    }
    Ok(v)
}

fn hist() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is valid")
}

/// What one executor measured.
struct Part {
    a: Histogram<u64>,
    b: Histogram<u64>,
    ok: usize,
    errors: usize,
    timeouts: usize,
    first_error: Option<String>,
    /// Resident memory the load generator process gained while holding its clients.
    client_bytes: usize,
}

impl Part {
    /// A client that did (or, by the deadline, did not) see what it waited for.
    fn finished(&mut self, done: bool) {
        if done {
            self.ok += 1;
        } else {
            self.timeouts += 1;
        }
    }

    fn new() -> Part {
        Part {
            a: hist(),
            b: hist(),
            ok: 0,
            errors: 0,
            timeouts: 0,
            first_error: None,
            client_bytes: 0,
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    /// One line of JSON, histograms in hdrhistogram's V2 format as hex, for worker processes.
    fn to_json(&self) -> String {
        let hex = |h: &Histogram<u64>| {
            let mut buf = Vec::new();
            let _ = hdrhistogram::serialization::Serializer::serialize(
                &mut hdrhistogram::serialization::V2Serializer::new(),
                h,
                &mut buf,
            );
            buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        json!({"a": hex(&self.a), "b": hex(&self.b), "ok": self.ok, "errors": self.errors,
               "timeouts": self.timeouts, "first_error": self.first_error, "client_bytes": self.client_bytes})
        .to_string()
    }

    fn from_json(text: &str) -> Result<Part, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("worker result: {e}"))?;
        let hist = |key: &str| -> Result<Histogram<u64>, String> {
            let hex = v[key].as_str().unwrap_or_default();
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| {
                    u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0)
                })
                .collect();
            hdrhistogram::serialization::Deserializer::new()
                .deserialize(&mut &bytes[..])
                .map_err(|e| format!("worker histogram: {e:?}"))
        };
        let count = |key: &str| v[key].as_u64().unwrap_or(0) as usize;
        Ok(Part {
            a: hist("a")?,
            b: hist("b")?,
            ok: count("ok"),
            errors: count("errors"),
            timeouts: count("timeouts"),
            first_error: v["first_error"].as_str().map(str::to_owned),
            client_bytes: count("client_bytes"),
        })
    }

    fn print_errors(&self) {
        let first = self
            .first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default();
        println!(
            "  errors: {} timeouts: {}{first}",
            self.errors, self.timeouts
        );
    }

    fn merge(parts: Vec<Part>) -> Part {
        let mut all = Part::new();
        for p in parts {
            all.a.add(&p.a).ok();
            all.b.add(&p.b).ok();
            all.ok += p.ok;
            all.errors += p.errors;
            all.timeouts += p.timeouts;
            all.client_bytes += p.client_bytes;
            if all.first_error.is_none() {
                all.first_error = p.first_error;
            }
        }
        all
    }
}

/// Worker W of N when this process was started by a parent with --procs (else 0 of 1).
static SPLIT: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

fn split() -> (usize, usize) {
    *SPLIT.get().unwrap_or(&(0, 1))
}

fn is_worker() -> bool {
    split().1 > 1
}

/// A phase boundary: every executor of this process, and with --procs every worker process,
/// gets here before any goes on. Returns true in one executor of this process.
fn phase(b: &Barrier) -> bool {
    let leader = b.wait().is_leader();
    if leader && is_worker() {
        use std::io::Write as _;
        println!("BARRIER");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    b.wait();
    leader
}

/// Nanoseconds on CLOCK_MONOTONIC: the same clock in every process, so worker processes can
/// time stamps another process wrote.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Merges scenario extras from workers: numbers add up, arrays of numbers take the larger
/// element (per-round maxima).
fn merge_extras(into: &mut Value, from: &Value) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) else {
        return;
    };
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Array(a)), Value::Array(b)) => {
                for (i, x) in b.iter().enumerate() {
                    let x = x.as_u64().unwrap_or(0);
                    match a.get_mut(i) {
                        Some(y) => *y = json!(y.as_u64().unwrap_or(0).max(x)),
                        None => a.push(json!(x)),
                    }
                }
            }
            (Some(Value::Number(a)), Value::Number(b)) => {
                *into.get_mut(k).expect("present") =
                    json!(a.as_u64().unwrap_or(0) + b.as_u64().unwrap_or(0));
            }
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// Starts `--procs` copies of this program with this run's arguments, as workers W/N, with
/// stdin and stdout piped for the phase protocol.
fn spawn_workers(c: &Common) -> Result<Vec<std::process::Child>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    (0..c.procs)
        .map(|w| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--worker", &format!("{w}/{}", c.procs)])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("worker {w}: {e}"))
        })
        .collect()
}

/// Runs a scenario's clients here (`local`), or as --procs worker processes of this program:
/// the parent relays phase boundaries (calling `on_phase(k)` as boundary k opens) and merges
/// what the workers measured. In a worker, prints the result for the parent and returns None.
fn distributed(
    c: &Common,
    mut on_phase: impl FnMut(usize),
    local: impl FnOnce() -> Result<(Part, Value), String>,
) -> Result<Option<(Part, Value)>, String> {
    use std::io::{BufRead, BufReader, Write as _};
    if c.procs <= 1 || is_worker() {
        let (part, extras) = local()?;
        if is_worker() {
            println!("RESULT {}\t{}", part.to_json(), extras);
            return Ok(None);
        }
        return Ok(Some((part, extras)));
    }
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut stdins = Vec::new();
    let mut children = spawn_workers(c)?;
    for (w, child) in children.iter_mut().enumerate() {
        stdins.push(child.stdin.take().ok_or("worker stdin")?);
        let out = child.stdout.take().ok_or("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((w, line));
            }
            let _ = tx.send((w, "EXIT".into()));
        });
    }
    drop(tx);
    let (mut waiting, mut phase_k, mut done) = (0, 0, 0);
    let mut parts = Vec::new();
    let mut extras = json!({});
    let mut reported = std::collections::HashSet::new();
    for (w, line) in rx {
        if line == "BARRIER" {
            waiting += 1;
            if waiting == c.procs {
                on_phase(phase_k);
                phase_k += 1;
                waiting = 0;
                for stdin in &mut stdins {
                    let _ = writeln!(stdin, "go");
                }
            }
        } else if let Some(result) = line.strip_prefix("RESULT ") {
            let (part, extra) = result.split_once('\t').ok_or("bad worker result")?;
            parts.push(Part::from_json(part)?);
            reported.insert(w);
            merge_extras(
                &mut extras,
                &serde_json::from_str(extra).map_err(|e| e.to_string())?,
            );
        } else if line == "EXIT" {
            if !reported.contains(&w) {
                // The others may be waiting at a phase this worker will never reach.
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(format!("worker {w} ended without a result"));
            }
            done += 1;
            if done == c.procs {
                break;
            }
        } else {
            eprintln!("worker {w}: {line}");
        }
    }
    for child in &mut children {
        let _ = child.wait();
    }
    if parts.len() != c.procs {
        return Err(format!("{} of {} workers reported", parts.len(), c.procs));
    }
    Ok(Some((Part::merge(parts), extras)))
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

/// Kernel memory that grows with connections: slab caches (socket structures) and TCP buffer
/// pages, system-wide. On loopback this counts both ends of every connection.
fn kernel_bytes() -> Option<(usize, usize)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let slab_kb: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    let pages: usize = words
        .by_ref()
        .skip_while(|w| *w != "mem")
        .nth(1)?
        .parse()
        .ok()?;
    Some((slab_kb * 1024, pages * 4096))
}

/// Each client sends its join (`frame(i)`) and waits for its presence_state (or, for joins in
/// count mode, its presence_count); returns those that got one, counting the others as errors
/// or timeouts.
async fn join_each(
    clients: Vec<(usize, Client)>,
    part: &Rc<RefCell<Part>>,
    deadline: Instant,
    frame: impl Fn(usize) -> String,
) -> Vec<(usize, Client)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(i, mut client)| {
            let (part, join) = (part.clone(), frame(i));
            glommio::spawn_local(async move {
                if let Err(err) = client.send(join).await {
                    part.borrow_mut().error(err);
                    return None;
                }
                let mut view = View::default();
                if read_until(&mut client, &mut view, deadline, |_, f| {
                    f[3] == "presence_state" || f[3] == "presence_count"
                })
                .await
                {
                    Some((i, client))
                } else {
                    part.borrow_mut().timeouts += 1;
                    None
                }
            })
        })
        .collect();
    let mut joined = Vec::new();
    for task in tasks {
        joined.extend(task.await);
    }
    joined
}

/// What this executor measured, once its tasks are done with it.
fn into_part(part: Rc<RefCell<Part>>) -> Part {
    Rc::try_unwrap(part)
        .map(RefCell::into_inner)
        .unwrap_or_else(|_| Part::new())
}

async fn join_all<T>(tasks: Vec<glommio::Task<T>>) {
    for task in tasks {
        task.await;
    }
}

/// Runs `work(executor index)` on `n` glommio executors and collects what each returns.
fn on_executors<F, Fut>(n: usize, work: F) -> Result<Vec<Part>, String>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = Part> + 'static,
{
    let handles: Vec<_> = (0..n)
        .map(|e| {
            let work = work.clone();
            LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("bench-{e}"))
                .io_memory(64 << 10)
                .spawn(move || async move { work(e).await })
                .map_err(|err| format!("executor {e}: {err}"))
        })
        .collect::<Result<_, _>>()?;
    handles
        .into_iter()
        .map(|h| h.join().map_err(|e| e.to_string()))
        .collect()
}

/// Connects client `i` and, if `join` is given, joins and waits for the join to complete.
async fn open(t: &Target, i: usize) -> Result<Client, String> {
    Box::pin(Client::connect(
        t.addr,
        t.source(i),
        &t.path,
        &format!("vsn=2.0.0&user_id=u{i}"),
    ))
    .await
}

fn json_percentiles(h: &Histogram<u64>) -> Value {
    json!({"count": h.len(), "p50": h.value_at_quantile(0.5), "p90": h.value_at_quantile(0.9),
           "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999), "max": h.max()})
}

fn write_json(c: &Common, v: Value) -> Result<(), String> {
    if let Some(path) = &c.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn connect(c: Common, topics: usize, mode: String, settle_s: u64) -> Result<(), String> {
    if !["full", "count", "none"].contains(&mode.as_str()) {
        return Err(format!(
            "--presence must be full, count or none, not {mode}"
        ));
    }
    let worker = match &c.worker {
        Some(w) => {
            let (a, b) = w.split_once('/').ok_or("--worker W/N")?;
            Some((
                a.parse::<usize>().map_err(|e| e.to_string())?,
                b.parse::<usize>().map_err(|e| e.to_string())?,
            ))
        }
        None if c.procs > 1 => return connect_parent(&c, topics, &mode, settle_s),
        None => None,
    };
    let (w, nw) = worker.unwrap_or((0, 1));
    let t = Target::parse(&c)?;
    let before = c.server_pid.and_then(rss_of);
    let kernel_before = kernel_bytes();
    let self_before = rss_of(std::process::id()).unwrap_or(0);
    let release = Arc::new(Barrier::new(c.executors + 1));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(c.duration_s);
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let mode_name = mode.clone();
    let (tx, rx) = std::sync::mpsc::channel::<Part>();
    let r2 = release.clone();
    let waiter = std::thread::spawn(move || -> Result<_, String> {
        let parts: Vec<Part> = rx.iter().take(e_count).collect();
        let took = started.elapsed();
        let mut part = Part::merge(parts);
        part.client_bytes = rss_of(std::process::id())
            .unwrap_or(0)
            .saturating_sub(self_before);
        let measured = if worker.is_some() {
            // Tell the parent, then hold the connections until it has measured.
            println!("READY {}", part.to_json());
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            (None, None)
        } else {
            std::thread::sleep(Duration::from_secs(settle_s));
            (c.server_pid.and_then(rss_of), kernel_bytes())
        };
        r2.wait();
        Ok((took, part, measured))
    });
    let parts = on_executors(e_count, move |e| {
        let (t, mode, release, tx) = (t.clone(), mode.clone(), release.clone(), tx.clone());
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = Rc::new(RefCell::new(Vec::new()));
            let work = {
                let (part, clients) = (part.clone(), clients.clone());
                move |i: usize| {
                    let (t, mode, part, clients) =
                        (t.clone(), mode.clone(), part.clone(), clients.clone());
                    async move {
                        if Instant::now() > deadline {
                            part.borrow_mut().timeouts += 1;
                            return;
                        }
                        let t0 = Instant::now();
                        let mut client = match open(&t, i).await {
                            Ok(c) => c,
                            Err(err) => return part.borrow_mut().error(err),
                        };
                        let t1 = Instant::now();
                        let topic = format!("room:{}", i % topics);
                        let frame =
                        json!(["1", "1", topic, "phx_join", {"meta": {"i": i}, "presence": mode}])
                            .to_string();
                        if let Err(err) = client.send(frame).await {
                            return part.borrow_mut().error(err);
                        }
                        let want = match mode.as_str() {
                            "full" => "presence_state",
                            "count" => "presence_count",
                            _ => "phx_reply",
                        };
                        loop {
                            let Some(f) = client.next().await else {
                                return part.borrow_mut().error("closed while joining".into());
                            };
                            if f[3] == "phx_reply" && f[4]["status"] != "ok" {
                                return part.borrow_mut().error(format!("join refused: {f}"));
                            }
                            if f[3] == want {
                                break;
                            }
                        }
                        let mut p = part.borrow_mut();
                        p.a.record(t1.duration_since(t0).as_micros() as u64).ok();
                        p.b.record(t1.elapsed().as_micros() as u64).ok();
                        p.ok += 1;
                        clients.borrow_mut().push(client);
                    }
                }
            };
            for_share(w + nw * e, nw * e_count, n, conc, work).await;
            // Everyone holds their connections while the server's memory is read.
            let _ = tx.send(std::mem::replace(&mut *part.borrow_mut(), Part::new()));
            release.wait();
            drop(clients);
            into_part(part)
        }
    })?;
    drop(parts);
    let (took, p, (after, kernel_after)) = waiter.join().map_err(|_| "waiter thread failed")??;
    if worker.is_some() {
        return Ok(());
    }
    report_connect(
        &c,
        topics,
        &mode_name,
        took,
        p,
        (before, after),
        kernel_before.zip(kernel_after),
    )
}

fn idle_memory(c: Common, frame_bytes: usize, settle_s: u64) -> Result<(), String> {
    let pid = c.server_pid.ok_or("idle-memory needs --server-pid")?;
    let t = Target::parse(&c)?;
    let base = rss_of(pid).ok_or("cannot read the server's memory")?;
    let (n, conc) = (c.clients, c.concurrency.max(1));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let parts = on_executors(1, move |_| {
        let t = t.clone();
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = Rc::new(RefCell::new(Vec::new()));
            let (p2, c2) = (part.clone(), clients.clone());
            for_share(0, 1, n, conc, move |i| {
                let (t, part, clients) = (t.clone(), p2.clone(), c2.clone());
                async move {
                    match open(&t, i).await {
                        Ok(client) => clients.borrow_mut().push(client),
                        Err(e) => part.borrow_mut().error(e),
                    }
                }
            })
            .await;
            let connected = clients.borrow().len();
            glommio::timer::sleep(Duration::from_secs(settle_s)).await;
            let idle = rss_of(pid);
            let pad = "x".repeat(frame_bytes.saturating_sub(64));
            let mut all: Vec<Client> = std::mem::take(&mut *clients.borrow_mut());
            for client in all.iter_mut() {
                let frame = json!([null, "1", "phoenix", "heartbeat", {"pad": pad}]).to_string();
                if let Err(e) = client.send(frame).await {
                    part.borrow_mut().error(e);
                }
            }
            for client in all.iter_mut() {
                while Instant::now() < deadline {
                    match client.next().await {
                        Some(f) if f[3] == "phx_reply" => break,
                        Some(_) => continue,
                        None => {
                            part.borrow_mut()
                                .error("closed after the large frame".into());
                            break;
                        }
                    }
                }
            }
            glommio::timer::sleep(Duration::from_secs(settle_s)).await;
            let after = rss_of(pid);
            let mut p = into_part(part);
            p.ok = connected;
            println!("idle-memory: {connected} of {n} clients connected; one {frame_bytes}-byte frame each");
            p.print_errors();
            let per = |rss: Option<usize>| {
                rss.map_or(-1.0, |r| {
                    r.saturating_sub(base) as f64 / connected.max(1) as f64
                })
            };
            println!(
                "  server RSS per connection: idle {:.0} bytes, idle after the burst {:.0} bytes",
                per(idle),
                per(after)
            );
            drop(all);
            p
        }
    })?;
    drop(parts);
    Ok(())
}

/// Runs `connect` as `procs` worker processes of this program, each holding its share of the
/// clients, and merges what they measured.
fn connect_parent(c: &Common, topics: usize, mode: &str, settle_s: u64) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write as _};
    let before = c.server_pid.and_then(rss_of);
    let kernel_before = kernel_bytes();
    let started = Instant::now();
    let mut children = spawn_workers(c)?;
    let mut parts = Vec::new();
    for (w, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take().ok_or("worker stdout")?;
        let line = BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("READY ").map(str::to_owned))
            .ok_or(format!("worker {w} ended without a result"))?;
        parts.push(Part::from_json(&line)?);
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(settle_s));
    let after = c.server_pid.and_then(rss_of);
    let kernel_after = kernel_bytes();
    for child in &mut children {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "release");
        }
    }
    for child in &mut children {
        let _ = child.wait();
    }
    report_connect(
        c,
        topics,
        mode,
        took,
        Part::merge(parts),
        (before, after),
        kernel_before.zip(kernel_after),
    )
}

/// Prints and writes the results of a connect run (local or merged from workers).
fn report_connect(
    c: &Common,
    topics: usize,
    mode_name: &str,
    took: Duration,
    p: Part,
    rss: (Option<usize>, Option<usize>),
    kernel: Option<((usize, usize), (usize, usize))>,
) -> Result<(), String> {
    let n = c.clients;
    let (before, after) = rss;
    let kernel_pair = kernel;
    let rate = p.ok as f64 / took.as_secs_f64();
    println!(
        "connect: {} of {} clients joined one of {topics} topics (presence {mode_name}) in {:.2} s",
        p.ok,
        n,
        took.as_secs_f64()
    );
    println!("  connects+joins per second: {rate:.0}");
    p.print_errors();
    println!("  handshake us: {}", percentiles(&p.a));
    println!("  join complete us: {}", percentiles(&p.b));
    let client_per_conn = p.client_bytes as f64 / p.ok.max(1) as f64;
    println!("  load generator RSS per client connection: {client_per_conn:.0} bytes");
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => {
            let v = a.saturating_sub(b) as f64 / p.ok.max(1) as f64;
            println!(
                "  server RSS {:.1} MiB -> {:.1} MiB: {v:.0} bytes per connection (user space)",
                b as f64 / 1048576.0,
                a as f64 / 1048576.0
            );
            Some(v)
        }
        _ => None,
    };
    let kernel = kernel_pair.map(|((s0, t0), (s1, t1))| {
        let per = |b: usize, a: usize| a.saturating_sub(b) as f64 / p.ok.max(1) as f64;
        let (slab, tcp) = (per(s0, s1), per(t0, t1));
        println!("  kernel, both loopback ends: slab {slab:.0} + TCP buffers {tcp:.0} bytes per connection (system-wide, so noisy)");
        json!({"slab_bytes_per_connection": slab, "tcp_buffer_bytes_per_connection": tcp})
    });
    write_json(
        c,
        json!({"scenario": "connect", "presence": mode_name, "clients": n, "joined": p.ok, "topics": topics, "seconds": took.as_secs_f64(),
        "connects_joins_per_s": rate, "errors": p.errors, "timeouts": p.timeouts, "handshake_us": json_percentiles(&p.a),
        "join_us": json_percentiles(&p.b), "server_bytes_per_connection": per_conn, "client_bytes_per_connection": client_per_conn, "kernel": kernel}),
    )
}

/// Runs `work(i)` for this executor's share of client indices (`i % executors == e`), at most
/// `conc` at a time: `conc` worker tasks pull indices from a shared counter, rather than a task
/// per client queued on a semaphore (whose waiter list made large runs quadratic).
async fn for_share<F, Fut>(start: usize, step: usize, n: usize, conc: usize, work: F)
where
    F: Fn(usize) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let next = Rc::new(Cell::new(start));
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            glommio::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= n {
                        break;
                    }
                    next.set(i + step);
                    work(i).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
}

/// Connects this executor's share of clients (`i % executors == e`), at most `conc` at a time.
async fn connect_share(
    t: &Target,
    e: usize,
    executors: usize,
    n: usize,
    conc: usize,
    part: &Rc<RefCell<Part>>,
) -> Vec<(usize, Client)> {
    let clients = Rc::new(RefCell::new(Vec::new()));
    let work = {
        let (clients, part) = (clients.clone(), part.clone());
        let t = t.clone();
        move |i: usize| {
            let (t, clients, part) = (t.clone(), clients.clone(), part.clone());
            async move {
                match open(&t, i).await {
                    Ok(c) => clients.borrow_mut().push((i, c)),
                    Err(err) => part.borrow_mut().error(err),
                }
            }
        }
    };
    let (w, nw) = split();
    for_share(w + nw * e, nw * executors, n, conc, work).await;
    Rc::try_unwrap(clients)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

/// Reads frames until `done(view)` holds for the topic's presence view, or the deadline passes.
/// Returns false on timeout or disconnect.
async fn read_until(
    client: &mut Client,
    view: &mut View,
    deadline: Instant,
    mut done: impl FnMut(&View, &Value) -> bool,
) -> bool {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        let next = glommio::timer::timeout(remaining, async { Ok(client.next().await) }).await;
        let Ok(Some(f)) = next else { return false };
        match f[3].as_str() {
            Some("presence_state") => view.state(&f[4]),
            Some("presence_diff") => view.diff(&f[4]),
            _ => {}
        }
        if done(view, &f) {
            return true;
        }
    }
}

fn join_storm(c: Common) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let connected = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = CpuWindow::new(c.server_pid);
    let local = move || {
        let cpu2 = cpu.clone();
        let parts = on_executors(e_count, move |e| {
            let (t, connected, cpu) = (t.clone(), connected.clone(), cpu2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                // Everyone, in every worker process, is connected: now all join at once.
                phase(&connected);
                if e == 0 {
                    cpu.start();
                }
                let tasks: Vec<_> = clients
                    .into_iter()
                    .map(|(i, mut client)| {
                        let part = part.clone();
                        glommio::spawn_local(async move {
                            let sent = Instant::now();
                            let join =
                                json!(["1", "1", "room:storm", "phx_join", {"meta": {"i": i}}])
                                    .to_string();
                            if let Err(err) = client.send(join).await {
                                return part.borrow_mut().error(err);
                            }
                            let mut view = View::default();
                            let mut frames = 0u64;
                            let complete = read_until(&mut client, &mut view, deadline, |v, f| {
                                if f[3] == "phx_reply" && f[4]["status"] != "ok" {
                                    return true;
                                }
                                frames +=
                                    u64::from(f[3] == "presence_diff" || f[3] == "presence_state");
                                v.keys() >= n
                            })
                            .await;
                            {
                                let mut p = part.borrow_mut();
                                if complete && view.keys() >= n {
                                    p.a.record(sent.elapsed().as_micros() as u64).ok();
                                    p.b.record(frames).ok();
                                    p.ok += 1;
                                } else if complete {
                                    p.error("join refused".into());
                                } else {
                                    p.timeouts += 1;
                                }
                            }
                            client.close().await;
                        })
                    })
                    .collect();
                join_all(tasks).await;
                into_part(part)
            }
        })?;
        let cpu = cpu.finish().map(|(cpu, _)| cpu);
        Ok((Part::merge(parts), json!({ "server_cpu_s": cpu })))
    };
    let Some((p, extras)) = distributed(&c, |_| {}, local)? else {
        return Ok(());
    };
    println!(
        "join-storm: {n} clients joined one topic at once; {} saw the complete membership of {n}",
        p.ok
    );
    p.print_errors();
    println!("  join -> complete view us: {}", percentiles(&p.a));
    println!(
        "  every view complete after: {:.3} s",
        p.a.max() as f64 / 1e6
    );
    println!(
        "  presence frames (state + diffs) until complete, per client: {}",
        percentiles(&p.b)
    );
    let cpu = extras["server_cpu_s"].as_f64();
    if let Some(cpu) = cpu {
        println!("  server CPU from the first join until every view was complete: {cpu:.2} s");
    }
    write_json(
        &c,
        json!({"scenario": "join-storm", "clients": n, "complete": p.ok, "errors": p.errors, "timeouts": p.timeouts,
        "complete_view_us": json_percentiles(&p.a), "frames_per_client": json_percentiles(&p.b), "server_cpu_s": cpu}),
    )
}

fn fanout(c: Common, rounds: usize, interval_ms: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    if n < 2 {
        return Err("fanout needs at least 2 clients".into());
    }
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = CpuWindow::new(c.server_pid);
    let local = move || {
        let round_max = Arc::new(Mutex::new(vec![0u64; rounds]));
        let (rm, cpu2) = (round_max.clone(), cpu.clone());
        let parts = on_executors(e_count, move |e| {
            let (t, ready, round_max, cpu) = (t.clone(), ready.clone(), rm.clone(), cpu2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                // Everyone joins and waits for the complete membership before the rounds start.
                // Only the updater is tracked: the others subscribe without being tracked, so
                // setting up M members is not itself a join storm of M (see join-storm).
                let ready_members = join_each(clients, &part, deadline, |i| {
                    let payload = if i == 0 {
                        json!({"meta": {"round": -1}})
                    } else {
                        json!({"track": false})
                    };
                    json!(["1", "1", "room:fanout", "phx_join", payload]).to_string()
                })
                .await;
                phase(&ready);
                if e == 0 {
                    cpu.start();
                }
                let tasks: Vec<_> = ready_members
                .into_iter()
                .map(|(i, mut client)| {
                    let (part, round_max) = (part.clone(), round_max.clone());
                    glommio::spawn_local(async move {
                        let mut view = View::default();
                        if i == 0 {
                            // The updater: one meta change per interval, stamped with its send time.
                            let updater = glommio::spawn_local(async move {
                                for r in 0..rounds {
                                    let ns = mono_ns();
                                    let f = json!(["1", format!("u{r}"), "room:fanout", "presence_update", {"meta": {"round": r, "sent_ns": ns}}]).to_string();
                                    if client.send(f).await.is_err() {
                                        break;
                                    }
                                    glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                                }
                                client
                            });
                            let mut client = updater.await;
                            // It reads its own diffs too, like every member.
                            let _ = read_until(&mut client, &mut view, Instant::now() + Duration::from_millis(200), |_, _| false).await;
                            return;
                        }
                        let mut seen = 0;
                        let done = read_until(&mut client, &mut view, deadline, |_, f| {
                            if f[3] == "presence_diff" {
                                for m in f[4]["joins"]["u0"]["metas"].as_array().into_iter().flatten() {
                                    if let (Some(r), Some(sent)) = (m["round"].as_u64(), m["sent_ns"].as_u64()) {
                                        let lat = mono_ns().saturating_sub(sent) / 1000;
                                        part.borrow_mut().a.record(lat).ok();
                                        if let Ok(mut rm) = round_max.lock() {
                                            if let Some(slot) = rm.get_mut(r as usize) {
                                                *slot = (*slot).max(lat);
                                            }
                                        }
                                        seen += 1;
                                    }
                                }
                            }
                            seen >= rounds
                        })
                        .await;
                        part.borrow_mut().finished(done);
                    })
                })
                .collect();
                join_all(tasks).await;
                into_part(part)
            }
        })?;
        let maxima = round_max.lock().map_err(|_| "lock")?.clone();
        Ok((
            Part::merge(parts),
            json!({"round_max": maxima, "server_cpu": cpu.finish()}),
        ))
    };
    let Some((p, extras)) = distributed(&c, |_| {}, local)? else {
        return Ok(());
    };
    let mut all_saw = hist();
    for m in extras["round_max"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .filter(|&m| m > 0)
    {
        all_saw.record(m).ok();
    }
    println!("fanout: 1 tracked member + {} subscribers, {rounds} updates {interval_ms} ms apart; {} clients saw every update", n - 1, p.ok);
    p.print_errors();
    println!("  update -> seen by one member us: {}", percentiles(&p.a));
    println!(
        "  update -> seen by all members us: {}",
        percentiles(&all_saw)
    );
    let cpu = print_cpu(
        &extras["server_cpu"],
        "the first update until all saw the last",
    );
    write_json(
        &c,
        json!({"scenario": "fanout", "members": n, "rounds": rounds, "errors": p.errors, "timeouts": p.timeouts,
        "delivery_us": json_percentiles(&p.a), "all_members_us": json_percentiles(&all_saw), "server_cpu_pct": cpu}),
    )
}

/// Fanout in count mode: the member leaves (count 0) and rejoins (count 1) in turns; each
/// subscriber times every count change it sees from the latest round that produced that count.
fn fanout_count(c: Common, rounds: usize, interval_ms: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    if n < 2 {
        return Err("fanout needs at least 2 clients".into());
    }
    if c.procs > 1 {
        return Err("fanout --presence count runs in one process (--procs 1)".into());
    }
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    // Round r leaves the member's count at r % 2 (0 after a leave, 1 after a rejoin); its send
    // time, once sent.
    let sent = Arc::new(Mutex::new(vec![0u64; rounds]));
    let final_keys = ((rounds - 1) % 2) as u64;
    let count_of = |r: usize| (r % 2) as u64;
    let cpu = CpuWindow::new(c.server_pid);
    let cpu2 = cpu.clone();
    // Subscribers done (or given up): the member leaves only after all of them.
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let parts = on_executors(e_count, move |e| {
        let (t, ready, sent, cpu) = (t.clone(), ready.clone(), sent.clone(), cpu2.clone());
        let finished = finished.clone();
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = connect_share(&t, e, e_count, n, conc, &part).await;
            let ready_members = join_each(clients, &part, deadline, |i| {
                let payload = if i == 0 {
                    json!({"meta": {}, "presence": "count"})
                } else {
                    json!({"track": false, "presence": "count"})
                };
                json!(["1", "1", "room:fanout", "phx_join", payload]).to_string()
            })
            .await;
            phase(&ready);
            if e == 0 {
                cpu.start();
            }
            let tasks: Vec<_> = ready_members
                .into_iter()
                .map(|(i, mut client)| {
                    let (part, sent, finished) = (part.clone(), sent.clone(), finished.clone());
                    glommio::spawn_local(async move {
                        if i == 0 {
                            for r in 0..rounds {
                                let (jr, event, payload) = if r % 2 == 0 {
                                    ("1", "phx_leave", json!({}))
                                } else {
                                    ("1", "phx_join", json!({"meta": {}, "presence": "count"}))
                                };
                                if let Ok(mut s) = sent.lock() {
                                    s[r] = mono_ns();
                                }
                                let f = json!([jr, format!("u{r}"), "room:fanout", event, payload]);
                                if client.send(f.to_string()).await.is_err() {
                                    break;
                                }
                                glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                            }
                            // Stay until every subscriber is done: leaving would change the
                            // count they wait for.
                            while finished.load(std::sync::atomic::Ordering::Relaxed) < n - 1
                                && Instant::now() < deadline
                            {
                                glommio::timer::sleep(Duration::from_millis(50)).await;
                            }
                            drop(client);
                            return;
                        }
                        let mut view = View::default();
                        let mut last = 1u64;
                        let done = read_until(&mut client, &mut view, deadline, |_, f| {
                            if f[3] != "presence_count" {
                                return false;
                            }
                            let keys = f[4]["keys"].as_u64().unwrap_or(u64::MAX);
                            let now = mono_ns();
                            let times = sent.lock().map(|s| s.clone()).unwrap_or_default();
                            if keys != last {
                                last = keys;
                                let from = (0..rounds).rev().find(|&r| {
                                    times[r] != 0 && times[r] <= now && count_of(r) == keys
                                });
                                if let Some(r) = from {
                                    part.borrow_mut()
                                        .a
                                        .record(now.saturating_sub(times[r]) / 1000)
                                        .ok();
                                }
                            }
                            // Done once a count pushed after the last change shows it (a change
                            // that undoes one not yet pushed may push an unchanged count).
                            let last_sent = times[rounds - 1];
                            last_sent != 0 && last_sent <= now && keys == final_keys
                        })
                        .await;
                        finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        part.borrow_mut().finished(done);
                    })
                })
                .collect();
            join_all(tasks).await;
            into_part(part)
        }
    })?;
    let p = Part::merge(parts);
    println!("fanout (count): 1 member leaving and rejoining + {} count subscribers, {rounds} changes {interval_ms} ms apart; {} saw the last count", n - 1, p.ok);
    p.print_errors();
    println!(
        "  change -> count seen by one member us: {}",
        percentiles(&p.a)
    );
    let cpu = print_cpu(
        &json!(cpu.finish()),
        "the first change until all saw the last count",
    );
    write_json(
        &c,
        json!({"scenario": "fanout-count", "members": n, "rounds": rounds, "errors": p.errors, "timeouts": p.timeouts,
        "delivery_us": json_percentiles(&p.a), "server_cpu_pct": cpu}),
    )
}

/// Prints `[cpu_s, wall_s]` (a [`CpuWindow`]) as a share of one core; returns the percentage.
fn print_cpu(window: &Value, what: &str) -> Option<f64> {
    let (cpu, wall) = (window[0].as_f64()?, window[1].as_f64()?);
    let pct = 100.0 * cpu / wall;
    println!("  server CPU from {what}: {cpu:.2} s in {wall:.2} s ({pct:.1}% of one core)");
    Some(pct)
}

/// Runs --restart-cmd on its own thread, so the clients keep running meanwhile.
fn run_restart(cmd: String) {
    std::thread::spawn(move || {
        match std::process::Command::new("sh").args(["-c", &cmd]).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("roster-bench: --restart-cmd: {other:?}"),
        }
    });
}

fn reconnect_storm(
    c: Common,
    topics: usize,
    fraction: f64,
    window_s: u64,
    restart_cmd: Option<String>,
) -> Result<(), String> {
    let restarting = restart_cmd.is_some();
    let fraction = if restarting { 1.0 } else { fraction };
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    // Every k-th member of each topic reconnects, so each topic has some of both. (Client i is
    // member i / topics of topic i % topics: choosing by i itself would, with an even topic
    // count, put all reconnecting clients in the even topics, and the stayers would see none
    // of the storm.)
    let every = (1.0 / fraction.clamp(0.01, 1.0)).round().max(1.0) as usize;
    let reconnects = move |i: usize| (i / topics.max(1)).is_multiple_of(every);
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let parent_restart = restart_cmd.clone();
    let local = move || {
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen2 = seen.clone();
        let parts = on_executors(e_count, move |e| {
            let (t, ready, seen, restart_cmd) =
                (t.clone(), ready.clone(), seen2.clone(), restart_cmd.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                let members = join_each(clients, &part, deadline, |i| {
                    json!(["1", "1", format!("room:{}", i % topics), "phx_join", {"meta": {"i": i}}]).to_string()
                })
                .await;
                // Everyone has joined. Each client reads (and drops) the joins' own diffs until a
                // second passes without any, so that what the stayers count is the storm's doing
                // only (at 19k, the load generator takes seconds to get through them).
                phase(&ready);
                let draining: Vec<_> = members
                    .into_iter()
                    .map(|(i, mut client)| {
                        glommio::spawn_local(async move {
                            while Instant::now() < deadline {
                                let next = glommio::timer::timeout(Duration::from_secs(1), async {
                                    Ok(client.next().await)
                                })
                                .await;
                                if !matches!(next, Ok(Some(_))) {
                                    break;
                                }
                            }
                            (i, client)
                        })
                    })
                    .collect();
                let mut members = Vec::with_capacity(draining.len());
                for d in draining {
                    members.push(d.await);
                }
                // With --procs the parent restarts the server, once, as this phase opens.
                if phase(&ready) && !is_worker() {
                    if let Some(cmd) = restart_cmd.clone() {
                        run_restart(cmd);
                    }
                }
                let storm = Instant::now();
                let window_end = storm + Duration::from_secs(window_s);
                let tasks: Vec<_> = members
                .into_iter()
                .map(|(i, mut client)| {
                    let (t, part, seen) = (t.clone(), part.clone(), seen.clone());
                    glommio::spawn_local(async move {
                        if reconnects(i) {
                            if restarting {
                                // Wait for the restart to end this connection.
                                while Instant::now() < deadline && client.next().await.is_some() {}
                            }
                            drop(client); // abrupt: no close handshake, as when a network drops
                            let attempt = || async {
                                let mut c = open(&t, i).await?;
                                let join = json!(["1", "1", format!("room:{}", i % topics), "phx_join", {"meta": {"i": i}}]).to_string();
                                c.send(join).await?;
                                let mut view = View::default();
                                if read_until(&mut c, &mut view, deadline, |_, f| f[3] == "presence_state").await {
                                    Ok(c)
                                } else {
                                    Err("no presence_state after reconnecting".to_string())
                                }
                            };
                            let again = async {
                                // Across a restart, connecting fails while the server is down, and a
                                // connection can land on the old server's closing listener: retry,
                                // as phoenix.js does.
                                loop {
                                    match attempt().await {
                                        Ok(c) => return Ok(c),
                                        Err(e) if !restarting || Instant::now() > deadline => return Err(e),
                                        Err(_) => glommio::timer::sleep(Duration::from_millis(50)).await,
                                    }
                                }
                            };
                            match again.await {
                                Ok(c) => {
                                    {
                                        let mut p = part.borrow_mut();
                                        p.a.record(storm.elapsed().as_micros() as u64).ok();
                                        p.ok += 1;
                                    }
                                    // Stay until the window ends: leaving now would be counted as
                                    // a storm change by the others.
                                    glommio::timer::sleep(window_end.saturating_duration_since(Instant::now())).await;
                                    drop(c);
                                }
                                Err(err) => part.borrow_mut().error(err),
                            }
                        } else {
                            let mut view = View::default();
                            let mut changes = 0u64;
                            read_until(&mut client, &mut view, window_end, |_, f| {
                                if f[3] == "presence_diff" {
                                    for side in ["joins", "leaves"] {
                                        for (_, p) in f[4][side].as_object().into_iter().flatten() {
                                            changes += p["metas"].as_array().map_or(0, |m| m.len() as u64);
                                        }
                                    }
                                }
                                false
                            })
                            .await;
                            seen.fetch_add(changes, std::sync::atomic::Ordering::Relaxed);
                            part.borrow_mut().b.record(changes).ok();
                        }
                    })
                })
                .collect();
                join_all(tasks).await;
                into_part(part)
            }
        })?;
        let total = seen.load(std::sync::atomic::Ordering::Relaxed);
        Ok((Part::merge(parts), json!({"seen": total})))
    };
    let on_phase = |k: usize| {
        if k == 1 {
            if let Some(cmd) = parent_restart.clone() {
                run_restart(cmd);
            }
        }
    };
    let Some((p, extras)) = distributed(&c, on_phase, local)? else {
        return Ok(());
    };
    let total = extras["seen"].as_u64().unwrap_or(0);
    let reconnecting = (0..n).filter(|&i| i.is_multiple_of(every)).count();
    let how = if restarting {
        "lost their connection to a server restart"
    } else {
        "dropped at once"
    };
    println!("reconnect-storm: {n} clients in {topics} topics; {reconnecting} {how}, {} back and rejoined", p.ok);
    p.print_errors();
    println!("  drop -> rejoined us: {}", percentiles(&p.a));
    println!("  all back after: {:.3} s", p.a.max() as f64 / 1e6);
    println!("  presence changes seen by the {} that stayed, in {window_s} s: {total} in all; per client {}", p.b.len(), percentiles(&p.b));
    write_json(
        &c,
        json!({"scenario": "reconnect-storm", "clients": n, "topics": topics, "reconnected": p.ok, "dropped": reconnecting,
        "errors": p.errors, "rejoin_us": json_percentiles(&p.a), "changes_seen_total": total, "changes_seen_per_stayer": json_percentiles(&p.b)}),
    )
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
/// The server's CPU time over one phase of a run (in one process: with --procs the workers
/// reach a phase apart).
#[derive(Clone)]
struct CpuWindow {
    pid: Option<u32>,
    start: Arc<Mutex<Option<(f64, Instant)>>>,
}

impl CpuWindow {
    fn new(pid: Option<u32>) -> Self {
        CpuWindow {
            pid,
            start: Arc::new(Mutex::new(None)),
        }
    }

    fn start(&self) {
        if let (Some(cpu), Ok(mut s)) = (self.pid.and_then(cpu_seconds), self.start.lock()) {
            *s = Some((cpu, Instant::now()));
        }
    }

    /// `(server CPU seconds, wall seconds)` since `start`.
    fn finish(&self) -> Option<(f64, f64)> {
        let (cpu, at) = (*self.start.lock().ok()?)?;
        Some((
            self.pid.and_then(cpu_seconds)? - cpu,
            at.elapsed().as_secs_f64(),
        ))
    }
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn churn(c: Common, rate: u64, churners: usize, window_s: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = Arc::new(Mutex::new((None::<f64>, None::<f64>)));
    let (cpu2, pid) = (cpu.clone(), c.server_pid);
    let local = move || {
        let total_ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ops2 = total_ops.clone();
        let parts = on_executors(e_count, move |e| {
            let (t, ready, cpu, all_ops) = (t.clone(), ready.clone(), cpu2.clone(), ops2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                let mut subscribers = Vec::new();
                for (i, mut client) in clients {
                    let join =
                        json!(["1", "1", "room:churn", "phx_join", {"track": false}]).to_string();
                    if client.send(join).await.is_err() {
                        continue;
                    }
                    let mut view = View::default();
                    if read_until(&mut client, &mut view, deadline, |_, f| {
                        f[3] == "presence_state"
                    })
                    .await
                    {
                        subscribers.push((i, client));
                    }
                }
                let mut churn_clients = Vec::new();
                // The churners live in the first executor of the first process.
                let churning = e == 0 && split().0 == 0;
                if churning {
                    for k in 0..churners {
                        match open(&t, n + k).await {
                            Ok(c) => churn_clients.push(c),
                            Err(err) => part.borrow_mut().error(err),
                        }
                    }
                }
                if phase(&ready) && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.0 = pid.and_then(cpu_seconds);
                    }
                }
                let window_end = Instant::now() + Duration::from_secs(window_s);
                let ops = Rc::new(Cell::new(0u64));
                if churning && !churn_clients.is_empty() {
                    let sent_ops = ops.clone();
                    glommio::spawn_local(async move {
                    let gap = Duration::from_nanos(1_000_000_000 / rate.max(1));
                    let mut joined = vec![false; churn_clients.len()];
                    let mut k = 0;
                    while Instant::now() < window_end {
                        let idx = k % churn_clients.len();
                        let frame = if joined[idx] {
                            json!(["1", format!("l{k}"), "room:churn", "phx_leave", {}])
                        } else {
                            json!(["1", format!("j{k}"), "room:churn", "phx_join", {"meta": {"sent_ns": mono_ns()}, "presence": "none"}])
                        };
                        joined[idx] = !joined[idx];
                        let _ = churn_clients[idx].send(frame.to_string()).await;
                        k += 1;
                        sent_ops.set(k as u64);
                        glommio::timer::sleep(gap).await;
                    }
                    drop(churn_clients);
                })
                .detach();
                }
                let tasks: Vec<_> = subscribers
                    .into_iter()
                    .map(|(_, mut client)| {
                        let part = part.clone();
                        glommio::spawn_local(async move {
                            let mut view = View::default();
                            read_until(&mut client, &mut view, window_end, |_, f| {
                                if f[3] == "presence_diff" {
                                    for (_, p) in f[4]["joins"].as_object().into_iter().flatten() {
                                        for m in p["metas"].as_array().into_iter().flatten() {
                                            if let Some(sent) = m["sent_ns"].as_u64() {
                                                let lat = mono_ns().saturating_sub(sent) / 1000;
                                                part.borrow_mut().a.record(lat).ok();
                                            }
                                        }
                                    }
                                }
                                false
                            })
                            .await;
                            part.borrow_mut().ok += 1;
                        })
                    })
                    .collect();
                join_all(tasks).await;
                if e == 0 && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.1 = pid.and_then(cpu_seconds);
                    }
                }
                all_ops.fetch_add(ops.get(), std::sync::atomic::Ordering::Relaxed);
                into_part(part)
            }
        })?;
        let ops = total_ops.load(std::sync::atomic::Ordering::Relaxed);
        Ok((Part::merge(parts), json!({"ops": ops})))
    };
    let parent_cpu = cpu.clone();
    let on_phase = move |_k: usize| {
        if let Ok(mut g) = parent_cpu.lock() {
            g.0 = pid.and_then(cpu_seconds);
        }
    };
    let Some((p, extras)) = distributed(&c, on_phase, local)? else {
        return Ok(());
    };
    if c.procs > 1 {
        if let Ok(mut g) = cpu.lock() {
            g.1 = pid.and_then(cpu_seconds);
        }
    }
    let (before, after) = *cpu.lock().map_err(|_| "lock")?;
    let cpu_share = before.zip(after).map(|(b, a)| (a - b) / window_s as f64);
    let achieved = extras["ops"].as_u64().unwrap_or(0) as f64 / window_s as f64;
    println!("churn: {} subscribers of one topic; {churners} churners joining/leaving at {achieved:.0}/s (asked {rate}/s) for {window_s} s", p.ok);
    p.print_errors();
    println!("  join -> seen by a subscriber us: {}", percentiles(&p.a));
    if let Some(share) = cpu_share {
        println!(
            "  server CPU during the churn: {:.1}% of one core",
            share * 100.0
        );
    }
    write_json(
        &c,
        json!({"scenario": "churn", "subscribers": p.ok, "churners": churners, "rate": rate, "achieved_rate": achieved, "window_s": window_s,
        "errors": p.errors, "join_seen_us": json_percentiles(&p.a), "server_cpu_cores": cpu_share}),
    )
}

fn main() {
    let cli = Cli::parse();
    let common = match &cli.scenario {
        Scenario::Connect { common, .. }
        | Scenario::IdleMemory { common, .. }
        | Scenario::JoinStorm { common }
        | Scenario::Fanout { common, .. }
        | Scenario::Churn { common, .. }
        | Scenario::ReconnectStorm { common, .. } => common,
    };
    // Every run stops on its own: past --duration-s (plus time to report), the process exits.
    let limit = Duration::from_secs(common.duration_s + 30);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!(
            "roster-bench: still running {limit:?} after start (--duration-s + 30 s): stopping"
        );
        std::process::exit(3);
    });
    if let Some(w) = common.worker.as_deref().and_then(|w| w.split_once('/')) {
        if let (Ok(a), Ok(b)) = (w.0.parse(), w.1.parse()) {
            let _ = SPLIT.set((a, b));
        }
    }
    let result = match cli.scenario {
        Scenario::Connect {
            common,
            topics,
            presence,
            settle_s,
        } => connect(common, topics.max(1), presence, settle_s),
        Scenario::IdleMemory {
            common,
            frame_bytes,
            settle_s,
        } => idle_memory(common, frame_bytes, settle_s),
        Scenario::JoinStorm { common } => join_storm(common),
        Scenario::Churn {
            common,
            rate,
            churners,
            window_s,
        } => churn(common, rate, churners.max(1), window_s.max(1)),
        Scenario::ReconnectStorm {
            common,
            topics,
            reconnect_fraction,
            window_s,
            restart_cmd,
        } => reconnect_storm(
            common,
            topics.max(1),
            reconnect_fraction,
            window_s,
            restart_cmd,
        ),
        Scenario::Fanout {
            common,
            rounds,
            interval_ms,
            presence,
        } => match presence.as_str() {
            "full" => fanout(common, rounds.max(1), interval_ms),
            "count" => fanout_count(common, rounds.max(1), interval_ms),
            other => Err(format!("--presence must be full or count, not {other}")),
        },
    };
    if let Err(e) = result {
        eprintln!("roster-bench: {e}");
        std::process::exit(1);
    }
}
