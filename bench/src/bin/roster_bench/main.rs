//! roster-bench: load generator speaking Phoenix Channels V2 over WebSocket and nothing
//! engine-specific, so `--url` can point at roster or at a Phoenix app using Phoenix.Presence.
//!
//! Clients are lean glommio tasks (see `roster_bench::client`), spread over `--executors`
//! threads and, with `--procs`, worker processes. One module per scenario; `workers` runs
//! clients, `probes` reads the machine, `part` merges and reports what was measured. Every run
//! targets loopback only, is bounded by `--clients` and `--duration-s`, and stops on its own.

mod churn;
mod cluster;
mod connect;
mod fanout;
mod idle_memory;
mod join_storm;
mod million;
mod part;
mod probes;
mod reconnect_storm;
mod target;
mod workers;

/// What every module of this program uses.
mod prelude {
    pub(crate) use std::cell::{Cell, RefCell};
    pub(crate) use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
    pub(crate) use std::rc::Rc;
    pub(crate) use std::sync::{Arc, Barrier, Mutex};
    pub(crate) use std::time::{Duration, Instant};

    pub(crate) use glommio::{LocalExecutorBuilder, Placement};
    pub(crate) use hdrhistogram::Histogram;
    pub(crate) use roster_bench::client::{heartbeat_text, Client};
    pub(crate) use roster_bench::report::{json_percentiles, percentiles};
    pub(crate) use roster_bench::view::View;
    pub(crate) use serde_json::{json, Value};

    pub(crate) use crate::part::*;
    pub(crate) use crate::probes::*;
    pub(crate) use crate::target::*;
    pub(crate) use crate::workers::*;
    pub(crate) use crate::Common;
}

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::churn::churn;
use crate::cluster::cluster;
use crate::connect::connect;
use crate::fanout::{fanout, fanout_count};
use crate::idle_memory::idle_memory;
use crate::join_storm::join_storm;
use crate::million::million;
use crate::reconnect_storm::{reconnect_storm, Storm};
use crate::workers::SPLIT;

#[derive(Parser)]
#[command(about = "Load generator for Phoenix Channels V2 presence servers (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
pub(crate) struct Common {
    /// Socket URL as phoenix.js takes it; several, comma-separated, for the nodes of a cluster
    /// (client i connects to URL i mod N).
    #[arg(long, default_value = "ws://127.0.0.1:4000/socket")]
    pub(crate) url: String,
    #[arg(long, default_value_t = 1000)]
    pub(crate) clients: usize,
    /// Upper bound on the whole run.
    #[arg(long, default_value_t = 60)]
    pub(crate) duration_s: u64,
    /// Client threads (glommio executors).
    #[arg(long, default_value_t = 1)]
    pub(crate) executors: usize,
    /// Connections being set up at once, per executor.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Source addresses to spread clients over, e.g. 127.0.0.2-127.0.0.60 (one address allows
    /// ~28k connections to one server port).
    #[arg(long)]
    pub(crate) source_addrs: Option<String>,
    /// The server's pid, to report its resident memory per connection.
    #[arg(long)]
    pub(crate) server_pid: Option<u32>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
    /// Worker processes to spread the clients over (not `fanout --presence count`): one process
    /// may hold only so many descriptors (~20k here), so a million clients need many.
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: usize,
    /// Seconds between a client's Phoenix heartbeats while it reads (phoenix.js: 30; 0: none).
    /// Servers close connections silent for their timeout (Phoenix's and roster's: 60 s).
    #[arg(long, default_value_t = 30)]
    pub(crate) heartbeat_s: u64,
    /// Use only what an app written from the Phoenix guides does (every joiner tracked, an
    /// update as a leave and a rejoin), none of roster's extensions (`track: false`, presence
    /// modes, presence_update): for pointing roster-bench at a Phoenix app. Scenarios that
    /// need an extension (fanout --presence count, cluster) refuse it.
    #[arg(long)]
    pub(crate) phoenix_compatible: bool,
    /// Internal: this process is worker W of N ("W/N"), run by a parent with --procs.
    #[arg(long, hide = true)]
    pub(crate) worker: Option<String>,
}

#[derive(Subcommand)]
enum Scenario {
    /// N clients connect and sit idle; then each sends one large text frame (a heartbeat padded to
    /// --frame-bytes) and waits for its reply: the server's resident memory per connection idle,
    /// and idle again after the burst (read after --settle-s, past the server's 10 s heap trim).
    /// Phoenix-compatible as it is (no join at all).
    IdleMemory {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 60_000)]
        frame_bytes: usize,
        #[arg(long, default_value_t = 12)]
        settle_s: u64,
    },
    /// N clients connect and join (tracked) one of T topics each: connects+joins per second, join
    /// latency, the server's memory per connection; then they are held --settle-s, reading and
    /// sending heartbeats, and connections lost meanwhile are counted. `--presence` is roster's
    /// (with --phoenix-compatible, full only).
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
    /// Phoenix-compatible as it is (every joiner tracked).
    JoinStorm {
        #[command(flatten)]
        common: Common,
    },
    /// One tracked member and N-1 subscribers of one topic; the member updates its meta every
    /// interval: time until each subscriber saw each update, and until all had. With
    /// `--presence count` the subscribers get counts, and the member leaves and rejoins each
    /// round instead (an update changes no count): time until each saw each new count.
    /// Uses roster's `track: false` and presence_update; with --phoenix-compatible every
    /// subscriber is tracked and the member leaves and rejoins (count mode is roster's only).
    /// The subscribers are read by one epoll thread per executor, the receiver `floor` uses.
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
    /// from a join to each subscriber seeing it, and the server's CPU. The churners run on an
    /// executor of their own; the achieved rate is reported beside the asked one. Uses roster's
    /// `track: false` (subscribers) and presence none (churners); with --phoenix-compatible
    /// everyone is tracked in full. The subscribers are read by one epoll thread per executor.
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
    /// clients that stayed saw meanwhile. Phoenix-compatible as it is.
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
        /// Where the dropped clients reconnect (comma-separated, client i to URL i mod N), as a
        /// load balancer sends a dead node's clients to the others [default: --url].
        #[arg(long)]
        reconnect_url: Option<String>,
        /// Extra clients that join the same topics on --observer-url before the storm and stay,
        /// counting the presence changes they see (e.g. on the nodes that survive a kill).
        #[arg(long, default_value_t = 0)]
        observers: usize,
        #[arg(long)]
        observer_url: Option<String>,
    },
    /// roster nodes of one cluster, one --url each (in node order): remote join latency (a
    /// prober per node joins and leaves, a watcher per node times each join), idle and while
    /// churners join and leave other topics at --rate; NATS messages and bytes per change and
    /// the last node's memory with and without interest in a --big topic (from the nodes'
    /// metrics, --admin-urls); with --kill-cmd, the time until a killed node's presences left.
    Cluster {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: cluster::Options,
    },
    /// A large run against a cluster's nodes (one --url each), on the same clients throughout:
    /// ramp (connect, join a small topic in full presence or a large one in count presence,
    /// watch a few users), hold (idle: memory, CPU and NATS traffic read off the machine),
    /// churn (clients leave and rejoin at --churn-rate; join-to-seen latency on other nodes),
    /// failover (--kill-cmd ends a node; time until its clients are back on the others, and
    /// presence changes everyone else saw). Needs --procs; see scripts/million.sh.
    Million {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: million::Options,
    },
}

fn main() {
    let cli = Cli::parse();
    let common = match &cli.scenario {
        Scenario::Connect { common, .. }
        | Scenario::IdleMemory { common, .. }
        | Scenario::JoinStorm { common }
        | Scenario::Fanout { common, .. }
        | Scenario::Churn { common, .. }
        | Scenario::ReconnectStorm { common, .. }
        | Scenario::Cluster { common, .. }
        | Scenario::Million { common, .. } => common,
    };
    let _ = workers::PHOENIX_COMPATIBLE.set(common.phoenix_compatible);
    roster_bench::client::set_heartbeat(
        (common.heartbeat_s > 0).then(|| Duration::from_secs(common.heartbeat_s)),
    );
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
            reconnect_url,
            observers,
            observer_url,
        } => reconnect_storm(
            common,
            topics.max(1),
            reconnect_fraction,
            window_s,
            Storm {
                restart_cmd,
                reconnect_url,
                observers,
                observer_url,
            },
        ),
        Scenario::Cluster { common, options } => cluster(common, options),
        Scenario::Million { common, options } => million(common, options),
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
