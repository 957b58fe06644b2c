//! Core microbenchmark: the shard state machine alone, no sockets. All shards run in this one
//! thread, so every figure is work per core: with 2 shards, the cross-shard messages and both
//! shards' handling of them are included in the time.
//!
//! `core-bench` runs everything; `core-bench --quick` runs small sizes (a smoke run).

use std::collections::VecDeque;
use std::time::Instant;

use hdrhistogram::Histogram;
use roster_bench::alloc::{live_allocs, live_bytes, rss_bytes, Counting};
use roster_bench::report::{median, percentiles};
use roster_engine::core::{
    Config, ConnAddr, ConnId, JoinMsg, MeshMsg, Meta, Millis, Output, Shard, TopicName, Track,
    UserKey,
};
use roster_engine::mesh::{Router, ShardId};
use roster_proto::{ClientMeta, PhxRef, PresenceMode};

#[global_allocator]
static ALLOC: Counting = Counting;

const META: &str = r#"{"page":"/room/123","status":"online"}"#;
const ROUNDS: usize = 5;

/// Shards in one thread, with a FIFO inbox per shard standing in for the rings.
struct Cluster {
    shards: Vec<Shard>,
    inbox: Vec<VecDeque<MeshMsg>>,
    frames: u64,
    /// Presence events the shards reported (with `--events`).
    events: u64,
}

impl Cluster {
    fn new(n: u16) -> Self {
        let config = Config {
            shards: n,
            // No clock here: every flush is a diff, as without coalescing (what these figures
            // measure is the work per diff).
            diff_window: Millis(0),
            ..Config::default()
        };
        Cluster {
            shards: (0..n)
                .map(|i| Shard::new(ShardId(i), config.clone()))
                .collect(),
            inbox: (0..n).map(|_| VecDeque::new()).collect(),
            frames: 0,
            events: 0,
        }
    }

    fn n(&self) -> usize {
        self.shards.len()
    }

    /// Runs until no message is in flight and every shard has flushed.
    fn pump(&mut self) {
        self.pump_with(|_| {});
    }

    /// `pump`, showing every frame sent to a connection to `on_send`.
    fn pump_with(&mut self, mut on_send: impl FnMut(&[u8])) {
        loop {
            for s in 0..self.n() {
                self.shards[s].flush();
                for o in self.shards[s].outputs() {
                    match o {
                        Output::Mesh { to, msg } => self.inbox[to.index()].push_back(msg),
                        Output::Send { frame, .. } => {
                            self.frames += 1;
                            on_send(&frame);
                        }
                        Output::Close { .. } => panic!("benchmark sent a bad frame"),
                        Output::Nats(_) => panic!("a single node publishes nothing"),
                        Output::Event(_) => self.events += 1,
                        Output::Refresh { .. } => panic!("no tokens in the benchmark"),
                    }
                }
            }
            if self.inbox.iter().all(VecDeque::is_empty) {
                return;
            }
            for s in 0..self.n() {
                while let Some(msg) = self.inbox[s].pop_front() {
                    self.shards[s].mesh(msg);
                }
            }
        }
    }

    /// Connection `i` lives on shard `i % n`.
    fn conn(&self, i: usize) -> (usize, ConnId) {
        (i % self.n(), ConnId((i / self.n()) as u32))
    }

    fn open(&mut self, count: usize) {
        for i in 0..count {
            let (s, c) = self.conn(i);
            self.shards[s].open(c, UserKey::new(&format!("user-{i}")));
        }
        self.pump();
    }

    fn frame(&mut self, i: usize, bytes: &[u8]) {
        let (s, c) = self.conn(i);
        self.shards[s].frame(c, bytes);
    }
}

fn join_frame(topic: &str, mode: &str) -> Vec<u8> {
    format!(r#"["1","1","{topic}","phx_join",{{"meta":{META},"presence":"{mode}"}}]"#).into_bytes()
}

fn leave_frame(topic: &str) -> Vec<u8> {
    format!(r#"["1","2","{topic}","phx_leave",{{}}]"#).into_bytes()
}

/// Through the whole shard: decode join frame, track, reply, user registry, leave, untrack.
/// Returns (pairs per second, per-pair latency histogram in ns, from batches of 64).
fn track_untrack_frames(
    shards: u16,
    conns: usize,
    topics: usize,
    pairs: usize,
) -> (f64, Histogram<u64>) {
    let mut cl = Cluster::new(shards);
    cl.open(conns);
    let joins: Vec<Vec<u8>> = (0..topics)
        .map(|t| join_frame(&format!("room:{t}"), "none"))
        .collect();
    let leaves: Vec<Vec<u8>> = (0..topics)
        .map(|t| leave_frame(&format!("room:{t}")))
        .collect();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    const BATCH: usize = 64;
    let start = Instant::now();
    let mut done = 0;
    while done < pairs {
        let t0 = Instant::now();
        for b in 0..BATCH {
            let i = (done + b) % conns;
            cl.frame(i, &joins[(done + b) % topics]);
        }
        cl.pump();
        for b in 0..BATCH {
            let i = (done + b) % conns;
            cl.frame(i, &leaves[(done + b) % topics]);
        }
        cl.pump();
        hist.record((t0.elapsed().as_nanos() / BATCH as u128) as u64)
            .ok();
        done += BATCH;
    }
    (done as f64 / start.elapsed().as_secs_f64(), hist)
}

/// The owner's table alone, as Phoenix.Tracker's track/untrack: Join and Leave messages straight
/// into the owning shards (plus the user registry updates they cause), no frames.
fn track_untrack_owner(shards: u16, topics: usize, pairs: usize) -> f64 {
    let mut cl = Cluster::new(shards);
    let router = Router::new(shards);
    let names: Vec<TopicName> = (0..topics)
        .map(|t| TopicName::new(&format!("room:{t}")))
        .collect();
    let keys: Vec<UserKey> = (0..1000)
        .map(|k| UserKey::new(&format!("user-{k}")))
        .collect();
    let client_meta = ClientMeta::from_json(META).expect("meta");
    let mut meta_buf = Vec::new();
    const BATCH: usize = 64;
    let start = Instant::now();
    let mut done = 0u64;
    while (done as usize) < pairs {
        for step in [true, false] {
            for b in 0..BATCH as u64 {
                let i = done + b;
                let topic = names[i as usize % topics].clone();
                let owner = router.topic_owner(topic.as_str());
                let key = keys[i as usize % keys.len()].clone();
                // Replies go to a shard with no such connection and are dropped there.
                let from = ConnAddr {
                    shard: ShardId(0),
                    conn: ConnId(u32::MAX),
                };
                let msg = if step {
                    // The connection's shard encodes the stored meta with its ref; so do we.
                    meta_buf.clear();
                    client_meta.encode(&mut meta_buf, None, PhxRef(i), None);
                    let meta = Meta::new(&meta_buf);
                    let track = Some(Track {
                        key,
                        phx_ref: PhxRef(i),
                        meta,
                    });
                    MeshMsg::Join(Box::new(JoinMsg {
                        topic,
                        from,
                        seq: 0,
                        mode: PresenceMode::None,
                        track,
                        resync: false,
                    }))
                } else {
                    MeshMsg::Leave {
                        topic,
                        from,
                        mode: PresenceMode::None,
                        tracked: Some((key, PhxRef(i))),
                        why: roster_engine::core::event::Reason::Left,
                    }
                };
                cl.shards[owner.index()].mesh(msg);
            }
            cl.pump();
        }
        done += BATCH as u64;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// `members` connections join one topic (tracked, no events), then all leave.
fn big_topic(shards: u16, members: usize) -> (f64, f64) {
    let mut cl = Cluster::new(shards);
    cl.open(members);
    let join = join_frame("room:big", "none");
    let leave = leave_frame("room:big");
    let joins = everyone_sends(&mut cl, members, &join);
    (joins, everyone_sends(&mut cl, members, &leave))
}

/// A topic of `members` tracked members; then one more connection joins in full mode. Returns
/// the milliseconds from its join to its presence_state (the owner encodes the state once; the
/// subscriber's shard frames it) and the state's size in bytes.
fn big_state(shards: u16, members: usize) -> (f64, usize) {
    let mut cl = Cluster::new(shards);
    cl.open(members + 1);
    let join = join_frame("room:big", "none");
    everyone_sends(&mut cl, members, &join);
    let (s, c) = cl.conn(members);
    let t0 = Instant::now();
    cl.shards[s].frame(c, &join_frame("room:big", "full"));
    let mut state = 0;
    cl.pump_with(|frame| state = state.max(frame.len()));
    (t0.elapsed().as_secs_f64() * 1e3, state)
}

/// Connections 0..n each send `frame`, pumped every 64; returns frames per second.
fn everyone_sends(cl: &mut Cluster, n: usize, frame: &[u8]) -> f64 {
    let t0 = Instant::now();
    for i in 0..n {
        cl.frame(i, frame);
        if i % 64 == 63 {
            cl.pump();
        }
    }
    cl.pump();
    n as f64 / t0.elapsed().as_secs_f64()
}

/// A topic with `members` tracked members and `subs` full subscribers; members update their meta
/// one at a time, each update flushed as its own diff. Returns (diffs per second, frames
/// delivered per second).
fn diffs(shards: u16, members: usize, subs: usize, updates: usize) -> (f64, f64) {
    let mut cl = Cluster::new(shards);
    cl.open(members + subs);
    let join = join_frame("room:d", "none");
    for i in 0..members {
        cl.frame(i, &join);
    }
    let watch = br#"["1","1","room:d","phx_join",{"track":false}]"#;
    for i in members..members + subs {
        cl.frame(i, watch);
    }
    cl.pump();
    let updates_frames: Vec<Vec<u8>> = (0..8)
        .map(|v| format!(r#"["1","3","room:d","presence_update",{{"meta":{{"page":"/p/{v}","status":"online"}}}}]"#).into_bytes())
        .collect();
    let frames_before = cl.frames;
    let t0 = Instant::now();
    for u in 0..updates {
        cl.frame(u % members, &updates_frames[u % 8]);
        cl.pump();
    }
    let secs = t0.elapsed().as_secs_f64();
    (
        updates as f64 / secs,
        (cl.frames - frames_before) as f64 / secs,
    )
}

/// Heap held per presence in the owners' tables alone (topic table, user table, stored meta):
/// `n` presences tracked through Join messages, as `track_untrack_owner` does. Returns bytes per
/// presence.
fn memory_tables(shards: u16, n: usize) -> f64 {
    // User keys belong to connections (one per user, however many presences): made beforehand.
    let keys: Vec<UserKey> = (0..n).map(|i| UserKey::new(&format!("user-{i}"))).collect();
    let before = live_bytes();
    let mut cl = Cluster::new(shards);
    let router = Router::new(shards);
    let from = ConnAddr {
        shard: ShardId(0),
        conn: ConnId(u32::MAX),
    };
    let mut stored = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let topic = TopicName::new(&format!("room:{}", i / 100));
        let owner = router.topic_owner(topic.as_str());
        stored.clear();
        ClientMeta::from_json(META).expect("meta").encode(
            &mut stored,
            None,
            PhxRef(i as u64),
            None,
        );
        let track = Some(Track {
            key: key.clone(),
            phx_ref: PhxRef(i as u64),
            meta: Meta::new(&stored),
        });
        cl.shards[owner.index()].mesh(MeshMsg::Join(Box::new(JoinMsg {
            topic,
            from,
            seq: 0,
            mode: PresenceMode::None,
            track,
            resync: false,
        })));
        if i % 1024 == 1023 {
            cl.pump();
        }
    }
    cl.pump();
    (live_bytes() - before) as f64 / n as f64
}

/// Heap held per presence: `n` connections, each tracked in one topic of 100 members.
fn memory(shards: u16, n: usize) {
    let base = live_bytes();
    let base_allocs = live_allocs();
    let base_rss = rss_bytes();
    let mut cl = Cluster::new(shards);
    cl.open(n);
    let opened = live_bytes();
    let joins: Vec<Vec<u8>> = (0..n / 100)
        .map(|t| join_frame(&format!("room:{t}"), "none"))
        .collect();
    let after_setup = live_bytes();
    let setup_allocs = live_allocs();
    for i in 0..n {
        cl.frame(i, &joins[i / 100]);
        if i % 1024 == 1023 {
            cl.pump();
        }
    }
    cl.pump();
    let tracked = live_bytes();
    let presences: usize = cl.shards.iter().map(|s| s.stats().presences_owned).sum();
    assert_eq!(presences, n, "every join tracked");
    let per_conn = (opened - base) as f64 / n as f64;
    let per_presence = (tracked - after_setup) as f64 / n as f64;
    let allocs_per_presence = (live_allocs() - setup_allocs) as f64 / n as f64;
    let mut stored = Vec::new();
    ClientMeta::from_json(META)
        .expect("meta")
        .encode(&mut stored, None, PhxRef(1), None);
    drop(cl);
    let rss = rss_bytes().saturating_sub(base_rss) as f64 / (1 << 20) as f64;
    let tables = memory_tables(shards, n);
    println!(
        "  {shards} shard(s), {n:>8} presences: with connections {per_presence:6.1} B/presence \
         ({:.1} beyond meta), {allocs_per_presence:.1} allocs/presence, idle connection {per_conn:.1} B, RSS +{rss:.0} MiB; \
         tables alone {tables:6.1} B/presence ({:.1} beyond meta)",
        per_presence - META.len() as f64,
        tables - META.len() as f64,
    );
    let _ = (base_allocs, stored);
}

fn rounds<T>(f: impl Fn() -> T, pick: impl Fn(&T) -> f64) -> (f64, f64, f64, T) {
    let mut xs = Vec::new();
    let mut last = None;
    for _ in 0..ROUNDS {
        let r = f();
        xs.push(pick(&r));
        last = Some(r);
    }
    let (m, lo, hi) = median(xs);
    (m, lo, hi, last.expect("rounds > 0"))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    println!("roster core-bench: shard state machine only, all shards on this one thread");
    println!("medians of {ROUNDS} rounds (min..max); meta {META}\n");

    println!("track+untrack pairs through client frames (decode, track, reply, leave; 10k conns, 1k topics):");
    for shards in [1u16, 2] {
        let (m, lo, hi, (_, hist)) = rounds(
            || track_untrack_frames(shards, 10_000, 1_000, 400_000 / scale),
            |r| r.0,
        );
        println!(
            "  {shards} shard(s): {:.0} pairs/s = {:.0} ops/s ({:.0}..{:.0} pairs/s); ns per pair {}",
            m,
            2.0 * m,
            lo,
            hi,
            percentiles(&hist)
        );
    }

    println!("\ntrack+untrack pairs at the owner (Join/Leave messages, as Phoenix.Tracker track/untrack):");
    for shards in [1u16, 2] {
        let (m, lo, hi, _) = rounds(
            || track_untrack_owner(shards, 1_000, 1_000_000 / scale),
            |r| *r,
        );
        println!(
            "  {shards} shard(s): {:.0} pairs/s = {:.0} ops/s ({lo:.0}..{hi:.0} pairs/s)",
            m,
            2.0 * m
        );
    }

    println!("\none topic of 100k members: joins (track) then leaves, through client frames:");
    for shards in [1u16, 2] {
        let (m, lo, hi, r) = rounds(|| big_topic(shards, 100_000 / scale), |r| r.0);
        println!(
            "  {shards} shard(s): {m:.0} tracks/s ({lo:.0}..{hi:.0}); last round untracks {:.0}/s",
            r.1
        );
    }

    println!(
        "\nthe presence_state of a {}-member topic: one full-mode join until its state is framed:",
        100_000 / scale
    );
    for shards in [1u16, 2] {
        let (m, lo, hi, r) = rounds(|| big_state(shards, 100_000 / scale), |r| r.0);
        println!(
            "  {shards} shard(s): {m:.1} ms ({lo:.1}..{hi:.1}) for a state of {} bytes",
            r.1
        );
    }

    println!("\ndiffs: 1,000 members update one at a time, one diff each, 100 full subscribers:");
    for shards in [1u16, 2] {
        let (m, lo, hi, r) = rounds(|| diffs(shards, 1_000, 100, 100_000 / scale), |r| r.0);
        println!("  {shards} shard(s): {m:.0} diffs/s ({lo:.0}..{hi:.0}); last round {:.0} frames delivered/s", r.1);
    }

    let mut stored = Vec::new();
    ClientMeta::from_json(META)
        .expect("meta")
        .encode(&mut stored, None, PhxRef(1), None);
    println!(
        "\nmemory (heap bytes requested, from a counting allocator; malloc overhead not included). \
         Client meta {} B, stored with its phx_ref {} B; 100 presences per topic:",
        META.len(),
        stored.len()
    );
    for (shards, n) in [
        (1u16, 100_000),
        (2, 100_000),
        (1, 1_000_000),
        (2, 1_000_000),
    ] {
        memory(shards, n / scale);
    }
}
