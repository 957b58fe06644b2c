//! Server configuration: command line, `ROSTER_*` environment variables, and an optional TOML
//! file, in that order of precedence, over PROTOCOL.md's defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// roster: a thread-per-core presence server speaking Phoenix Channels V2.
#[derive(Parser, Debug, Default)]
#[command(name = "roster", version, about)]
pub struct Cli {
    /// TOML file with any of the options below (names with underscores, e.g. `max_meta_bytes`).
    /// Command-line flags and environment variables override it.
    #[arg(long, env = "ROSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address every shard listens on (SO_REUSEPORT). [default: 127.0.0.1:4000]
    #[arg(long, env = "ROSTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Number of shards, one pinned thread each. [default: the CPUs this process may use]
    #[arg(long, env = "ROSTER_SHARDS")]
    pub shards: Option<u16>,
    /// Listen backlog of each shard's socket: how many connections may wait for accept during a
    /// reconnect storm. [default: 65535; the kernel caps it at net.core.somaxconn]
    #[arg(long, env = "ROSTER_BACKLOG")]
    pub backlog: Option<u32>,
    /// Close (1000) a connection that sent no text message (phoenix.js sends a heartbeat every
    /// 30 s) for this long. Pings and pongs are answered but do not count. [default: 60000]
    #[arg(long, env = "ROSTER_HEARTBEAT_TIMEOUT_MS")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Topics one connection may have joined at once. [default: 100]
    #[arg(long, env = "ROSTER_MAX_TOPICS_PER_CONN")]
    pub max_topics_per_conn: Option<usize>,
    /// Largest meta object a client may send, in bytes. [default: 1024]
    #[arg(long, env = "ROSTER_MAX_META_BYTES")]
    pub max_meta_bytes: Option<usize>,
    /// Longest topic name a client may join; longer ones get an error reply. [default: 255]
    #[arg(long, env = "ROSTER_MAX_TOPIC_BYTES")]
    pub max_topic_bytes: Option<usize>,
    /// Longest join_ref or ref a client may send; longer ones close the connection with 1007.
    /// [default: 64]
    #[arg(long, env = "ROSTER_MAX_REF_BYTES")]
    pub max_ref_bytes: Option<usize>,
    /// Largest WebSocket frame or message a client may send; larger ones close the connection
    /// with 1009. [default: 65536]
    #[arg(long, env = "ROSTER_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Bytes of frames queued for one connection before it counts as a slow consumer: its queued
    /// presence diffs are dropped, and it gets a fresh presence_state once it drains.
    /// [default: 1048576]
    #[arg(long, env = "ROSTER_MAX_OUTBOUND_BYTES")]
    pub max_outbound_bytes: Option<usize>,
    /// Least time between two presence_count pushes for one topic. [default: 1000]
    #[arg(long, env = "ROSTER_COUNT_INTERVAL_MS")]
    pub count_interval_ms: Option<u64>,
    /// A slow consumer that has not drained its queue this long after losing diffs is closed
    /// with 1008. [default: 30000]
    #[arg(long, env = "ROSTER_SLOW_CONSUMER_TIMEOUT_MS")]
    pub slow_consumer_timeout_ms: Option<u64>,
    /// Users one connection may watch over all its watch: topics. [default: 1000]
    #[arg(long, env = "ROSTER_MAX_WATCH")]
    pub max_watch: Option<usize>,
    /// Coalescing window of a large topic: its changes go out as one diff per window, and its
    /// joiners within a window share one presence_state. 0 turns coalescing off. [default: 50]
    #[arg(long, env = "ROSTER_DIFF_WINDOW_MS")]
    pub diff_window_ms: Option<u64>,
    /// Members (tracked presences or full-mode subscribers, whichever is more) from which a
    /// topic is large and coalesced. [default: 1000]
    #[arg(long, env = "ROSTER_LARGE_TOPIC_THRESHOLD")]
    pub large_topic_threshold: Option<u32>,
    /// How long a closed connection's presences are held for the same key to take them over
    /// (a reconnect then broadcasts nothing). 0 = leave at once. [default: 0]
    #[arg(long, env = "ROSTER_LEAVE_GRACE_MS")]
    pub leave_grace_ms: Option<u64>,
    /// Where a graceful stop (SIGTERM) writes this node's presences, for its next start to take
    /// back: a client that reconnects within --restart-grace-ms with an equal meta keeps its
    /// presence and phx_ref, and nobody sees it leave. Unset: a restart starts empty.
    #[arg(long, env = "ROSTER_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// How long after a graceful stop its state file is taken back, and its presences held for
    /// their clients (what nobody takes back then leaves). [default: 30000]
    #[arg(long, env = "ROSTER_RESTART_GRACE_MS")]
    pub restart_grace_ms: Option<u64>,
    /// Capacity of each ring between two shards, in batches of messages. [default: 1024]
    #[arg(long, env = "ROSTER_RING_CAPACITY")]
    pub ring_capacity: Option<usize>,
    /// File holding the HS256 secret that signs client tokens (its bytes, trailing newline
    /// dropped). The secret may instead come in ROSTER_SECRET. Without either, identities are
    /// not verified (development mode).
    #[arg(long, env = "ROSTER_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Messages a connection may send per second (a token bucket holding one second's worth;
    /// pings count too); faster closes it with 1008. 0 = no limit. [default: 200, so a client
    /// rejoining all its --max-topics-per-conn channels at once fits]
    #[arg(long, env = "ROSTER_MAX_MSGS_PER_SEC")]
    pub max_msgs_per_sec: Option<u32>,
    /// Connections in total (over all shards), counted from accept (upgrades in progress
    /// included); more get HTTP 503. 0 = only the open-files limit. [default: 0]
    #[arg(long, env = "ROSTER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections from one source address, counted from accept (upgrades in progress
    /// included); more get HTTP 429. 0 = no limit. [default: 0]
    #[arg(long, env = "ROSTER_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<usize>,
    /// Connections accepted whose upgrade request has not been answered yet, over all shards;
    /// more get HTTP 503 at once. 0 = no limit. [default: 4096]
    #[arg(long, env = "ROSTER_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// The same, from one source address; more get HTTP 429. 0 = no limit (behind a proxy every
    /// client shares its address). [default: 0]
    #[arg(long, env = "ROSTER_MAX_HANDSHAKES_PER_IP")]
    pub max_handshakes_per_ip: Option<usize>,
    /// A connection must send its whole upgrade request within this; then it gets HTTP 408.
    /// [default: 10000]
    #[arg(long, env = "ROSTER_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Largest upgrade request (request line and headers, a token in the URL or in
    /// Sec-WebSocket-Protocol included); larger gets HTTP 431. [default: 8192]
    #[arg(long, env = "ROSTER_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// A WebSocket message whose first frame has arrived must be complete within this (a
    /// fragmented or dribbled message holds buffers); else close 1008. [default: 10000]
    #[arg(long, env = "ROSTER_MESSAGE_TIMEOUT_MS")]
    pub message_timeout_ms: Option<u64>,
    /// A browser origin allowed to connect (repeat for several); others get HTTP 403. None set:
    /// any. Requests without an Origin header (not browsers) are not checked.
    #[arg(
        long = "allowed-origin",
        env = "ROSTER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Address of the admin listener (/healthz, /metrics, /api/...); port 0 picks one (logged).
    /// [default: 127.0.0.1:4001]
    #[arg(long, env = "ROSTER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Connections the admin listener holds at once; a new one takes the place of the one that
    /// has waited longest without sending a complete request (so idle sockets cannot shut out
    /// /healthz). Admin requests may be at most 16 KiB. [default: 64]
    #[arg(long, env = "ROSTER_ADMIN_MAX_CONNS")]
    pub admin_max_conns: Option<usize>,
    /// An admin connection must send its whole request within this, and then take the answer
    /// within as long again; an unread request gets 408. [default: 2000]
    #[arg(long, env = "ROSTER_ADMIN_TIMEOUT_MS")]
    pub admin_timeout_ms: Option<u64>,
    /// Bearer key the admin API and /metrics require (not /healthz). Prefer the environment
    /// variable: a command line is visible to other users. [default: none, open]
    #[arg(long, env = "ROSTER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// NATS server(s) to share presence through, comma-separated (`nats://`, `tls://`; user and
    /// password or a token may be in the URL). Set: this node is one of a cluster (docs/CLUSTER.md).
    /// [default: none, a single node]
    #[arg(long, env = "ROSTER_NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// This node's name in the cluster, stable across restarts; a node finding a live node of
    /// its name refuses to start. [default: the host name and the listen port]
    #[arg(long, env = "ROSTER_NODE_NAME")]
    pub node_name: Option<String>,
    /// How often this node tells the cluster it is alive. [default: 500]
    #[arg(long, env = "ROSTER_NODE_HEARTBEAT_MS")]
    pub node_heartbeat_ms: Option<u64>,
    /// A node silent this long is down: its presences leave on every other node. [default: 3000]
    #[arg(long, env = "ROSTER_NODE_TIMEOUT_MS")]
    pub node_timeout_ms: Option<u64>,
    /// While this node's own NATS connection is down it keeps showing the other nodes'
    /// presences this long, so that a shorter NATS restart is not seen by clients.
    /// [default: 10000]
    #[arg(long, env = "ROSTER_ISOLATION_GRACE_MS")]
    pub isolation_grace_ms: Option<u64>,
    /// First tokens of every subject the cluster uses, so that clusters can share one NATS.
    /// [default: roster]
    #[arg(long, env = "ROSTER_NATS_PREFIX")]
    pub nats_prefix: Option<String>,
    /// NATS credentials file (a user JWT and its NKey seed), as `nsc` writes it, or an NKey
    /// seed alone, as `nk -gen user` writes it.
    #[arg(long, env = "ROSTER_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// Where presence events go (presence_join/update/leave, user_online/offline): batched JSON
    /// POSTs, retried until taken (docs/OPERATIONS.md, "Presence events"). [default: none]
    #[arg(long, env = "ROSTER_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// File holding the secret that signs webhook bodies (HMAC-SHA256, header
    /// `x-roster-signature: sha256=HEX`); it may instead come in ROSTER_WEBHOOK_SECRET.
    /// [default: unsigned]
    #[arg(long, env = "ROSTER_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Topics whose events are reported, comma-separated, as token grants write them (an exact
    /// name, or a prefix ending in `*`); for the webhook and the NATS events alike.
    /// [default: every topic]
    #[arg(long, env = "ROSTER_WEBHOOK_TOPICS", value_delimiter = ',')]
    pub webhook_topics: Vec<String>,
    /// Most events in one webhook POST. [default: 100]
    #[arg(long, env = "ROSTER_WEBHOOK_BATCH")]
    pub webhook_batch: Option<usize>,
    /// How long a webhook batch waits for more events after its first. [default: 50]
    #[arg(long, env = "ROSTER_WEBHOOK_BATCH_MS")]
    pub webhook_batch_ms: Option<u64>,
    /// A webhook POST not answered within this is tried again. [default: 5000]
    #[arg(long, env = "ROSTER_WEBHOOK_TIMEOUT_MS")]
    pub webhook_timeout_ms: Option<u64>,
    /// Events waiting for each sink (webhook, NATS) past which new ones are dropped and
    /// counted (roster_events_dropped_total); shards never wait. [default: 65536]
    #[arg(long, env = "ROSTER_EVENT_QUEUE")]
    pub event_queue: Option<usize>,
    /// In a cluster, publish each presence event on NATS too, as JSON on
    /// `PREFIX.events.TYPE` (TYPE: presence_join, ...). [default: off]
    #[arg(long, env = "ROSTER_NATS_EVENTS")]
    pub nats_events: bool,
    /// A token refused at the upgrade (missing, forged, expired) is told in the WebSocket,
    /// which a browser can read, rather than as HTTP 401, which it cannot: the upgrade
    /// succeeds and is closed at once with 4001 (expired) or 4003 (any other) and the reason.
    /// [default: off]
    #[arg(long, env = "ROSTER_REFUSALS_IN_BAND")]
    pub refusals_in_band: bool,
}

/// The same options, from a TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub shards: Option<u16>,
    pub backlog: Option<u32>,
    pub heartbeat_timeout_ms: Option<u64>,
    pub max_topics_per_conn: Option<usize>,
    pub max_meta_bytes: Option<usize>,
    pub max_topic_bytes: Option<usize>,
    pub max_ref_bytes: Option<usize>,
    pub max_frame_bytes: Option<usize>,
    pub max_outbound_bytes: Option<usize>,
    pub count_interval_ms: Option<u64>,
    pub slow_consumer_timeout_ms: Option<u64>,
    pub max_watch: Option<usize>,
    pub diff_window_ms: Option<u64>,
    pub large_topic_threshold: Option<u32>,
    pub leave_grace_ms: Option<u64>,
    pub state_file: Option<PathBuf>,
    pub restart_grace_ms: Option<u64>,
    pub ring_capacity: Option<usize>,
    pub secret_file: Option<PathBuf>,
    pub max_msgs_per_sec: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_conns_per_ip: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
    pub admin_listen: Option<SocketAddr>,
    pub admin_max_conns: Option<usize>,
    pub admin_timeout_ms: Option<u64>,
    pub api_key: Option<String>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_ip: Option<usize>,
    pub handshake_timeout_ms: Option<u64>,
    pub max_request_bytes: Option<usize>,
    pub message_timeout_ms: Option<u64>,
    pub nats_url: Option<Vec<String>>,
    pub node_name: Option<String>,
    pub node_heartbeat_ms: Option<u64>,
    pub node_timeout_ms: Option<u64>,
    pub isolation_grace_ms: Option<u64>,
    pub nats_prefix: Option<String>,
    pub nats_creds: Option<PathBuf>,
    pub webhook_url: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    pub webhook_topics: Option<Vec<String>>,
    pub webhook_batch: Option<usize>,
    pub webhook_batch_ms: Option<u64>,
    pub webhook_timeout_ms: Option<u64>,
    pub event_queue: Option<usize>,
    pub nats_events: Option<bool>,
    pub refusals_in_band: Option<bool>,
}

/// Everything the server runs with, resolved.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub shards: u16,
    pub backlog: u32,
    pub heartbeat_timeout: Duration,
    pub max_topics_per_conn: usize,
    pub max_meta_bytes: usize,
    pub max_topic_bytes: usize,
    pub max_ref_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_outbound_bytes: usize,
    pub count_interval: Duration,
    pub slow_consumer_timeout: Duration,
    pub max_watch: usize,
    pub diff_window: Duration,
    pub large_topic_threshold: u32,
    pub leave_grace: Duration,
    pub state_file: Option<PathBuf>,
    pub restart_grace: Duration,
    pub ring_capacity: usize,
    /// The token secret; None = development mode.
    pub secret: Option<Secret>,
    /// 0 = no limit, for each of these.
    pub max_msgs_per_sec: u32,
    pub max_connections: usize,
    pub max_conns_per_ip: usize,
    /// Empty = any origin.
    pub allowed_origins: Vec<String>,
    pub admin_listen: SocketAddr,
    pub admin_max_conns: usize,
    pub admin_timeout: Duration,
    pub api_key: Option<Secret>,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    pub handshake_timeout: Duration,
    pub max_request_bytes: usize,
    pub message_timeout: Duration,
    /// None: a single node.
    pub cluster: Option<NodeConfig>,
    pub events: EventsConfig,
    /// Token refusals as a close after the upgrade (`--refusals-in-band`).
    pub refusals_in_band: bool,
}

/// Where presence events go (`net::events`).
#[derive(Clone, Debug, Default)]
pub struct EventsConfig {
    pub webhook: Option<WebhookConfig>,
    /// Publish them on NATS too (cluster mode).
    pub nats: bool,
    /// Patterns of the topics reported; empty: all.
    pub topics: Vec<String>,
    /// Events each sink may have waiting.
    pub queue: usize,
}

impl EventsConfig {
    /// Whether any sink wants events (else the core makes none).
    pub fn any(&self) -> bool {
        self.webhook.is_some() || self.nats
    }
}

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: Option<Secret>,
    pub batch: usize,
    pub batch_wait: Duration,
    pub timeout: Duration,
}

/// How this node joins a cluster (`--nats-url` and the options after it).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub nats_urls: Vec<String>,
    pub name: String,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub isolation_grace: Duration,
    /// The node's `--leave-grace-ms`: a dead node's presences are held that long here too.
    pub leave_grace: Duration,
    pub prefix: String,
    pub creds: Option<PathBuf>,
}

/// A secret (token-signing secret, API key); never printed.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The secret from `--secret-file` (or the file's setting) or else ROSTER_SECRET.
fn secret(file: Option<&std::path::Path>) -> Result<Option<Secret>, String> {
    let Some(bytes) = read_secret(file, "ROSTER_SECRET")? else {
        return Ok(None);
    };
    if bytes.0.len() < 32 {
        return Err("the token secret must be at least 32 bytes".into());
    }
    Ok(Some(bytes))
}

/// A secret from `file` (its bytes, trailing newlines dropped) or else the variable `env`.
fn read_secret(file: Option<&std::path::Path>, env: &str) -> Result<Option<Secret>, String> {
    let bytes = match file {
        Some(path) => {
            let mut bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            bytes
        }
        None => match std::env::var_os(env) {
            Some(s) => s.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    if bytes.is_empty() {
        return Err(format!(
            "the secret in {} is empty",
            file.map_or(env.into(), |p| p.display().to_string())
        ));
    }
    Ok(Some(Secret(bytes)))
}

/// The host's name, for the default node name.
pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and the last byte is kept 0.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match rc {
        0 if end > 0 => String::from_utf8_lossy(&buf[..end]).into_owned(),
        _ => "roster".into(),
    }
}

impl ServerConfig {
    /// This node's name: the cluster's `--node-name`, or on a single node what it would default
    /// to (events name it).
    pub fn node_name(&self) -> String {
        match &self.cluster {
            Some(node) => node.name.clone(),
            None => format!("{}-{}", host_name(), self.listen.port()),
        }
    }

    /// Merges flags/env over the file over defaults. `default_shards` is the CPU count.
    pub fn resolve(cli: Cli, default_shards: u16) -> Result<ServerConfig, String> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        // The core's limits have their defaults in one place.
        let core = crate::core::Config::DEFAULT;
        let mut c = ServerConfig {
            listen: cli
                .listen
                .or(file.listen)
                .unwrap_or_else(|| ([127, 0, 0, 1], 4000).into()),
            shards: cli.shards.or(file.shards).unwrap_or(default_shards),
            backlog: cli.backlog.or(file.backlog).unwrap_or(65535),
            heartbeat_timeout: Duration::from_millis(
                cli.heartbeat_timeout_ms
                    .or(file.heartbeat_timeout_ms)
                    .unwrap_or(core.heartbeat_timeout.0),
            ),
            max_topics_per_conn: cli
                .max_topics_per_conn
                .or(file.max_topics_per_conn)
                .unwrap_or(core.max_topics_per_conn),
            max_meta_bytes: cli
                .max_meta_bytes
                .or(file.max_meta_bytes)
                .unwrap_or(core.max_meta_bytes),
            max_topic_bytes: cli
                .max_topic_bytes
                .or(file.max_topic_bytes)
                .unwrap_or(core.max_topic_bytes),
            max_ref_bytes: cli
                .max_ref_bytes
                .or(file.max_ref_bytes)
                .unwrap_or(core.max_ref_bytes),
            max_frame_bytes: cli
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(64 << 10),
            max_outbound_bytes: cli
                .max_outbound_bytes
                .or(file.max_outbound_bytes)
                .unwrap_or(1 << 20),
            count_interval: Duration::from_millis(
                cli.count_interval_ms
                    .or(file.count_interval_ms)
                    .unwrap_or(core.count_interval.0),
            ),
            slow_consumer_timeout: Duration::from_millis(
                cli.slow_consumer_timeout_ms
                    .or(file.slow_consumer_timeout_ms)
                    .unwrap_or(core.slow_consumer_timeout.0),
            ),
            max_watch: cli.max_watch.or(file.max_watch).unwrap_or(core.max_watch),
            diff_window: Duration::from_millis(
                cli.diff_window_ms
                    .or(file.diff_window_ms)
                    .unwrap_or(core.diff_window.0),
            ),
            large_topic_threshold: cli
                .large_topic_threshold
                .or(file.large_topic_threshold)
                .unwrap_or(core.large_topic_threshold),
            leave_grace: Duration::from_millis(
                cli.leave_grace_ms
                    .or(file.leave_grace_ms)
                    .unwrap_or(core.leave_grace.0),
            ),
            state_file: cli.state_file.or(file.state_file),
            restart_grace: Duration::from_millis(
                cli.restart_grace_ms
                    .or(file.restart_grace_ms)
                    .unwrap_or(30_000),
            ),
            ring_capacity: cli.ring_capacity.or(file.ring_capacity).unwrap_or(1024),
            secret: secret(cli.secret_file.as_deref().or(file.secret_file.as_deref()))?,
            max_msgs_per_sec: cli
                .max_msgs_per_sec
                .or(file.max_msgs_per_sec)
                .unwrap_or(core.max_msgs_per_sec),
            max_connections: cli.max_connections.or(file.max_connections).unwrap_or(0),
            max_conns_per_ip: cli.max_conns_per_ip.or(file.max_conns_per_ip).unwrap_or(0),
            allowed_origins: if cli.allowed_origins.is_empty() {
                file.allowed_origins.unwrap_or_default()
            } else {
                cli.allowed_origins
            },
            admin_listen: cli
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or_else(|| ([127, 0, 0, 1], 4001).into()),
            admin_max_conns: cli.admin_max_conns.or(file.admin_max_conns).unwrap_or(64),
            admin_timeout: Duration::from_millis(
                cli.admin_timeout_ms
                    .or(file.admin_timeout_ms)
                    .unwrap_or(2000),
            ),
            max_handshakes: cli.max_handshakes.or(file.max_handshakes).unwrap_or(4096),
            max_handshakes_per_ip: cli
                .max_handshakes_per_ip
                .or(file.max_handshakes_per_ip)
                .unwrap_or(0),
            handshake_timeout: Duration::from_millis(
                cli.handshake_timeout_ms
                    .or(file.handshake_timeout_ms)
                    .unwrap_or(10_000),
            ),
            max_request_bytes: cli
                .max_request_bytes
                .or(file.max_request_bytes)
                .unwrap_or(8192),
            message_timeout: Duration::from_millis(
                cli.message_timeout_ms
                    .or(file.message_timeout_ms)
                    .unwrap_or(core.message_timeout.0),
            ),
            api_key: cli
                .api_key
                .or(file.api_key)
                .filter(|k| !k.is_empty())
                .map(|k| Secret(k.into_bytes())),
            cluster: None,
            events: EventsConfig::default(),
            refusals_in_band: cli.refusals_in_band || file.refusals_in_band.unwrap_or(false),
        };
        let webhook = match cli.webhook_url.or(file.webhook_url) {
            Some(url) => {
                let file_secret = cli.webhook_secret_file.or(file.webhook_secret_file);
                let secret = read_secret(file_secret.as_deref(), "ROSTER_WEBHOOK_SECRET")?;
                let parsed =
                    url::Url::parse(&url).map_err(|e| format!("--webhook-url {url:?}: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("--webhook-url {url:?}: not http:// or https://"));
                }
                Some(WebhookConfig {
                    url,
                    secret,
                    batch: cli
                        .webhook_batch
                        .or(file.webhook_batch)
                        .unwrap_or(100)
                        .max(1),
                    batch_wait: Duration::from_millis(
                        cli.webhook_batch_ms.or(file.webhook_batch_ms).unwrap_or(50),
                    ),
                    timeout: Duration::from_millis(
                        cli.webhook_timeout_ms
                            .or(file.webhook_timeout_ms)
                            .unwrap_or(5000)
                            .max(1),
                    ),
                })
            }
            None => None,
        };
        c.events = EventsConfig {
            webhook,
            nats: cli.nats_events || file.nats_events.unwrap_or(false),
            topics: if cli.webhook_topics.is_empty() {
                file.webhook_topics.unwrap_or_default()
            } else {
                cli.webhook_topics
            },
            queue: cli
                .event_queue
                .or(file.event_queue)
                .unwrap_or(65_536)
                .max(1),
        };
        let urls = if cli.nats_url.is_empty() {
            file.nats_url.unwrap_or_default()
        } else {
            cli.nats_url
        };
        if !urls.is_empty() {
            let name = match cli.node_name.or(file.node_name) {
                Some(n) => n,
                None => format!("{}-{}", host_name(), c.listen.port()),
            };
            if name.is_empty() || name.len() > 255 {
                return Err(format!(
                    "--node-name must be 1 to 255 bytes, not {:?}",
                    name
                ));
            }
            let node = NodeConfig {
                nats_urls: urls,
                name,
                heartbeat: Duration::from_millis(
                    cli.node_heartbeat_ms
                        .or(file.node_heartbeat_ms)
                        .unwrap_or(500),
                ),
                timeout: Duration::from_millis(
                    cli.node_timeout_ms.or(file.node_timeout_ms).unwrap_or(3000),
                ),
                isolation_grace: Duration::from_millis(
                    cli.isolation_grace_ms
                        .or(file.isolation_grace_ms)
                        .unwrap_or(10_000),
                ),
                // Set from the node's own leave grace below.
                leave_grace: Duration::ZERO,
                prefix: cli
                    .nats_prefix
                    .or(file.nats_prefix)
                    .unwrap_or_else(|| "roster".into()),
                creds: cli.nats_creds.or(file.nats_creds),
            };
            crate::cluster::subject::Subjects::new(&node.prefix).map_err(|e| e.0)?;
            if node.heartbeat.is_zero() || node.timeout < node.heartbeat * 2 {
                return Err(format!(
                    "--node-timeout-ms ({}) must be at least twice --node-heartbeat-ms ({}), \
                     which must not be 0",
                    node.timeout.as_millis(),
                    node.heartbeat.as_millis()
                ));
            }
            c.cluster = Some(node);
        }
        if c.shards == 0 || c.shards > 1024 {
            return Err(format!("shards must be 1..=1024, not {}", c.shards));
        }
        if c.ring_capacity == 0 {
            return Err("ring_capacity must be at least 1".into());
        }
        if c.admin_max_conns == 0 {
            return Err("admin_max_conns must be at least 1".into());
        }
        if c.max_request_bytes < 1024 {
            return Err("max_request_bytes must be at least 1024".into());
        }
        if c.max_frame_bytes < 1024 {
            return Err("max_frame_bytes must be at least 1024".into());
        }
        let leave_grace = c.leave_grace;
        if let Some(node) = c.cluster.as_mut() {
            node.leave_grace = leave_grace;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file keeps a single node's presence across a restart; a cluster node is refused
    /// one rather than given half of the feature (its peers would see the stop's leaves).
    #[test]
    fn a_state_file_and_the_leave_grace_reach_a_cluster_node() {
        let cli = |nats: bool| Cli {
            state_file: Some("/tmp/roster-state".into()),
            leave_grace_ms: Some(7_000),
            nats_url: if nats {
                vec!["nats://127.0.0.1:4222".into()]
            } else {
                vec![]
            },
            ..Cli::default()
        };
        let single = ServerConfig::resolve(cli(false), 2).unwrap();
        assert_eq!(single.restart_grace, Duration::from_secs(30));
        let node = ServerConfig::resolve(cli(true), 2).unwrap();
        assert!(node.state_file.is_some());
        let leave_grace = node.cluster.map(|n| n.leave_grace);
        assert_eq!(leave_grace, Some(Duration::from_secs(7)));
    }

    /// `--help` states each default in words; the values come from `resolve` (and, for the
    /// core's limits, from `core::Config::DEFAULT`). They must say the same.
    #[test]
    fn help_states_the_defaults_resolve_gives() {
        use clap::CommandFactory;
        let c = ServerConfig::resolve(Cli::default(), 8).unwrap();
        assert!(c.cluster.is_none(), "a single node unless --nats-url");
        let cli = Cli {
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            ..Cli::default()
        };
        let node = ServerConfig::resolve(cli, 8).unwrap().cluster.unwrap();
        assert_eq!(node.prefix, "roster");
        let cli = Cli {
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            ..Cli::default()
        };
        let events = ServerConfig::resolve(cli, 8).unwrap().events;
        let hook = events.webhook.clone().unwrap();
        let ms = |d: Duration| d.as_millis().to_string();
        let want: Vec<(&str, String)> = vec![
            ("listen", c.listen.to_string()),
            ("backlog", c.backlog.to_string()),
            ("heartbeat_timeout_ms", ms(c.heartbeat_timeout)),
            ("max_topics_per_conn", c.max_topics_per_conn.to_string()),
            ("max_meta_bytes", c.max_meta_bytes.to_string()),
            ("max_topic_bytes", c.max_topic_bytes.to_string()),
            ("max_ref_bytes", c.max_ref_bytes.to_string()),
            ("max_frame_bytes", c.max_frame_bytes.to_string()),
            ("max_outbound_bytes", c.max_outbound_bytes.to_string()),
            ("count_interval_ms", ms(c.count_interval)),
            ("slow_consumer_timeout_ms", ms(c.slow_consumer_timeout)),
            ("max_watch", c.max_watch.to_string()),
            ("diff_window_ms", ms(c.diff_window)),
            ("large_topic_threshold", c.large_topic_threshold.to_string()),
            ("leave_grace_ms", ms(c.leave_grace)),
            ("restart_grace_ms", ms(c.restart_grace)),
            ("ring_capacity", c.ring_capacity.to_string()),
            ("max_msgs_per_sec", c.max_msgs_per_sec.to_string()),
            ("max_connections", c.max_connections.to_string()),
            ("max_conns_per_ip", c.max_conns_per_ip.to_string()),
            ("max_handshakes", c.max_handshakes.to_string()),
            ("max_handshakes_per_ip", c.max_handshakes_per_ip.to_string()),
            ("handshake_timeout_ms", ms(c.handshake_timeout)),
            ("max_request_bytes", c.max_request_bytes.to_string()),
            ("message_timeout_ms", ms(c.message_timeout)),
            ("admin_listen", c.admin_listen.to_string()),
            ("admin_max_conns", c.admin_max_conns.to_string()),
            ("admin_timeout_ms", ms(c.admin_timeout)),
            ("node_heartbeat_ms", ms(node.heartbeat)),
            ("node_timeout_ms", ms(node.timeout)),
            ("isolation_grace_ms", ms(node.isolation_grace)),
            ("webhook_batch", hook.batch.to_string()),
            ("webhook_batch_ms", ms(hook.batch_wait)),
            ("webhook_timeout_ms", ms(hook.timeout)),
            ("event_queue", events.queue.to_string()),
        ];
        let cmd = Cli::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(stated) = help.split("[default: ").nth(1) else {
                continue;
            };
            let stated: String = stated
                .chars()
                .take_while(|ch| !matches!(ch, ']' | ';' | ','))
                .collect();
            match want.iter().find(|(name, _)| *name == id) {
                Some((_, value)) => {
                    assert_eq!(&stated, value, "--help of {id}");
                    checked += 1;
                }
                // Defaults in words ("the CPUs this process may use", "none") are not numbers.
                None => assert!(
                    !stated.starts_with(|ch: char| ch.is_ascii_digit()),
                    "{id} states default {stated}: add it to this test"
                ),
            }
        }
        assert_eq!(checked, want.len(), "every option above states its default");
    }

    #[test]
    fn flags_override_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("roster-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("roster.toml");
        std::fs::write(&path, "max_meta_bytes = 99\nshards = 3\n").unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            shards: Some(2),
            ..Cli::default()
        };
        let c = ServerConfig::resolve(cli, 8).unwrap();
        assert_eq!(
            (c.shards, c.max_meta_bytes, c.max_topics_per_conn),
            (2, 99, 100)
        );
        assert_eq!(c.listen.to_string(), "127.0.0.1:4000");
        std::fs::write(&path, "no_such_option = 1\n").unwrap();
        let cli = Cli {
            config: Some(path),
            ..Cli::default()
        };
        assert!(ServerConfig::resolve(cli, 8)
            .unwrap_err()
            .contains("no_such_option"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
