//! What the shards publish for the admin listener: figures (gauges and counters), counts by
//! reason, latency histograms, and an inbox for API queries. Shards write here once a second
//! and read the inbox on each tick; the admin thread only reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::core::{Latency, Meta, ShardStats, TopicName};

/// What a shard answers for the API.
pub enum Query {
    Topic(TopicName, mpsc::Sender<Shown>),
    User(String, mpsc::Sender<Shown>),
    /// An action of the admin API on a single node (a cluster's go through NATS).
    Command(crate::cluster::frame::Command),
}

/// A shard's answer: a topic's presences as (user key, meta) or a user's as (topic, meta),
/// sorted by the first, metas in the order they were tracked.
pub struct Shown {
    pub presences: Vec<(String, Meta)>,
    /// Nothing to look up on other nodes (see `Shard::topic_is_whole`).
    pub whole: bool,
}

/// One shard's published figures (gauges and counters since start).
#[derive(Default)]
pub struct ShardBoard {
    figures: [AtomicU64; FIGURES.len()],
    /// Counts by reason: (metric, reason, count).
    pub(super) reasons: Mutex<Vec<(&'static str, &'static str, u64)>>,
    pub(super) inbox: Mutex<Vec<Query>>,
    pub(super) latencies: Mutex<[Latency; LATENCIES.len()]>,
}

/// Latency histograms a shard publishes: (metric name, help).
pub const LATENCIES: [(&str, &str); 2] = [
    (
        "roster_join_seconds",
        "From a phx_join reaching the shard to its reply being queued (owner round trip included)",
    ),
    (
        "roster_delivery_seconds",
        "From a frame (diff, state, reply) being queued for a connection to the connection writing it out, per write",
    ),
];

/// Index of a histogram in [`LATENCIES`].
#[derive(Clone, Copy)]
pub enum LatencyOf {
    Join,
    Delivery,
}

/// Metrics counted by reason.
pub const ERRORS: &str = "errors";
pub const REFUSALS: &str = "handshake_refusals";
pub(super) const REASON_HELP: [(&str, &str); 2] = [
    (
        ERRORS,
        "Error replies and closes sent to clients, by reason",
    ),
    (REFUSALS, "Upgrade requests refused, by reason"),
];

/// Every figure a shard publishes: (metric name, help, is a counter).
pub const FIGURES: [(&str, &str, bool); 17] = [
    ("roster_connections", "Open client connections", false),
    (
        "roster_topics",
        "Topics owned (with presences or subscribers)",
        false,
    ),
    (
        "roster_presences",
        "Presences tracked in owned topics",
        false,
    ),
    (
        "roster_cluster_remote_presences",
        "Presences of other nodes held for this node's clients (in owned topics)",
        false,
    ),
    ("roster_users", "User keys owned with a presence", false),
    (
        "roster_watched_users",
        "Users with a watch replica on this shard",
        false,
    ),
    (
        "roster_ring_backlog",
        "Messages waiting for the rings to other shards",
        false,
    ),
    ("roster_accepted", "Connections accepted", true),
    (
        "roster_handshake_failures",
        "Upgrade requests refused or abandoned",
        true,
    ),
    (
        "roster_accept_errors",
        "accept() failures (out of descriptors)",
        true,
    ),
    ("roster_messages_in", "Client text messages received", true),
    ("roster_frames_out", "Frames queued to clients", true),
    (
        "roster_diffs",
        "Presence diffs encoded (one per topic flush)",
        true,
    ),
    (
        "roster_diffs_coalesced",
        "Flushes held back by a coalescing window",
        true,
    ),
    (
        "roster_resyncs",
        "Slow consumers whose diffs were dropped for a fresh state",
        true,
    ),
    (
        "roster_slow_closes",
        "Slow consumers closed for not reading (1008)",
        true,
    ),
    (
        "roster_heartbeat_closes",
        "Connections closed for sending nothing (1000)",
        true,
    ),
];

/// Index of a figure in [`FIGURES`].
#[derive(Clone, Copy)]
pub enum Figure {
    Connections,
    Topics,
    Presences,
    RemotePresences,
    Users,
    WatchedUsers,
    RingBacklog,
    Accepted,
    HandshakeFailures,
    AcceptErrors,
    MessagesIn,
    FramesOut,
    Diffs,
    DiffsCoalesced,
    Resyncs,
    SlowCloses,
    HeartbeatCloses,
}

impl ShardBoard {
    pub fn set(&self, f: Figure, v: u64) {
        self.figures[f as usize].store(v, Ordering::Relaxed);
    }

    pub(super) fn get(&self, i: usize) -> u64 {
        self.figures[i].load(Ordering::Relaxed)
    }

    /// The core's own figures.
    pub fn publish_core(&self, s: &ShardStats) {
        self.set(Figure::Connections, s.connections as u64);
        self.set(Figure::Topics, s.topics_owned as u64);
        self.set(Figure::Presences, s.presences_owned as u64);
        self.set(Figure::RemotePresences, s.remote_presences as u64);
        self.set(Figure::Users, s.users_owned as u64);
        self.set(Figure::WatchedUsers, s.watched_users as u64);
        self.set(Figure::Diffs, s.diffs_sent);
        self.set(Figure::DiffsCoalesced, s.diffs_coalesced);
    }

    pub fn set_latency(&self, of: LatencyOf, l: &Latency) {
        self.latencies.lock().unwrap_or_else(|e| e.into_inner())[of as usize] = *l;
    }

    /// Replaces this shard's counts by reason.
    pub fn publish_reasons(
        &self,
        counts: impl IntoIterator<Item = (&'static str, &'static str, u64)>,
    ) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        reasons.clear();
        reasons.extend(counts);
    }

    /// Queries waiting for this shard.
    pub fn take_queries(&self) -> Vec<Query> {
        std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Every shard's board, shared with the admin thread.
pub struct Board {
    pub shards: Vec<ShardBoard>,
    /// The node's cluster figures, once its NATS bridge runs.
    pub cluster: std::sync::OnceLock<Arc<crate::net::nats::ClusterStats>>,
    /// The event sinks' figures, when events are reported.
    pub events: std::sync::OnceLock<Arc<crate::net::events::EventStats>>,
}

impl Board {
    pub fn new(shards: usize) -> Arc<Board> {
        Arc::new(Board {
            shards: (0..shards).map(|_| ShardBoard::default()).collect(),
            cluster: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
        })
    }
}
