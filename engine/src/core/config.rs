use crate::cluster::frame::Origin;
use crate::cluster::subject::Subjects;
use crate::core::Millis;

/// A node of a cluster (see `cluster/`): who it is and where its frames go.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub me: Origin,
    pub subjects: Subjects,
    /// NATS's max_payload: no frame may be larger.
    pub max_payload: usize,
    /// How long a first fetch of a topic's parts waits for answers (its joiners wait as long at
    /// most): a subscriber that forgot the topic meanwhile never answers.
    pub fetch_timeout: Millis,
}

/// What a shard needs to know. Limits have PROTOCOL.md's defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of shards in the process; every shard must be given the same value.
    pub shards: u16,
    /// Topics one connection may have joined at once.
    pub max_topics_per_conn: usize,
    /// Size of a client's meta object as sent.
    pub max_meta_bytes: usize,
    /// Longest topic name; longer ones get an error reply. Every table and frame repeats it.
    pub max_topic_bytes: usize,
    /// Longest `join_ref` or `ref`; longer ones close the connection (1007). Kept per join.
    pub max_ref_bytes: usize,
    /// Least time between two `presence_count` pushes for one topic.
    pub count_interval: Millis,
    /// Users one connection may watch, over all its `watch:` topics.
    pub max_watch: usize,
    /// Coalescing window of a large topic: its changes go out at most once per window, and
    /// its joiners within a window share one state. 0 turns coalescing off.
    pub diff_window: Millis,
    /// Members (tracked presences or full-mode subscribers, whichever is more) from which a
    /// topic is large.
    pub large_topic_threshold: u32,
    /// How long a closed connection's presences stay, for the same key to take them over.
    pub leave_grace: Millis,
    /// A connection that sends no text message for this long is closed (1000 "heartbeat
    /// timeout"); phoenix.js sends a heartbeat every 30 s.
    pub heartbeat_timeout: Millis,
    /// A message whose first bytes came must be complete within this (else 1008).
    pub message_timeout: Millis,
    /// Messages (text, ping or pong) a connection may send per second, as a bucket holding one
    /// second's worth; past it the connection is closed (1008). 0 = no limit.
    pub max_msgs_per_sec: u32,
    /// A connection resyncing as a slow consumer that has not drained this long after it lost
    /// its diffs is closed (1008).
    pub slow_consumer_timeout: Millis,
    /// Mixed into every `phx_ref` this process makes, so refs from two runs of the server differ
    /// (a client that reconnects after a restart must not confuse old and new presences). The
    /// driver picks it at random; tests fix it.
    pub ref_seed: u64,
    /// Seeds every hash table of the core. The driver picks it at random (clients choose the
    /// keys); the simulation fixes it, so that a seed replays exactly.
    pub hash_seed: u64,
    /// None on a single node.
    pub cluster: Option<ClusterConfig>,
    /// Report presence events (`core::event`) as outputs: a backend listens.
    pub events: bool,
}

impl Config {
    /// PROTOCOL.md's defaults: the one place they are written (the server's options take theirs
    /// from here).
    pub const DEFAULT: Config = Config {
        shards: 1,
        max_topics_per_conn: 100,
        max_meta_bytes: 1024,
        max_topic_bytes: 255,
        max_ref_bytes: 64,
        count_interval: Millis(1000),
        max_watch: 1000,
        diff_window: Millis(50),
        large_topic_threshold: 1000,
        leave_grace: Millis(0),
        heartbeat_timeout: Millis(60_000),
        message_timeout: Millis(10_000),
        max_msgs_per_sec: 200,
        slow_consumer_timeout: Millis(30_000),
        ref_seed: 0,
        hash_seed: 0,
        cluster: None,
        events: false,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}
