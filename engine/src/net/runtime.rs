//! One shard's runtime on its executor: feeds the core its inputs with the time, and carries
//! its outputs out to the connections' queues (`slot.rs`) and the outgoing ring batches. What it
//! reports is in `report.rs`. Everything here runs on one thread; `RefCell` borrows are never
//! held across an await.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use roster_proto::encode::FrameKind;
use slab::Slab;

use crate::config::ServerConfig;
use crate::core::outbound::Pushed;
use crate::core::{
    ClusterConfig, Config, ConnId, Latency, MeshMsg, Millis, NatsOut, Output, Refreshed, Shard,
};

/// A fresh token a connection sent: (conn, token, join_ref, ref).
type Refresh = (ConnId, Box<str>, Option<Box<str>>, Option<Box<str>>);
use crate::identity::{self, Identity, Verifier};
use crate::mesh::ShardId;
use crate::net::admin::Board;
use crate::net::admission::Admission;
use crate::net::events::{wall_ms, Events};
use crate::net::handshake::{Reject, Upgrade};
use crate::net::nats::{FromBridge, ToBridge};
pub use crate::net::report::Stats;
use crate::net::restart::Restart;
use crate::net::signal::Signal;
pub use crate::net::slot::{CloseReason, Slot};
use crate::state_file::HeldServerPresence;

pub struct Runtime {
    pub id: ShardId,
    pub config: ServerConfig,
    pub(super) core: RefCell<Shard>,
    pub conns: RefCell<Slab<Slot>>,
    /// Per peer shard: messages waiting for the ring, and the task that sends them.
    pub peer_queues: Vec<RefCell<Vec<MeshMsg>>>,
    pub peer_signals: Vec<Signal>,
    pub flush: Signal,
    pub(super) epoch: Instant,
    pub shutting_down: Cell<bool>,
    pub stop_accepting: Signal,
    pub drained: Signal,
    /// Receive buffer shared by every connection of the shard: bytes are handed to tungstenite
    /// before the next await, so one buffer serves all.
    pub scratch: RefCell<Vec<u8>>,
    /// Where a connection's queued frames are laid out for one write, shared the same way.
    pub write_scratch: RefCell<Vec<u8>>,
    /// Connections whose queued frames `write_listed` writes, and the signal that runs it.
    pub(super) to_write: RefCell<Vec<ConnId>>,
    pub write_signal: Signal,
    /// What sockets did not take of those writes, for their tasks to write first (rare: a
    /// socket with room for part of the frames).
    pub(super) partial_writes: RefCell<Vec<(ConnId, Vec<u8>)>>,
    pub stats: Stats,
    /// None in development mode.
    pub(super) verifier: Option<Verifier>,
    /// Origins and connection counts, shared by every shard.
    pub admission: Arc<Admission>,
    /// Where this shard publishes its figures and takes API queries.
    pub(super) board: Arc<Board>,
    /// When the figures last went on the board (ms).
    pub(super) published_ms: Cell<u64>,
    /// How long frames waited in connections' queues before their task wrote them.
    pub(super) delivery: RefCell<Latency>,
    /// The core's outputs while they are carried out (kept for its capacity).
    pub(super) outputs: RefCell<Vec<Output>>,
    /// When the tick task will next run (ms), and the signal that makes it look again.
    pub(super) wake_at: Cell<u64>,
    pub rewake: Signal,
    /// The way to the NATS bridge, in a cluster.
    pub nats: Option<NatsLink>,
    /// The previous run's presences, and where this run's go on a graceful stop.
    pub restart: Arc<Restart>,
    pub(super) events: Option<Events>,
}

/// A shard's side of the NATS bridge: what its core asked for waits here until its task hands
/// the batch over (never blocking the shard), and what the bridge sends comes in on `rx`.
pub struct NatsLink {
    pub tx: flume::Sender<ToBridge>,
    pub rx: flume::Receiver<FromBridge>,
    pub queue: RefCell<Vec<NatsOut>>,
    pub signal: Signal,
}

/// What a shard of a cluster node is given.
pub struct ShardCluster {
    pub config: ClusterConfig,
    pub tx: flume::Sender<ToBridge>,
    pub rx: flume::Receiver<FromBridge>,
}

/// What every shard's runtime shares with the others and the admin thread.
pub struct Shared {
    pub admission: Arc<Admission>,
    pub board: Arc<Board>,
    pub restart: Arc<Restart>,
    pub seeds: CoreSeeds,
    pub cluster: Option<ShardCluster>,
    /// Where presence events go, if anywhere.
    pub events: Option<Events>,
}

/// The random numbers every shard's core is given, the same for all shards of a process.
#[derive(Clone, Copy)]
pub struct CoreSeeds {
    pub refs: u64,
    pub hashing: u64,
}

/// How often a shard's figures go on the admin board.
const PUBLISH_EVERY_MS: u64 = 1000;
/// Messages waiting for full rings, across all peers, past which connections stop reading (and
/// so stop making more) until the rings drain. Backpressure instead of unbounded queues.
const MESH_BACKLOG_LIMIT: usize = 65_536;

impl Runtime {
    pub fn new(id: ShardId, config: ServerConfig, shared: Shared) -> Rc<Runtime> {
        let core = Shard::new(
            id,
            Config {
                shards: config.shards,
                max_topics_per_conn: config.max_topics_per_conn,
                max_meta_bytes: config.max_meta_bytes,
                max_topic_bytes: config.max_topic_bytes,
                max_ref_bytes: config.max_ref_bytes,
                count_interval: Millis(config.count_interval.as_millis() as u64),
                max_watch: config.max_watch,
                diff_window: Millis(config.diff_window.as_millis() as u64),
                large_topic_threshold: config.large_topic_threshold,
                leave_grace: Millis(config.leave_grace.as_millis() as u64),
                slow_consumer_timeout: Millis(config.slow_consumer_timeout.as_millis() as u64),
                heartbeat_timeout: Millis(config.heartbeat_timeout.as_millis() as u64),
                message_timeout: Millis(config.message_timeout.as_millis() as u64),
                max_msgs_per_sec: config.max_msgs_per_sec,
                ref_seed: shared.seeds.refs,
                hash_seed: shared.seeds.hashing,
                cluster: shared.cluster.as_ref().map(|c| c.config.clone()),
                events: shared.events.is_some(),
            },
        );
        let nats = shared.cluster.map(|c| NatsLink {
            tx: c.tx,
            rx: c.rx,
            queue: RefCell::new(Vec::new()),
            signal: Signal::default(),
        });
        let n = config.shards as usize;
        Rc::new(Runtime {
            id,
            core: RefCell::new(core),
            conns: RefCell::new(Slab::new()),
            peer_queues: (0..n).map(|_| RefCell::new(Vec::new())).collect(),
            peer_signals: (0..n).map(|_| Signal::default()).collect(),
            flush: Signal::default(),
            epoch: Instant::now(),
            shutting_down: Cell::new(false),
            stop_accepting: Signal::default(),
            drained: Signal::default(),
            scratch: RefCell::new(vec![0; 64 << 10]),
            write_scratch: RefCell::new(Vec::with_capacity(64 << 10)),
            to_write: RefCell::new(Vec::new()),
            write_signal: Signal::default(),
            partial_writes: RefCell::new(Vec::new()),
            stats: Stats::default(),
            verifier: config.secret.as_ref().map(|s| Verifier::new(&s.0)),
            admission: shared.admission,
            board: shared.board,
            published_ms: Cell::new(0),
            delivery: RefCell::new(Latency::default()),
            outputs: RefCell::new(Vec::new()),
            wake_at: Cell::new(0),
            rewake: Signal::default(),
            nats,
            restart: shared.restart,
            events: shared.events,
            config,
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The core, its clock set to now: deadlines the next input makes count from this moment.
    pub(super) fn core(&self) -> std::cell::RefMut<'_, Shard> {
        let mut core = self.core.borrow_mut();
        core.advance(self.now_us());
        core
    }

    /// A handshake completed: the connection on socket `fd` gets an id (and in the core, a
    /// heartbeat deadline).
    pub fn open(&self, identity: Identity, fd: i32) -> ConnId {
        let conn = ConnId(self.conns.borrow_mut().insert(Slot::new(fd)) as u32);
        let expires = identity.expires.map(|exp| self.deadline_of(exp));
        self.core()
            .open_with(conn, identity.key, identity.grants, expires);
        self.dispatch();
        conn
    }

    /// A token's `exp` (Unix seconds) on the core's clock.
    fn deadline_of(&self, exp: f64) -> Millis {
        let left = (exp * 1000.0) as u64;
        Millis(self.now_ms() + left.saturating_sub(wall_ms()))
    }

    /// The fresh tokens connections sent are verified, and the core told what they say.
    fn verify_refreshes(&self, refreshes: Vec<Refresh>) {
        let now = wall_ms() / 1000;
        for (conn, token, jr, r) in refreshes {
            let verdict: Refreshed = match &self.verifier {
                None => Err("no tokens here: the server runs without a secret"),
                Some(v) => match v.refresh(&token, now) {
                    Ok(id) => Ok((id.key, id.grants, id.expires.map(|e| self.deadline_of(e)))),
                    Err(reject) => Err(reject.reason),
                },
            };
            self.core()
                .refreshed(conn, verdict, jr.as_deref(), r.as_deref());
        }
        self.dispatch();
    }

    /// Who the upgrade request says the client is: a verified token, or in development mode
    /// its `user_id`.
    pub fn identify(&self, upgrade: &Upgrade) -> Result<Identity, Reject> {
        match &self.verifier {
            Some(v) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                v.identify(upgrade, now)
            }
            None => Ok(identity::unverified(upgrade)),
        }
    }

    /// A text message from a client.
    pub fn client_frame(&self, conn: ConnId, bytes: &[u8]) {
        self.stats.messages_in.set(self.stats.messages_in.get() + 1);
        self.core().frame(conn, bytes);
        self.dispatch();
        self.flush.notify();
    }

    /// A ping or pong from a client (counted against its message rate).
    pub fn control_frame(&self, conn: ConnId) {
        self.core().control_frame(conn);
        self.dispatch();
    }

    /// Whether a close of `conn` waits to go out (the core or the runtime decided it).
    pub fn close_pending(&self, conn: ConnId) -> bool {
        let conns = self.conns.borrow();
        conns
            .get(conn.0 as usize)
            .is_some_and(|s| s.close.is_some())
    }

    /// The connection's task is ending: its presences leave.
    pub fn closed(&self, conn: ConnId) {
        self.conns.borrow_mut().try_remove(conn.0 as usize);
        // Its id will be another connection's.
        self.partial_writes.borrow_mut().retain(|(c, _)| *c != conn);
        self.core().close(conn);
        self.dispatch();
        self.flush.notify();
        if self.shutting_down.get() && self.conns.borrow().is_empty() {
            self.drained.notify();
        }
    }

    /// The first bytes of a message from `conn` have come, not all of it.
    pub fn message_started(&self, conn: ConnId) {
        self.core().message_started(conn);
    }

    /// The message `conn` had begun is complete (or the connection holds none).
    pub fn message_done(&self, conn: ConnId) {
        self.core.borrow_mut().message_done(conn);
    }

    /// Whether a join of `conn` still waits for its owner's reply.
    pub fn awaiting_reply(&self, conn: ConnId) -> bool {
        self.core.borrow().awaiting_reply(conn)
    }

    /// The client is closing: the core forgets the connection (its presences leave) while its task
    /// finishes the close handshake.
    pub fn forget(&self, conn: ConnId) {
        self.core().close(conn);
        self.dispatch();
        self.flush.notify();
    }

    /// Takes back the previous run's presences of the topics this shard owns (before it
    /// accepts), held for the rest of the restart grace.
    pub fn restore_previous(&self) {
        let mut taken = 0usize;
        self.restart.with_previous(|state, until_unix_ms| {
            let left = until_unix_ms.saturating_sub(crate::net::restart::unix_ms());
            let until = Millis(self.now_ms() + left);
            let presences = state.each_presence();
            taken = self.core().restore(presences, until);
            // Their TTLs ran on while the node was down.
            let unix_now = crate::net::restart::unix_ms();
            let server = state.server.iter().map(|p| {
                let ttl = p.until_ms.map(|u| Millis(u.saturating_sub(unix_now)));
                (p.topic.as_str(), p.key.as_str(), p.meta.as_slice(), ttl)
            });
            taken += self.core().restore_server(server);
        });
        self.dispatch();
        self.flush.notify();
        tracing::debug!(shard = self.id.0, presences = taken, "presences taken back");
    }

    /// What this shard holds, for the state file, before any connection is closed.
    pub fn hand_over_state(&self) {
        let (conns, presences, server) = {
            let core = self.core.borrow();
            let conns = core
                .export_conns()
                .into_iter()
                .map(|(key, tracked)| {
                    let tracked = tracked
                        .into_iter()
                        .map(|(t, r)| (t.as_str().to_owned(), r.0))
                        .collect();
                    (key.as_str().to_owned(), tracked)
                })
                .collect();
            let presences = core
                .export_presences()
                .into_iter()
                .map(|(t, track)| {
                    let (key, meta) = (track.key.as_str().to_owned(), track.meta.bytes().to_vec());
                    (t.as_str().to_owned(), key, track.phx_ref.0, meta)
                })
                .collect();
            let unix_now = crate::net::restart::unix_ms();
            let server = core
                .export_server_presences()
                .into_iter()
                .map(|(t, track, ttl)| HeldServerPresence {
                    topic: t.as_str().to_owned(),
                    key: track.key.as_str().to_owned(),
                    meta: track.meta.bytes().to_vec(),
                    until_ms: ttl.map(|t| unix_now + t.0),
                })
                .collect();
            (conns, presences, server)
        };
        self.restart.hand_over(conns, presences, server);
    }

    /// Asks the connection's task to close with this code; the core forgets it now.
    pub fn close(&self, conn: ConnId, code: u16, reason: impl Into<Cow<'static, str>>) {
        if let Some(slot) = self.conns.borrow_mut().get_mut(conn.0 as usize) {
            if slot.close.is_none() {
                slot.close = Some(Box::new((code, reason.into())));
            }
            slot.wake();
        }
        self.core().close(conn);
        self.dispatch();
        self.flush.notify();
    }

    /// What the NATS bridge brought: frames about names this shard owns, and other nodes' news.
    pub fn nats_in(&self, batch: impl IntoIterator<Item = FromBridge>) {
        {
            let mut core = self.core();
            for m in batch {
                match m {
                    FromBridge::Frame(frame, reply) => core.nats_frame(frame, reply.as_deref()),
                    FromBridge::NoResponders(kind, name) => core.no_responders(kind, &name),
                    FromBridge::NodeUp(o) => core.node_up(o),
                    FromBridge::NodeBack(o) => core.node_back(o),
                    FromBridge::NodeDown(o) => core.node_down(o),
                    FromBridge::NodeHeld(o) => core.node_held(o),
                    FromBridge::NodeGap(o) => core.node_gap(o),
                    FromBridge::NameGap(o, kind, name) => core.name_gap(kind, &name, o),
                    FromBridge::Announce => core.announce(),
                    FromBridge::Command(c) => core.command(c),
                }
            }
        }
        self.dispatch();
        self.flush.notify();
    }

    pub fn mesh_in(&self, batch: Vec<MeshMsg>) {
        {
            let mut core = self.core();
            for msg in batch {
                core.mesh(msg);
            }
        }
        self.dispatch();
        self.flush.notify();
    }

    /// End of a batch: every topic's pending changes go out as one diff each. If the batch made
    /// a deadline earlier than the tick task's next wake, the tick task is told.
    pub fn flush_core(&self) {
        let due = {
            let mut core = self.core();
            core.flush();
            core.poll_timeout()
        };
        self.dispatch();
        if due.is_some_and(|d| d.0 < self.wake_at.get()) {
            self.rewake.notify();
        }
    }

    /// When the tick task should next run (ms): the core's next deadline, and at least every
    /// `max_sleep_ms` for what the driver does itself (the admin board's figures and queries). Recorded, so that a batch making an earlier deadline can wake the task.
    pub fn next_wake(&self, now: u64, max_sleep_ms: u64) -> u64 {
        let core_due = self.core().poll_timeout().map_or(u64::MAX, |m| m.0);
        let at = core_due.min(now + max_sleep_ms);
        self.wake_at.set(at);
        at
    }

    /// Periodic work: the core's deadlines (windows, graces, counts, heartbeats, slow
    /// consumers) and the admin board.
    pub fn tick(&self) {
        let now = self.now_ms();
        self.core().tick(Millis(now));
        self.answer_queries();
        if now.saturating_sub(self.published_ms.get()) >= PUBLISH_EVERY_MS {
            // Once a second: the core's figures walk its topic table.
            self.published_ms.set(now);
            self.publish();
        }
        self.dispatch();
    }

    /// Stop accepting and ask every connection to close with 1001.
    pub fn shut_down(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        self.stop_accepting.notify();
        self.core.borrow_mut().shut_down();
        let ids: Vec<usize> = self.conns.borrow().iter().map(|(i, _)| i).collect();
        for i in ids {
            self.close(ConnId(i as u32), 1001, "server shutting down");
        }
        if self.conns.borrow().is_empty() {
            self.drained.notify();
        }
    }

    /// Carries out what the core asked for. The outputs are moved out of the core first, so
    /// that a queue overflowing midway can start the connection's resync at once: the diffs
    /// after it in the same batch are then dropped like every later one.
    pub(super) fn dispatch(&self) {
        let mut outputs = std::mem::take(&mut *self.outputs.borrow_mut());
        // Read once, and only if a frame is queued (an event: the wall clock).
        let mut now_us = None;
        let mut wall = None;
        let mut refreshes = Vec::new();
        {
            let mut core = self.core.borrow_mut();
            core.take_outputs(&mut outputs);
            let mut conns = self.conns.borrow_mut();
            for o in outputs.drain(..) {
                match o {
                    Output::Send { conn, frame, kind } => {
                        let Some(slot) = conns.get_mut(conn.0 as usize) else {
                            continue;
                        };
                        if slot.close.is_some() {
                            continue;
                        }
                        if kind == FrameKind::Diff && core.is_resyncing(conn) {
                            continue; // It gets a fresh state when it drains.
                        }
                        let pushed = slot.out.push(frame, kind, self.config.max_outbound_bytes);
                        let queued = match pushed {
                            Pushed::Queued => true,
                            Pushed::Overflowed { queued } => {
                                // Its task says when it has drained (then it gets fresh
                                // states), whoever writes what is left.
                                slot.wake();
                                if core.resync(conn) {
                                    let n = self.stats.slow_resyncs.get();
                                    self.stats.slow_resyncs.set(n + 1);
                                }
                                queued
                            }
                        };
                        if !queued {
                            continue;
                        }
                        if slot.out.frames().len() == 1 {
                            slot.queued_us = *now_us.get_or_insert_with(|| self.now_us()) as u32;
                        }
                        self.stats.frames_out.set(self.stats.frames_out.get() + 1);
                        if slot.direct_fd < 0 {
                            slot.wake();
                        } else if slot.out.frames().len() == 1 {
                            // Written by `write_listed`, not by waking the task.
                            let mut list = self.to_write.borrow_mut();
                            list.push(conn);
                            if list.len() == 1 {
                                self.write_signal.notify();
                            }
                        }
                    }
                    Output::Close { conn, code, reason } => {
                        if let Some(slot) = conns.get_mut(conn.0 as usize) {
                            slot.close.get_or_insert_with(|| Box::new((code.0, reason)));
                            slot.wake();
                        }
                    }
                    Output::Nats(out) => {
                        // Only a cluster's core makes these.
                        if let Some(link) = &self.nats {
                            let mut q = link.queue.borrow_mut();
                            q.push(out);
                            if q.len() == 1 {
                                link.signal.notify();
                            }
                        }
                    }
                    Output::Refresh {
                        conn,
                        token,
                        join_ref,
                        msg_ref,
                    } => refreshes.push((conn, token, join_ref, msg_ref)),
                    Output::Event(e) => {
                        if let Some(events) = &self.events {
                            events.push(e, *wall.get_or_insert_with(wall_ms));
                        }
                    }
                    Output::Mesh { to, msg } => {
                        let mut q = self.peer_queues[to.index()].borrow_mut();
                        q.push(msg);
                        if q.len() == 1 {
                            self.peer_signals[to.index()].notify();
                        }
                    }
                }
            }
        }
        *self.outputs.borrow_mut() = outputs;
        if !refreshes.is_empty() {
            self.verify_refreshes(refreshes);
        }
    }

    /// The connection's task wrote everything queued for it: a slow consumer that lost diffs
    /// gets its fresh states now.
    pub fn drained(&self, conn: ConnId) {
        if !self.core.borrow().is_resyncing(conn) {
            return;
        }
        self.core().drained(conn);
        self.dispatch();
        self.flush.notify();
    }

    /// When the rings are backed up: registers `waker` to be woken once they drain, and says so.
    /// (The connection's waker was registered by `take_outbound` in the same poll.)
    pub fn pause_if_backlogged(&self, conn: ConnId) -> bool {
        let backlog: usize = self.peer_queues.iter().map(|q| q.borrow().len()).sum();
        if backlog < MESH_BACKLOG_LIMIT {
            return false;
        }
        self.core.borrow_mut().pause(conn);
        true
    }

    /// A batch went onto a ring: resume the paused connections if the backlog is gone.
    pub fn ring_progress(&self) {
        let backlog: usize = self.peer_queues.iter().map(|q| q.borrow().len()).sum();
        if backlog < MESH_BACKLOG_LIMIT / 2 {
            let resumed = self.core.borrow_mut().resume_all();
            let mut conns = self.conns.borrow_mut();
            for conn in resumed {
                if let Some(slot) = conns.get_mut(conn.0 as usize) {
                    slot.wake();
                }
            }
        }
    }
}
