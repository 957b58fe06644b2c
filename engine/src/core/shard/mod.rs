//! The shard state machine: its inputs and what it holds. The connection side's commands are
//! in the files below, one concept each; the owner sides are parts of their own
//! (`topic_owner.rs`, `user_owner.rs`).

mod answers;
mod client;
mod join;
mod leave;
mod restart;
#[cfg(test)]
mod tests;
mod token;
mod watching;

use std::rc::Rc;
use std::sync::Arc;

use roster_proto::encode::{self, FrameKind};
use roster_proto::{
    decode, ClientEvent, ClientMessage, ClientMeta, JoinRequest, PhxRef, PresenceMode,
};

use crate::cluster::frame::{Command, Frame as NodeFrame, Kind, Origin};
use crate::core::connection::{Connection, Joined};
use crate::core::event::Reason;
use crate::core::hash::{Map, Seeds};
use crate::core::liveness::{Dead, Liveness};
use crate::core::names::Names;
use crate::core::outbox::Outbox;
pub use crate::core::outbox::Output;
use crate::core::resync::Resyncing;
use crate::core::subscribers::LocalSubs;
use crate::core::topic_owner::{Env, TopicOwner};
use crate::core::user::Users;
use crate::core::watch::{is_watch_topic, Watches};
use crate::core::{
    CloseCode, Config, ConnAddr, ConnId, Frame, Grants, JoinMsg, JoinedReply, Latency, MeshMsg,
    Meta, Millis, Reforce, TopicName, TopicView, Track, UserKey,
};
use crate::mesh::{Router, ShardId};
pub use token::{Refreshed, TOKEN_EXPIRED, TOKEN_TOPIC};

/// Sizes of a shard's tables, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub connections: usize,
    pub topics_owned: usize,
    pub presences_owned: usize,
    /// Of those, presences of other nodes' parts (in a cluster).
    pub remote_presences: usize,
    pub users_owned: usize,
    pub watched_users: usize,
    /// Presence diffs that went out for a topic (one per flush or window, not per subscriber).
    pub diffs_sent: u64,
    /// Flushes of a large topic held back by its coalescing window.
    pub diffs_coalesced: u64,
    /// Subscriptions given a fresh state after losing diffs (slow consumers).
    pub resyncs: u64,
    /// Slow consumers closed for not draining within the timeout.
    pub slow_closes: u64,
    /// Connections closed for sending no text message within the heartbeat timeout.
    pub heartbeat_closes: u64,
    /// Joins that took over a presence held by the leave grace (or their twin's, see
    /// `topic::Twin`).
    pub takeovers: u64,
    /// Joins held back as twins of a presence their key already had.
    pub twins: u64,
    /// Held presences whose grace ended without a takeover.
    pub grace_expired: u64,
}

/// A join's `ref` and when it arrived (µs).
type Awaiting = (Option<Box<str>>, u64);

pub(crate) const REPLY_EMPTY: &[u8] = b"{}";

/// A presence_state frame and what it was made from: the shared state and the join_ref.
type StateFrame = (Arc<[u8]>, Option<Box<str>>, Frame);

/// Longest user key a watch list may name (as the handshake's `user_id`).
const MAX_KEY_BYTES: usize = 255;

/// One shard: the connection side (its connections, what they joined, the joins awaiting
/// their owners, the resync record) in this file, composed with the parts that keep their own
/// state: the topic owner (`topic_owner.rs`), the user owner (`user.rs`, `user_owner.rs`), the
/// local subscriber sets (`subscribers.rs`), the watch replicas (`watch.rs`) and the outbox.
pub struct Shard {
    id: ShardId,
    router: Router,
    config: Config,
    conns: Map<ConnId, Connection>,
    owner: TopicOwner,
    users: Users,
    subs: LocalSubs,
    watches: Watches,
    /// One copy of each topic name in use on this shard, shared by both sides.
    names: Names,
    /// `ref` of each phx_join still waiting for its owner, by (connection, join seq), and when
    /// it came (the driver's clock, for the join latency).
    awaiting: Map<(ConnId, u32), Awaiting>,
    /// The driver's clock in microseconds, as of the last input; only times requests (nothing
    /// the shard decides depends on it).
    clock_us: u64,
    /// From a phx_join's arrival to its reply, for joins answered so far.
    join_latency: Latency,
    resyncing: Resyncing,
    liveness: Liveness,
    tx: Outbox,
    /// Scratch for encoding; its capacity is reused across frames.
    buf: Vec<u8>,
    next_ref: u64,
    join_seq: u32,
    /// The last presence_state frame made from a shared state, for the next joiner with the
    /// same join_ref: a window's joiners share one state, and clients of one app mostly share
    /// join_refs, so a big room's state is one frame per shard and window, not one per joiner.
    /// Dropped at the end of each batch.
    last_state: Option<StateFrame>,
    /// The driver's clock as of the last input or tick (never goes back).
    now: Millis,
    /// Error replies and closes so far, by reason.
    errors: Vec<(&'static str, u64)>,
    /// The connection side's counters (the owner side keeps its own).
    resyncs: u64,
    slow_closes: u64,
    heartbeat_closes: u64,
    /// Set by [`Shard::shut_down`].
    shutting_down: bool,
    /// When connections' tokens expire (see `token.rs`).
    expiries: crate::core::expiry::Expiries,
}

impl Shard {
    pub fn new(id: ShardId, config: Config) -> Self {
        assert!(id.0 < config.shards, "shard {} of {}", id.0, config.shards);
        let seeds = Seeds::new(config.hash_seed);
        let liveness = Liveness::new(config.heartbeat_timeout, config.message_timeout, seeds);
        let events = config.events;
        Shard {
            id,
            router: Router::new(config.shards),
            conns: seeds.map(),
            owner: TopicOwner::new(&config, seeds, id),
            users: Users::new(seeds, config.cluster.clone()),
            subs: LocalSubs::new(seeds),
            watches: Watches::new(seeds),
            config,
            awaiting: seeds.map(),
            clock_us: 0,
            join_latency: Latency::default(),
            resyncing: Resyncing::new(seeds),
            liveness,
            names: Names::new(seeds),
            tx: Outbox::new(id, events),
            buf: Vec::with_capacity(4096),
            next_ref: 0,
            join_seq: 0,
            last_state: None,
            now: Millis(0),
            errors: Vec::new(),
            resyncs: 0,
            slow_closes: 0,
            heartbeat_closes: 0,
            shutting_down: false,
            expiries: crate::core::expiry::Expiries::new(seeds),
        }
    }

    /// The owner parts beside what they write to: the shard's outbox, names, scratch buffer
    /// and clock.
    fn owners(&mut self) -> (&mut TopicOwner, &mut Users, Env<'_>) {
        let env = Env {
            now: self.now,
            tx: &mut self.tx,
            names: &mut self.names,
            buf: &mut self.buf,
        };
        (&mut self.owner, &mut self.users, env)
    }

    fn owner_env(&mut self) -> (&mut TopicOwner, Env<'_>) {
        let (owner, _, env) = self.owners();
        (owner, env)
    }

    fn users_env(&mut self) -> (&mut Users, Env<'_>) {
        let (_, users, env) = self.owners();
        (users, env)
    }

    /// The topic-owner part, for the invariants.
    pub(crate) fn owner(&self) -> &TopicOwner {
        &self.owner
    }

    /// Outputs produced so far, in the order they must be carried out.
    pub fn outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.tx.out.drain(..)
    }

    /// The same, moved into `into` (which must be empty) without allocating: the driver can
    /// then carry them out while it asks the shard about connections, or tells it of overflows.
    pub(crate) fn take_outputs(&mut self, into: &mut Vec<Output>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut self.tx.out, into);
    }

    /// A connection accepted on this shard, identified as `key`, with no token (development
    /// mode).
    pub fn open(&mut self, conn: ConnId, key: UserKey) {
        self.open_with(conn, key, None, None);
    }

    /// A connection whose token gave it `grants`, and expires at `expires` (the driver's
    /// clock). Its heartbeat timeout starts now.
    pub fn open_with(
        &mut self,
        conn: ConnId,
        key: UserKey,
        grants: Option<Box<Grants>>,
        expires: Option<Millis>,
    ) {
        let c = Connection::new(key, grants, self.now);
        if let Some(old) = self.conns.insert(conn, c) {
            // The driver reused an id without closing; leave the old connection's topics.
            self.part_all(conn, old, Reason::Closed);
        }
        self.expiries.set(conn, expires);
        self.liveness.opened(conn, self.now);
        self.drain_local();
    }

    /// The connection is gone (socket closed, timed out, or the driver closed it). Its presences
    /// are held for the leave grace.
    pub fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            let why = if self.shutting_down {
                Reason::Shutdown
            } else {
                Reason::Closed
            };
            self.part_all(conn, c, why);
        }
        self.drain_local();
    }

    /// A command of the admin API, from this node's or (in a cluster) any node's: see
    /// [`Command`]. A server-side presence put by another node moves there: this node's copy
    /// leaves (as `removed`), so that there is one.
    pub fn command(&mut self, c: Command) {
        let me = self.config.cluster.as_ref().map_or(0, |c| c.me.node);
        match c {
            Command::Disconnect { key, code, reason } => {
                self.disconnect_user(&key, CloseCode(code), reason.into());
            }
            Command::Track {
                topic,
                key,
                meta,
                ttl_ms,
                owner,
            } if owner == me => {
                let ttl = (ttl_ms > 0).then_some(Millis(ttl_ms));
                if let Err(why) = self.server_track(&topic, &key, &meta, ttl) {
                    // The API checked it against its own node's limits; this one's differ.
                    count_error(&mut self.errors, why);
                }
            }
            Command::Track { topic, key, .. } | Command::Untrack { topic, key } => {
                self.server_untrack(&topic, &key)
            }
        }
    }

    /// The admin API disconnects `key`: each of its connections here is closed with `code`
    /// and `reason`, its presences leave as `disconnected` (a leave grace does not hold them:
    /// the backend wants them gone). Returns how many were closed.
    pub fn disconnect_user(
        &mut self,
        key: &str,
        code: CloseCode,
        reason: std::borrow::Cow<'static, str>,
    ) -> usize {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.key.as_str() == key)
            .map(|(id, _)| *id)
            .collect();
        for &conn in &conns {
            self.close_for(conn, code, reason.clone(), Reason::Disconnected);
        }
        self.drain_local();
        conns.len()
    }

    /// The admin API tracks `key` in `topic` with `meta` (a JSON object), no connection, for
    /// `ttl` or until removed; a second call updates it. This shard must own the topic.
    pub fn server_track(
        &mut self,
        topic: &str,
        key: &str,
        meta: &str,
        ttl: Option<Millis>,
    ) -> Result<(), &'static str> {
        if topic.len() > self.config.max_topic_bytes {
            return Err("topic too long");
        }
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err("key must be 1 to 255 bytes");
        }
        let meta = roster_proto::ClientMeta::from_json(meta).map_err(|e| e.reason())?;
        if meta.len() > self.config.max_meta_bytes {
            return Err("meta too large");
        }
        let (owner, mut env) = self.owner_env();
        owner.server_track(topic, key, meta, ttl, &mut env);
        self.drain_local();
        Ok(())
    }

    /// The admin API removes the server-side presence of `key` in `topic`, if there is one.
    pub fn server_untrack(&mut self, topic: &str, key: &str) {
        let (owner, mut env) = self.owner_env();
        owner.server_untrack(topic, key, Reason::Removed, &mut env);
        self.drain_local();
    }

    /// The server is stopping: the connections it closes from now on leave as `shutdown`.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// A text message from a local connection: it is alive (see `liveness.rs`), within its
    /// message rate or closed.
    pub fn frame(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_seen_ms = self.now.0 as u32;
        if !c.rate.take(self.config.max_msgs_per_sec, self.now.0) {
            return self.close_for_rate(conn);
        }
        match decode(bytes) {
            Ok(msg) => self.client_message(conn, msg),
            Err(e) => self.close_with(conn, CloseCode::INVALID_PAYLOAD, e.reason()),
        }
        self.drain_local();
    }

    /// A message from another shard's ring.
    pub fn mesh(&mut self, msg: MeshMsg) {
        self.handle_mesh(msg);
        self.drain_local();
    }

    /// End of a batch of inputs: pending changes go out, one diff per topic (large topics wait
    /// for the end of their window) and one per watched user.
    pub fn flush(&mut self) {
        loop {
            let (owner, mut env) = self.owner_env();
            owner.flush(&mut env);
            self.watches.flush(&mut self.tx, &mut self.buf);
            self.drain_local();
            self.users.cluster_flush(&mut self.tx);
            if !self.owner.has_changes() {
                break;
            }
        }
        self.last_state = None;
    }

    /// Time passes: coalescing windows end, held presences leave, throttled counts fall due.
    /// Ends with a flush, so what time released goes out now.
    pub fn tick(&mut self, now: Millis) {
        self.now = Millis(self.now.0.max(now.0));
        let (owner, mut env) = self.owner_env();
        owner.tick(&mut env);
        let (users, mut env) = self.users_env();
        users.user_tick(&mut env);
        self.close_stuck();
        self.close_dead();
        self.close_expired();
        self.drain_local();
        self.flush();
    }

    /// A ping or pong from a local connection: the driver answers it, and it is not activity
    /// (only text messages are), but it counts against the message rate.
    pub fn control_frame(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.rate.take(self.config.max_msgs_per_sec, self.now.0) {
            self.close_for_rate(conn);
        }
    }

    fn close_for_rate(&mut self, conn: ConnId) {
        count_error(&mut self.errors, "rate limit");
        let reason = "rate limit: too many messages per second";
        self.close_uncounted(conn, CloseCode::POLICY, reason);
        self.drain_local();
    }

    /// The driver stopped reading `conn` (its own backpressure): a heartbeat may wait unread
    /// meanwhile, so the heartbeat timeout does not close it. The shard is the one record of
    /// who is paused.
    pub fn pause(&mut self, conn: ConnId) {
        if self.conns.contains_key(&conn) {
            self.liveness.pause(conn);
        }
    }

    /// The driver reads every paused connection again; they are returned, to be woken.
    pub fn resume_all(&mut self) -> Vec<ConnId> {
        self.liveness.resume_all()
    }

    /// The first bytes of a message from `conn` came, not all of it: it must be complete
    /// within the message timeout.
    pub fn message_started(&mut self, conn: ConnId) {
        if self.conns.contains_key(&conn) {
            self.liveness.message_started(conn, self.now);
        }
    }

    /// The message `conn` had begun is complete (or the connection holds none).
    pub fn message_done(&mut self, conn: ConnId) {
        self.liveness.message_done(conn);
    }

    /// A frame from NATS about a topic this shard owns (the driver routes each by its name, as
    /// `mesh::Router` does); `reply`: where a request wants its answer.
    pub fn nats_frame(&mut self, frame: NodeFrame, reply: Option<&str>) {
        let Some((kind, _)) = frame.about() else {
            return;
        };
        match kind {
            Kind::Topic => {
                let (owner, mut env) = self.owner_env();
                owner.nats_frame(frame, reply, &mut env);
            }
            Kind::User => {
                let (users, mut env) = self.users_env();
                users.user_frame(frame, reply, &mut env);
            }
        }
        self.drain_local();
    }

    /// The request for `name`'s parts found nobody subscribed.
    pub fn no_responders(&mut self, kind: Kind, name: &str) {
        match kind {
            Kind::Topic => {
                let (owner, mut env) = self.owner_env();
                owner.no_responders(name, &mut env);
            }
            Kind::User => {
                let (users, mut env) = self.users_env();
                users.user_no_responders(name, &mut env);
            }
        }
        self.drain_local();
    }

    /// A node of the cluster is down (see `cluster::nodes`): its parts leave.
    pub fn node_down(&mut self, origin: Origin) {
        let (owner, mut env) = self.owner_env();
        owner.node_down(origin, &mut env);
        let (users, mut env) = self.users_env();
        users.user_node_down(origin, &mut env);
        self.drain_local();
    }

    /// A node ended under a grace (it died with a leave grace set, or stopped to restart):
    /// its parts stay, and joins here may take its presences over, until `node_down`.
    pub fn node_held(&mut self, origin: Origin) {
        let (owner, mut env) = self.owner_env();
        owner.node_held(origin, &mut env);
        let (users, mut env) = self.users_env();
        users.user_node_held(origin, &mut env);
        self.drain_local();
    }

    /// A node declared down is heard again (a partition healed).
    pub fn node_up(&mut self, origin: Origin) {
        self.owner.node_up(origin);
        self.users.user_node_up(origin);
    }

    /// A node declared down is heard again: its parts are asked for anew.
    pub fn node_back(&mut self, origin: Origin) {
        let (owner, mut env) = self.owner_env();
        owner.node_back(origin, &mut env);
        self.users.user_node_back(origin, self.now, &mut self.tx);
        self.drain_local();
    }

    /// Frames of a node may have been lost (a heartbeat gap, this node's NATS reconnect): its
    /// parts are fetched again.
    pub fn node_gap(&mut self, origin: Origin) {
        let (owner, mut env) = self.owner_env();
        owner.node_gap(origin, &mut env);
        self.users.user_node_gap(origin, self.now, &mut self.tx);
        self.drain_local();
    }

    /// A frame of `origin` about one name was dropped before this shard took it: that name's
    /// part of `origin` alone is fetched again.
    pub fn name_gap(&mut self, kind: Kind, name: &str, origin: Origin) {
        match kind {
            Kind::Topic => {
                let (owner, mut env) = self.owner_env();
                owner.topic_gap(name, origin, &mut env);
            }
            Kind::User => self.users.user_gap(name, origin, self.now, &mut self.tx),
        }
        self.drain_local();
    }

    /// Requests to this node may have been lost (its NATS client dropped messages as a slow
    /// consumer): its own parts go out unasked, for nodes whose fetches it did not answer.
    pub fn announce(&mut self) {
        self.owner.announce_parts(&mut self.tx);
        self.users.user_announce(&mut self.tx);
        self.drain_local();
    }

    /// Every open connection has its heartbeat deadline (see `liveness.rs`).
    pub(crate) fn check_liveness(&self) -> Result<(), String> {
        self.liveness.check(self.conns.len())
    }

    /// Connections silent for the heartbeat timeout, or stuck inside a message, are closed.
    fn close_dead(&mut self) {
        let conns = &self.conns;
        let dead = self
            .liveness
            .due(self.now, |conn| conns.get(&conn).map(|c| c.last_seen_ms));
        for (conn, why) in dead {
            match why {
                Dead::Heartbeat => {
                    self.heartbeat_closes += 1;
                    let why = Reason::HeartbeatTimeout;
                    self.close_for(conn, CloseCode::NORMAL, "heartbeat timeout", why);
                }
                Dead::MessageTimeout => {
                    count_error(&mut self.errors, "message timeout");
                    let reason = "message not completed in time";
                    self.close_uncounted(conn, CloseCode::POLICY, reason);
                }
            }
        }
    }

    /// The driver dropped the diffs queued for `conn` (its queue overflowed, see
    /// [`outbound`](crate::core::outbound)): no more diffs go to it until [`Shard::drained`],
    /// which gives it fresh states. False if it was resyncing already (its timeout keeps running
    /// from the first overflow) or is not here.
    pub fn resync(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if !self.resyncing.start(conn, self.now) {
            return false;
        }
        for j in c.joins.iter_mut() {
            if j.mode != PresenceMode::Full || j.awaiting_reply || j.stale {
                continue;
            }
            let topic = j.topic.as_str();
            if is_watch_topic(topic) {
                j.stale = self.watches.suspend(conn, topic);
            } else {
                self.subs.remove(topic, conn, PresenceMode::Full);
                j.stale = true;
            }
        }
        true
    }

    /// Whether `conn` is resyncing: the driver drops its diffs, and tells [`Shard::drained`]
    /// once it has written everything.
    pub fn is_resyncing(&self, conn: ConnId) -> bool {
        self.resyncing.contains(conn)
    }

    /// Slow consumers that did not drain within the timeout are closed (1008).
    fn close_stuck(&mut self) {
        let stuck = self
            .resyncing
            .stuck(self.now, self.config.slow_consumer_timeout);
        for conn in stuck {
            self.slow_closes += 1;
            self.close_with(conn, CloseCode::POLICY, "slow consumer: not reading");
        }
    }

    /// Everything queued for `conn` has been written: if it was resyncing, each subscription
    /// that lost diffs gets a fresh `presence_state` (from the owner, or from the watch
    /// replicas). Nothing to do otherwise.
    pub fn drained(&mut self, conn: ConnId) {
        if !self.resyncing.end(conn) {
            return;
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let mut asks = Vec::new();
        let mut watch_states = Vec::new();
        for j in c.joins.iter_mut().filter(|j| j.stale) {
            j.stale = false;
            self.resyncs += 1;
            if is_watch_topic(j.topic.as_str()) {
                watch_states.push((j.topic.clone(), j.join_ref().map(Box::<str>::from)));
            } else {
                // Answered like a join: the state arrives through `joined_reply`.
                self.join_seq = self.join_seq.wrapping_add(1);
                j.seq = self.join_seq;
                j.awaiting_reply = true;
                asks.push((j.topic.clone(), j.seq));
            }
        }
        for (topic, seq) in asks {
            let owner = self.router.topic_owner(topic.as_str());
            let msg = MeshMsg::Join(Box::new(JoinMsg {
                topic,
                from: ConnAddr {
                    shard: self.id,
                    conn,
                },
                seq,
                mode: PresenceMode::Full,
                track: None,
                resync: true,
            }));
            self.tx.mesh(owner, msg);
        }
        for (topic, jr) in watch_states {
            if self.watches.is_suspended(conn, topic.as_str()) {
                self.send_watch_state(conn, topic.as_str(), jr.as_deref());
            }
        }
        self.drain_local();
    }

    /// The driver's clock (µs, monotonic) before each input: deadlines made by the input
    /// (a window opened, a presence held for its grace) count from this moment rather than from
    /// the last tick, and joins are timed with it ([`Shard::join_latency`]). Time never goes
    /// back: an earlier value is ignored.
    pub fn advance(&mut self, now_us: u64) {
        self.clock_us = self.clock_us.max(now_us);
        self.now = Millis(self.now.0.max(now_us / 1000));
    }

    /// When the shard next needs [`Shard::tick`]: the earliest end of a coalescing window, of a
    /// leave grace or a twin's grace, of a count interval with a change waiting, of a slow
    /// consumer's time to drain, of a heartbeat timeout (to a wheel slot) or of a message
    /// begun. None when nothing waits on time. The driver sleeps until then
    /// (or less); ticking early is harmless.
    pub(crate) fn poll_timeout(&mut self) -> Option<Millis> {
        let owner = self.owner.poll_timeout(self.now);
        let stuck = self
            .resyncing
            .next_deadline(self.config.slow_consumer_timeout);
        let dead = self.liveness.next_deadline();
        let fetch = self.users.user_next_deadline();
        let expiry = self.expiries.next();
        owner
            .into_iter()
            .chain(stuck)
            .chain(dead)
            .chain(fetch)
            .chain(expiry)
            .min()
    }

    /// How long joins took from their arrival to their reply, so far.
    pub(crate) fn join_latency(&self) -> &Latency {
        &self.join_latency
    }

    /// The `ref` of join `seq` of `conn`, which is being answered now; its latency is recorded.
    fn answered(&mut self, conn: ConnId, seq: u32) -> Option<Option<Box<str>>> {
        let (msg_ref, since) = self.awaiting.remove(&(conn, seq))?;
        self.join_latency
            .record(self.clock_us.saturating_sub(since));
        Some(msg_ref)
    }

    /// Every reply awaited belongs to a join that still waits for its owner. (Not the other way
    /// round: a resync waits for a fresh state without a request to answer.)
    pub(crate) fn check_connections(&self) -> Result<(), String> {
        for (conn, seq) in self.awaiting.keys() {
            let waiting = self
                .conns
                .get(conn)
                .is_some_and(|c| c.joins.iter().any(|j| j.seq == *seq && j.awaiting_reply));
            if !waiting {
                return Err(format!(
                    "a reply awaited for {conn:?} join {seq} that waits for none"
                ));
            }
        }
        Ok(())
    }

    /// Whether a join (or resync) of `conn` still waits for its owner's answer.
    pub(crate) fn awaiting_reply(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.joins.iter().any(|j| j.awaiting_reply))
    }

    /// Error replies and closes this shard sent, by reason, since it started.
    pub(crate) fn errors(&self) -> &[(&'static str, u64)] {
        &self.errors
    }

    pub fn stats(&self) -> ShardStats {
        let owner = self.owner.stats;
        ShardStats {
            connections: self.conns.len(),
            topics_owned: self.owner.topics(),
            presences_owned: self.owner.presences(),
            remote_presences: self.owner.remote_presences(),
            users_owned: self.users.len(),
            watched_users: self.watches.users(),
            diffs_sent: owner.diffs_sent,
            diffs_coalesced: owner.diffs_coalesced,
            resyncs: self.resyncs,
            slow_closes: self.slow_closes,
            heartbeat_closes: self.heartbeat_closes,
            takeovers: owner.takeovers,
            twins: owner.twins,
            grace_expired: owner.grace_expired,
        }
    }

    /// Nothing at all is held: no connection, topic, user, subscription or queued work.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
            && self.owner.is_empty()
            && self.users.is_empty()
            && self.subs.topics() == 0
            && self.watches.is_empty()
            && self.awaiting.is_empty()
            && self.liveness.is_empty()
            && self.resyncing.is_empty()
            && self.expiries.is_empty()
            && self.names.in_use() == 0
            && self.tx.local.is_empty()
    }

    /// The presences of a topic this shard owns (in a cluster, the other nodes' it holds too).
    pub fn topic_view(&self, topic: &str) -> Option<TopicView> {
        self.owner.view(topic)
    }

    /// Whether [`Shard::topic_view`] is the whole cluster's: on one node always; in a cluster
    /// only for a topic this node has interest in, fetched (else the admin API looks the other
    /// nodes' parts up).
    pub fn topic_is_whole(&self, topic: &str) -> bool {
        self.config.cluster.is_none() || self.owner.is_fetched(topic)
    }

    /// Where a user this shard owns is present: `(topic, stored meta)`, the other nodes'
    /// presences held for watchers here included.
    pub fn user_view(&self, key: &str) -> Vec<(TopicName, Meta)> {
        self.users.view(key)
    }

    /// As [`Shard::topic_is_whole`], for [`Shard::user_view`].
    pub fn user_is_whole(&self, key: &str) -> bool {
        self.config.cluster.is_none() || self.users.is_fetched(key)
    }
}

/// One more of `reason`. The reasons are PROTOCOL.md's handful, so a list beats a map.
fn count_error(errors: &mut Vec<(&'static str, u64)>, reason: &'static str) {
    match errors.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, n)) => *n += 1,
        None => errors.push((reason, 1)),
    }
}
