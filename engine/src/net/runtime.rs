//! One shard's runtime on its executor: the core state machine, the connections' outbound
//! queues and the outgoing ring batches. Everything here runs on one thread;
//! `RefCell` borrows are never held across an await.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use roster_proto::encode::FrameKind;
use slab::Slab;

use crate::config::ServerConfig;
use crate::core::outbound::{OutQueue, Pushed};
use crate::core::{Config, ConnId, Frame, Latency, MeshMsg, Millis, Output, Shard};
use crate::identity::{self, Identity, Verifier};
use crate::mesh::ShardId;
use crate::net::admin::{Board, Figure, LatencyOf, Query, ERRORS, REFUSALS};
use crate::net::admission::Admission;
use crate::net::handshake::{Reject, Upgrade};
use crate::net::signal::Signal;
use crate::net::ws::{write_text_frame, write_text_frame_header};

/// Why the server closes a connection: WebSocket close code and reason.
pub type CloseReason = (u16, Cow<'static, str>);

/// What the runtime keeps per connection, next to the core's record. One per connection in a
/// slab that grows by doubling, so it is kept small (64 bytes): the close reason, rare, is boxed.
pub struct Slot {
    /// Frames not yet taken by the connection's task.
    out: OutQueue<Frame>,
    close: Option<Box<CloseReason>>,
    waker: Option<Waker>,
    /// When the oldest frame in `out` was queued (µs, wrapping), for the delivery latency.
    queued_us: u32,
}

impl Slot {
    pub fn set_waker(&mut self, w: &Waker) {
        if !self.waker.as_ref().is_some_and(|old| old.will_wake(w)) {
            self.waker = Some(w.clone());
        }
    }

    fn wake(&mut self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

/// Counters for logs now and metrics later.
#[derive(Default)]
pub struct Stats {
    pub accepted: Cell<u64>,
    pub handshake_failures: Cell<u64>,
    pub accept_errors: Cell<u64>,
    /// Slow consumers whose queued diffs were dropped (each gets fresh states once drained).
    pub slow_resyncs: Cell<u64>,
    pub messages_in: Cell<u64>,
    pub frames_out: Cell<u64>,
    /// Closes the connection layer decided (bad frames, rate limit), by reason.
    pub closes: RefCell<Vec<(&'static str, u64)>>,
    /// Upgrade requests refused, by reason.
    pub refusals: RefCell<Vec<(&'static str, u64)>>,
}

impl Stats {
    pub fn count(list: &RefCell<Vec<(&'static str, u64)>>, reason: &'static str) {
        let mut list = list.borrow_mut();
        match list.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => list.push((reason, 1)),
        }
    }
}

pub struct Runtime {
    pub id: ShardId,
    pub config: ServerConfig,
    core: RefCell<Shard>,
    pub conns: RefCell<Slab<Slot>>,
    /// Per peer shard: messages waiting for the ring, and the task that sends them.
    pub peer_queues: Vec<RefCell<Vec<MeshMsg>>>,
    pub peer_signals: Vec<Signal>,
    /// Connections that stopped reading because the rings are backed up.
    paused: RefCell<HashSet<ConnId>>,
    pub flush: Signal,
    epoch: Instant,
    pub shutting_down: Cell<bool>,
    pub stop_accepting: Signal,
    pub drained: Signal,
    /// Receive buffer shared by every connection of the shard: bytes are handed to tungstenite
    /// before the next await, so one buffer serves all.
    pub scratch: RefCell<Vec<u8>>,
    /// Where a connection's queued frames are laid out for one write, shared the same way.
    pub write_scratch: RefCell<Vec<u8>>,
    pub stats: Stats,
    /// None in development mode.
    verifier: Option<Verifier>,
    /// Origins and connection counts, shared by every shard.
    pub admission: Arc<Admission>,
    /// Where this shard publishes its figures and takes API queries.
    board: Arc<Board>,
    /// When the figures last went on the board (ms).
    published_ms: Cell<u64>,
    /// How long frames waited in connections' queues before their task wrote them.
    delivery: RefCell<Latency>,
    /// The core's outputs while they are carried out (kept for its capacity).
    outputs: RefCell<Vec<Output>>,
    /// When the tick task will next run (ms), and the signal that makes it look again.
    wake_at: Cell<u64>,
    pub rewake: Signal,
}

/// What every shard's runtime shares with the others and the admin thread.
pub struct Shared {
    pub admission: Arc<Admission>,
    pub board: Arc<Board>,
    pub seeds: CoreSeeds,
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
                ref_seed: shared.seeds.refs,
                hash_seed: shared.seeds.hashing,
            },
        );
        let n = config.shards as usize;
        Rc::new(Runtime {
            id,
            core: RefCell::new(core),
            conns: RefCell::new(Slab::new()),
            peer_queues: (0..n).map(|_| RefCell::new(Vec::new())).collect(),
            peer_signals: (0..n).map(|_| Signal::default()).collect(),
            paused: RefCell::new(HashSet::new()),
            flush: Signal::default(),
            epoch: Instant::now(),
            shutting_down: Cell::new(false),
            stop_accepting: Signal::default(),
            drained: Signal::default(),
            scratch: RefCell::new(vec![0; 64 << 10]),
            write_scratch: RefCell::new(Vec::with_capacity(64 << 10)),
            stats: Stats::default(),
            verifier: config.secret.as_ref().map(|s| Verifier::new(&s.0)),
            admission: shared.admission,
            board: shared.board,
            published_ms: Cell::new(0),
            delivery: RefCell::new(Latency::default()),
            outputs: RefCell::new(Vec::new()),
            wake_at: Cell::new(0),
            rewake: Signal::default(),
            config,
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The core, its clock set to now: deadlines the next input makes count from this moment.
    fn core(&self) -> std::cell::RefMut<'_, Shard> {
        let mut core = self.core.borrow_mut();
        core.advance(self.now_us());
        core
    }

    /// A handshake completed: the connection gets an id (and in the core, a heartbeat deadline).
    pub fn open(&self, identity: Identity) -> ConnId {
        let slot = Slot {
            out: OutQueue::default(),
            close: None,
            waker: None,
            queued_us: 0,
        };
        let conn = ConnId(self.conns.borrow_mut().insert(slot) as u32);
        self.core().open_with(conn, identity.key, identity.grants);
        self.dispatch();
        conn
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

    /// The connection's task is ending: its presences leave.
    pub fn closed(&self, conn: ConnId) {
        self.conns.borrow_mut().try_remove(conn.0 as usize);
        self.paused.borrow_mut().remove(&conn);
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

    /// Answers the admin API's queries waiting on the board.
    fn answer_queries(&self) {
        let board = &self.board.shards[self.id.index()];
        let queries = board.take_queries();
        if queries.is_empty() {
            return;
        }
        let core = self.core.borrow();
        for q in queries {
            // A closed API connection dropped its receiver: nothing to do about it.
            let _ = match q {
                Query::Topic(name, reply) => reply.send(core.topic_view(name.as_str())).is_ok(),
                Query::User(key, reply) => reply.send(core.user_view(&key)).is_ok(),
            };
        }
    }

    /// Puts this shard's figures on the board.
    fn publish(&self) {
        let board = &self.board.shards[self.id.index()];
        let core = self.core.borrow();
        let stats = core.stats();
        board.publish_core(&stats);
        board.set_latency(LatencyOf::Join, core.join_latency());
        board.set_latency(LatencyOf::Delivery, &self.delivery.borrow());
        let backlog: usize = self.peer_queues.iter().map(|q| q.borrow().len()).sum();
        let s = &self.stats;
        for (f, v) in [
            (Figure::RingBacklog, backlog as u64),
            (Figure::Accepted, s.accepted.get()),
            (Figure::HandshakeFailures, s.handshake_failures.get()),
            (Figure::AcceptErrors, s.accept_errors.get()),
            (Figure::MessagesIn, s.messages_in.get()),
            (Figure::FramesOut, s.frames_out.get()),
            (Figure::Resyncs, s.slow_resyncs.get()),
            (Figure::SlowCloses, stats.slow_closes),
            (Figure::HeartbeatCloses, stats.heartbeat_closes),
        ] {
            board.set(f, v);
        }
        let (closes, refusals) = (s.closes.borrow(), s.refusals.borrow());
        let errors = core.errors().iter().chain(closes.iter());
        let errors = errors.map(|&(r, n)| (ERRORS, r, n));
        board.publish_reasons(errors.chain(refusals.iter().map(|&(r, n)| (REFUSALS, r, n))));
    }

    /// Stop accepting and ask every connection to close with 1001.
    pub fn shut_down(&self) {
        if self.shutting_down.replace(true) {
            return;
        }
        self.stop_accepting.notify();
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
    fn dispatch(&self) {
        let mut outputs = std::mem::take(&mut *self.outputs.borrow_mut());
        // Read once, and only if a frame is queued.
        let mut now_us = None;
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
                        slot.wake();
                    }
                    Output::Close { conn, code, reason } => {
                        if let Some(slot) = conns.get_mut(conn.0 as usize) {
                            slot.close
                                .get_or_insert_with(|| Box::new((code.0, Cow::Borrowed(reason))));
                            slot.wake();
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
        if self.paused.borrow_mut().insert(conn) {
            self.core.borrow_mut().set_paused(conn, true);
        }
        true
    }

    /// A batch went onto a ring: resume the paused connections if the backlog is gone.
    pub fn ring_progress(&self) {
        let backlog: usize = self.peer_queues.iter().map(|q| q.borrow().len()).sum();
        if backlog < MESH_BACKLOG_LIMIT / 2 {
            let mut conns = self.conns.borrow_mut();
            let mut core = self.core.borrow_mut();
            for conn in self.paused.borrow_mut().drain() {
                core.set_paused(conn, false);
                if let Some(slot) = conns.get_mut(conn.0 as usize) {
                    slot.wake();
                }
            }
        }
    }

    /// Whether the connection must close (without taking its frames); registers the waker.
    /// If it must, the frames queued before the close are appended to `wbuf` first (an error
    /// reply queued just before a close still goes out).
    pub fn take_close(
        &self,
        conn: ConnId,
        waker: &Waker,
        wbuf: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        let closing = {
            let mut conns = self.conns.borrow_mut();
            let slot = conns.get_mut(conn.0 as usize)?;
            slot.set_waker(waker);
            slot.close.is_some()
        };
        if closing {
            self.take_outbound(conn, waker, wbuf, usize::MAX).0
        } else {
            None
        }
    }

    /// Appends the frames queued for `conn` to `wbuf` as WebSocket frames and says whether the
    /// connection must close; registers the task's waker. A frame of `big` bytes or more stops
    /// the walk: only its header goes into `wbuf`, and the frame itself is returned for the
    /// caller to write from (the frames after it stay queued).
    pub fn take_outbound(
        &self,
        conn: ConnId,
        waker: &Waker,
        wbuf: &mut Vec<u8>,
        big: usize,
    ) -> (Option<CloseReason>, Option<Frame>) {
        let mut conns = self.conns.borrow_mut();
        let Some(slot) = conns.get_mut(conn.0 as usize) else {
            return (None, None);
        };
        slot.set_waker(waker);
        if !slot.out.is_empty() {
            let now = self.now_us() as u32;
            self.delivery
                .borrow_mut()
                .record(now.wrapping_sub(slot.queued_us) as u64);
            // What stays queued (behind a large frame) is timed from now.
            slot.queued_us = now;
        }
        let mut taken = 0;
        let mut large = None;
        for frame in slot.out.frames() {
            taken += 1;
            if frame.len() >= big {
                write_text_frame_header(wbuf, frame.len());
                large = Some(frame.clone());
                break;
            }
            write_text_frame(wbuf, frame);
        }
        slot.out.consume(taken);
        if large.is_some() {
            // The rest waits until the large frame is out; the task comes back for it.
            return (None, large);
        }
        (slot.close.take().map(|b| *b), None)
    }
}

#[cfg(test)]
mod tests {
    /// One per connection in a slab that doubles: the comment on `Slot` promises this size.
    #[test]
    fn a_slot_is_64_bytes() {
        assert_eq!(std::mem::size_of::<super::Slot>(), 64);
    }
}
