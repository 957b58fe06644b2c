//! The shard state machine, client side: connections' frames in, replies and requests to owners
//! out. What a shard does as a topic owner or user owner is in `owner.rs`.

use std::rc::Rc;
use std::sync::Arc;

use roster_proto::encode::{self, FrameKind};
use roster_proto::{
    decode, ClientEvent, ClientMessage, ClientMeta, JoinRequest, PhxRef, PresenceMode,
};

use crate::core::connection::{Connection, Joined};
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
    Meta, Millis, TopicName, TopicView, Track, UserKey,
};
use crate::mesh::{Router, ShardId};

/// Sizes of a shard's tables, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub connections: usize,
    pub topics_owned: usize,
    pub presences_owned: usize,
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
    /// Generation of the last connection record made (see `Connection::generation`).
    generation: u32,
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
}

impl Shard {
    pub fn new(id: ShardId, config: Config) -> Self {
        assert!(id.0 < config.shards, "shard {} of {}", id.0, config.shards);
        let seeds = Seeds::new(config.hash_seed);
        let liveness = Liveness::new(config.heartbeat_timeout, config.message_timeout, seeds);
        Shard {
            id,
            router: Router::new(config.shards),
            conns: seeds.map(),
            owner: TopicOwner::new(&config, seeds),
            config,
            users: Users::new(seeds),
            subs: LocalSubs::new(seeds),
            watches: Watches::new(seeds),
            awaiting: seeds.map(),
            clock_us: 0,
            join_latency: Latency::default(),
            resyncing: Resyncing::new(seeds),
            liveness,
            generation: 0,
            names: Names::new(seeds),
            tx: Outbox::new(id),
            buf: Vec::with_capacity(4096),
            next_ref: 0,
            join_seq: 0,
            last_state: None,
            now: Millis(0),
            errors: Vec::new(),
            resyncs: 0,
            slow_closes: 0,
            heartbeat_closes: 0,
        }
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
        self.open_with(conn, key, None);
    }

    /// A connection whose token gave it `grants`. Its heartbeat timeout starts now.
    pub(crate) fn open_with(&mut self, conn: ConnId, key: UserKey, grants: Option<Box<Grants>>) {
        self.generation = self.generation.wrapping_add(1);
        let c = Connection::new(key, grants, self.generation, self.now);
        if let Some(old) = self.conns.insert(conn, c) {
            // The driver reused an id without closing; leave the old connection's topics.
            self.part_all(conn, old);
        }
        self.liveness.opened(conn, self.generation, self.now);
        self.drain_local();
    }

    /// The connection is gone (socket closed, timed out, or the driver closed it). Its presences
    /// are held for the leave grace.
    pub fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            self.part_all(conn, c);
        }
        self.drain_local();
    }

    /// A text message from a local connection: it is alive (see `liveness.rs`).
    pub fn frame(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_seen_ms = self.now.0 as u32;
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
            self.owner.flush(&mut Env {
                now: self.now,
                tx: &mut self.tx,
                names: &mut self.names,
            });
            self.watches.flush(&mut self.tx, &mut self.buf);
            self.drain_local();
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
        self.owner.tick(&mut Env {
            now: self.now,
            tx: &mut self.tx,
            names: &mut self.names,
        });
        self.close_stuck();
        self.close_dead();
        self.drain_local();
        self.flush();
    }

    /// The driver stopped reading `conn` (`paused`: its own backpressure) or resumed: a
    /// heartbeat may wait unread meanwhile, so the heartbeat timeout does not close it.
    pub fn set_paused(&mut self, conn: ConnId, paused: bool) {
        self.liveness.set_paused(conn, paused);
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

    /// Connections silent for the heartbeat timeout, or stuck inside a message, are closed.
    fn close_dead(&mut self) {
        let conns = &self.conns;
        let dead = self.liveness.due(self.now, |conn| {
            conns.get(&conn).map(|c| (c.generation, c.last_seen_ms))
        });
        for (conn, why) in dead {
            match why {
                Dead::Heartbeat => {
                    self.heartbeat_closes += 1;
                    self.close_uncounted(conn, CloseCode::NORMAL, "heartbeat timeout");
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
        owner.into_iter().chain(stuck).chain(dead).min()
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
            && self.names.in_use() == 0
            && self.tx.local.is_empty()
    }

    /// The presences of a topic this shard owns.
    pub fn topic_view(&self, topic: &str) -> Option<TopicView> {
        self.owner.view(topic)
    }

    /// Where a user this shard owns is present: `(topic, stored meta)`.
    pub fn user_view(&self, key: &str) -> Vec<(TopicName, Meta)> {
        self.users.presences(key)
    }

    // ---- client side -------------------------------------------------------------------------

    fn client_message(&mut self, conn: ConnId, msg: ClientMessage<'_>) {
        let jr = msg.join_ref.as_deref();
        let r = msg.msg_ref.as_deref();
        let topic = msg.topic.as_ref();
        if jr.map_or(0, str::len) > self.config.max_ref_bytes
            || r.map_or(0, str::len) > self.config.max_ref_bytes
        {
            return self.close_with(
                conn,
                CloseCode::INVALID_PAYLOAD,
                "invalid frame: join_ref or ref too long",
            );
        }
        if topic.len() > self.config.max_topic_bytes {
            return self.reply_error(conn, jr, r, topic, "topic too long");
        }
        if topic == "phoenix" {
            match msg.event {
                ClientEvent::Heartbeat => self.reply_ok(conn, jr, r, topic),
                _ => self.reply_error(conn, jr, r, topic, "unknown event"),
            }
            return;
        }
        let event = match msg.event {
            ClientEvent::Join(req) => return self.join(conn, jr, r, topic, req),
            // Payload errors say what is wrong, joined or not (a bad phx_join is not "unmatched").
            ClientEvent::Invalid(e) => return self.reply_error(conn, jr, r, topic, e.reason()),
            event => event,
        };
        let Some(at) = self.joined(conn, topic, jr) else {
            return self.reply_error(conn, jr, r, topic, "unmatched topic");
        };
        match event {
            ClientEvent::Leave => {
                let c = self.conns.get_mut(&conn).expect("joined implies open");
                let joined = c.joins.swap_remove(at);
                let key = c.key.clone();
                self.abandon_join(conn, &joined);
                self.part(conn, &key, joined, false);
                self.reply_ok(conn, jr, r, topic);
            }
            ClientEvent::PresenceUpdate(meta) => self.update(conn, at, jr, r, topic, meta),
            ClientEvent::WatchAdd(users) if is_watch_topic(topic) => {
                let Some(users) = self.watch_users(conn, jr, r, topic, &users) else {
                    return;
                };
                self.reply_ok(conn, jr, r, topic);
                self.watches.add(
                    conn,
                    topic,
                    users,
                    &self.router,
                    &mut self.tx,
                    &mut self.buf,
                );
            }
            ClientEvent::WatchRemove(users) if is_watch_topic(topic) => {
                let users: Vec<UserKey> = users.iter().map(|u| UserKey::new(u)).collect();
                self.reply_ok(conn, jr, r, topic);
                let done = self.watches.remove(
                    conn,
                    topic,
                    &users,
                    &self.router,
                    &mut self.tx,
                    &mut self.buf,
                );
                if done {
                    self.complete_watch_join(conn, topic);
                }
            }
            _ => self.reply_error(conn, jr, r, topic, "unknown event"),
        }
    }

    fn joined(&self, conn: ConnId, topic: &str, jr: Option<&str>) -> Option<usize> {
        self.conns.get(&conn)?.matching(topic, jr)
    }

    fn join(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        req: JoinRequest<'_>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.allowed(topic) {
            return self.reply_error(conn, jr, r, topic, "unauthorized");
        }
        if let Some(at) = c.position(topic) {
            // As Phoenix does: a second join of a joined topic closes the first channel.
            let old = c.joins.swap_remove(at);
            let key = c.key.clone();
            self.abandon_join(conn, &old);
            self.buf.clear();
            encode::phx_close(&mut self.buf, old.join_ref(), topic);
            self.tx.send(conn, &self.buf);
            self.part(conn, &key, old, false);
        }
        let c = self.conns.get_mut(&conn).expect("checked above");
        if c.joins.len() >= self.config.max_topics_per_conn {
            return self.reply_error(conn, jr, r, topic, "too many channels joined");
        }
        if is_watch_topic(topic) {
            return self.watch_join(conn, jr, r, topic, req);
        }
        if req.meta.len() > self.config.max_meta_bytes {
            return self.reply_error(conn, jr, r, topic, "meta too large");
        }
        let name = self.names.intern(topic);
        let track = req.track.then(|| {
            let phx_ref = next_ref(self.id, &mut self.next_ref, self.config.ref_seed);
            Track {
                key: c.key.clone(),
                phx_ref,
                meta: stored_meta(&mut self.buf, req.meta, forced(c), phx_ref, None),
            }
        });
        let seq = self.push_join(conn, &name, jr, r, req.presence, track.as_ref());
        let owner = self.router.topic_owner(topic);
        let from = ConnAddr {
            shard: self.id,
            conn,
        };
        self.tx.mesh(
            owner,
            MeshMsg::Join(Box::new(JoinMsg {
                topic: name,
                from,
                seq,
                mode: req.presence,
                track,
                resync: false,
            })),
        );
    }

    /// Records a join awaiting its answer; returns its sequence number.
    fn push_join(
        &mut self,
        conn: ConnId,
        name: &TopicName,
        jr: Option<&str>,
        r: Option<&str>,
        mode: PresenceMode,
        track: Option<&Track>,
    ) -> u32 {
        // Per shard, not per connection: connection ids are reused, and a reply to a closed
        // connection's join must never match a new connection's join.
        self.join_seq = self.join_seq.wrapping_add(1);
        let seq = self.join_seq;
        let c = self.conns.get_mut(&conn).expect("caller checked");
        c.push(Joined::new(
            name.clone(),
            jr,
            seq,
            mode,
            track.map(|t| t.phx_ref),
        ));
        self.awaiting
            .insert((conn, seq), (r.map(Box::from), self.clock_us));
        seq
    }

    /// The users of a watch request, or None after replying with the error. Checks the
    /// connection's `max_watch` against the users it would add.
    fn watch_users(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        users: &[std::borrow::Cow<'_, str>],
    ) -> Option<Vec<UserKey>> {
        if users.iter().any(|u| u.len() > MAX_KEY_BYTES) {
            self.reply_error(conn, jr, r, topic, "user key too long");
            return None;
        }
        let users: Vec<UserKey> = users.iter().map(|u| UserKey::new(u)).collect();
        let adding = self.watches.new_in(conn, topic, &users);
        if self.watches.watched_by(conn) + adding > self.config.max_watch {
            self.reply_error(conn, jr, r, topic, "too many users watched");
            return None;
        }
        Some(users)
    }

    /// Joining `watch:NAME`: nothing is tracked; the reply and state come once every watched
    /// user's replica is here.
    fn watch_join(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        req: JoinRequest<'_>,
    ) {
        let listed = req.users.unwrap_or_default();
        let Some(users) = self.watch_users(conn, jr, r, topic, &listed) else {
            return;
        };
        let name = self.names.intern(topic);
        self.push_join(conn, &name, jr, r, PresenceMode::Full, None);
        let ready = self
            .watches
            .join(conn, name, users, &self.router, &mut self.tx, &mut self.buf);
        if ready {
            self.complete_watch_join(conn, topic);
        }
    }

    /// Every user of a joining watch set has a replica: reply ok, then its state.
    fn complete_watch_join(&mut self, conn: ConnId, topic: &str) {
        let Some(joined) = self
            .conns
            .get_mut(&conn)
            .and_then(|c| c.joins.iter_mut().find(|j| j.topic.as_str() == topic))
        else {
            return;
        };
        if !std::mem::take(&mut joined.awaiting_reply) {
            return;
        }
        let seq = joined.seq;
        let jr: Option<Box<str>> = joined.join_ref().map(Box::from);
        let resyncing = self.resyncing.contains(conn);
        if resyncing {
            // Its diffs would be dropped: the state comes once the connection drains.
            joined.stale = true;
            self.watches.suspend_joining(conn, topic);
        }
        let msg_ref = self.answered(conn, seq).flatten();
        self.reply_ok(conn, jr.as_deref(), msg_ref.as_deref(), topic);
        if !resyncing {
            self.send_watch_state(conn, topic, jr.as_deref());
        }
    }

    fn send_watch_state(&mut self, conn: ConnId, topic: &str, jr: Option<&str>) {
        let mut state = std::mem::take(&mut self.buf);
        self.watches.go_live(conn, topic, &mut self.tx, &mut state);
        self.buf.clear();
        encode::presence_state(&mut self.buf, jr, topic, &state);
        self.tx
            .send_frame(conn, Rc::from(self.buf.as_slice()), FrameKind::State);
        if state.capacity() > self.buf.capacity() {
            self.buf = state;
        }
    }

    fn update(
        &mut self,
        conn: ConnId,
        at: usize,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        meta: ClientMeta<'_>,
    ) {
        if meta.len() > self.config.max_meta_bytes {
            return self.reply_error(conn, jr, r, topic, "meta too large");
        }
        let c = self.conns.get_mut(&conn).expect("joined implies open");
        let Some(old) = c.joins[at].tracked() else {
            return self.reply_error(conn, jr, r, topic, "not tracked");
        };
        let phx_ref = next_ref(self.id, &mut self.next_ref, self.config.ref_seed);
        let new = Track {
            key: c.key.clone(),
            phx_ref,
            meta: stored_meta(&mut self.buf, meta, forced(c), phx_ref, Some(old)),
        };
        let joined = &mut c.joins[at];
        joined.set_tracked(phx_ref);
        let msg = MeshMsg::Update {
            topic: joined.topic.clone(),
            from: ConnAddr {
                shard: self.id,
                conn,
            },
            old,
            new,
        };
        self.tx.mesh(self.router.topic_owner(topic), msg);
        self.reply_ok(conn, jr, r, topic);
    }

    /// A join still waiting for its owner is being left or replaced. Phoenix answers a join
    /// before it reads the next message, so the client would have had its ok by now: send it, so
    /// that no request goes unanswered. The state that would follow is moot.
    fn abandon_join(&mut self, conn: ConnId, joined: &Joined) {
        if let Some((msg_ref, _)) = self.awaiting.remove(&(conn, joined.seq)) {
            let topic = joined.topic.as_str();
            self.reply_ok(conn, joined.join_ref(), msg_ref.as_deref(), topic);
        }
    }

    /// The connection no longer has `joined`: stop delivering to it and tell the owner.
    /// `closed`: the connection ended, so its presence is held for the leave grace.
    fn part(&mut self, conn: ConnId, key: &UserKey, joined: Joined, closed: bool) {
        if joined.awaiting_reply {
            self.awaiting.remove(&(conn, joined.seq));
        } else {
            self.subs.remove(joined.topic.as_str(), conn, joined.mode);
        }
        if is_watch_topic(joined.topic.as_str()) {
            self.watches
                .part(conn, joined.topic.as_str(), &self.router, &mut self.tx);
            return;
        }
        let owner = self.router.topic_owner(joined.topic.as_str());
        let tracked = joined.tracked().map(|r| (key.clone(), r));
        let msg = MeshMsg::Leave {
            topic: joined.topic,
            from: ConnAddr {
                shard: self.id,
                conn,
            },
            mode: joined.mode,
            tracked,
            closed,
        };
        self.tx.mesh(owner, msg);
    }

    fn part_all(&mut self, conn: ConnId, c: Connection) {
        self.resyncing.end(conn);
        self.liveness.closed(conn);
        for joined in c.joins {
            self.part(conn, &c.key, joined, true);
        }
    }

    fn close_with(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        count_error(&mut self.errors, reason);
        self.close_uncounted(conn, code, reason);
    }

    /// A close whose count is kept elsewhere (or under another name).
    fn close_uncounted(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.tx.out.push(Output::Close { conn, code, reason });
        if let Some(c) = self.conns.remove(&conn) {
            self.part_all(conn, c);
        }
    }

    fn reply_ok(&mut self, conn: ConnId, jr: Option<&str>, r: Option<&str>, topic: &str) {
        self.buf.clear();
        encode::reply_ok(&mut self.buf, jr, r, topic, REPLY_EMPTY);
        self.tx.send(conn, &self.buf);
    }

    fn reply_error(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        reason: &'static str,
    ) {
        count_error(&mut self.errors, reason);
        self.buf.clear();
        encode::reply_error(&mut self.buf, jr, r, topic, reason);
        self.tx.send(conn, &self.buf);
    }

    // ---- answers and broadcasts arriving at the connection's shard ----------------------------

    fn drain_local(&mut self) {
        while let Some(msg) = self.tx.local.pop_front() {
            self.handle_mesh(msg);
        }
    }

    /// Messages for the connection side; the rest go to the owner side.
    fn handle_mesh(&mut self, msg: MeshMsg) {
        match msg {
            MeshMsg::Joined {
                topic,
                conn,
                seq,
                reply,
                adopted,
            } => self.joined_reply(topic, conn, seq, reply, adopted),
            MeshMsg::Diff { topic, frame } => {
                let frame: Frame = Rc::from(frame);
                for conn in self.subs.full(topic.as_str()) {
                    self.tx.send_frame(conn, frame.clone(), FrameKind::Diff);
                }
            }
            MeshMsg::Count { topic, keys, metas } => {
                // A count push carries each subscriber's join_ref, but clients of one app mostly
                // share join_refs: consecutive subscribers with the same one share the frame.
                let mut last: Option<(Option<&str>, Frame)> = None;
                for conn in self.subs.count(topic.as_str()) {
                    let jr = self
                        .conns
                        .get(&conn)
                        .and_then(|c| c.join_ref(topic.as_str()));
                    let frame = match &last {
                        Some((last_jr, frame)) if *last_jr == jr => frame.clone(),
                        _ => {
                            count_frame(&mut self.buf, jr, topic.as_str(), (keys, metas));
                            let frame: Frame = Rc::from(self.buf.as_slice());
                            last = Some((jr, frame.clone()));
                            frame
                        }
                    };
                    self.tx.send_frame(conn, frame, FrameKind::Other);
                }
            }
            MeshMsg::Adopt {
                topic,
                conn,
                alias,
                adopted,
            } => {
                let joined = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.joins.iter_mut().find(|j| j.topic == topic));
                if let Some(joined) = joined {
                    adopt(joined, (&self.router, &mut self.tx), topic, alias, adopted);
                }
            }
            MeshMsg::UserState {
                key,
                seq,
                presences,
            } => {
                let done =
                    self.watches
                        .user_state(key, seq, presences, &mut self.tx, &mut self.buf);
                for (conn, topic) in done {
                    self.complete_watch_join(conn, topic.as_str());
                }
            }
            MeshMsg::UserChanged { key, joins, leaves } => {
                self.watches.user_changed(key, joins, leaves)
            }
            msg @ (MeshMsg::UserTracked { .. }
            | MeshMsg::UserUntracked { .. }
            | MeshMsg::UserUpdated { .. }
            | MeshMsg::Watch { .. }
            | MeshMsg::Unwatch { .. }) => self.users.message(msg, &mut self.tx),
            msg => self.owner.message(
                msg,
                &mut Env {
                    now: self.now,
                    tx: &mut self.tx,
                    names: &mut self.names,
                },
            ),
        }
    }

    fn joined_reply(
        &mut self,
        topic: TopicName,
        conn: ConnId,
        seq: u32,
        reply: JoinedReply,
        adopted: Option<Box<(PhxRef, PhxRef)>>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(joined) = c
            .joins
            .iter_mut()
            .find(|j| j.topic == topic && j.seq == seq)
        else {
            return; // Left (or rejoined) while the reply was in flight.
        };
        if !std::mem::take(&mut joined.awaiting_reply) {
            return;
        }
        if let Some((alias, adopted)) = adopted.map(|pair| *pair) {
            adopt(
                joined,
                (&self.router, &mut self.tx),
                topic.clone(),
                alias,
                adopted,
            );
        }
        let jr: Option<Box<str>> = joined.join_ref().map(Box::from);
        let mode = joined.mode;
        // A slow consumer's diffs are being dropped: a full subscription that starts now gets
        // its state once the connection drains, not a state followed by lost diffs.
        let deferred = mode == PresenceMode::Full && self.resyncing.contains(conn);
        if deferred {
            joined.stale = true;
        } else {
            self.subs.add(&topic, conn, mode);
        }
        // A resync has no request to answer.
        if let Some(msg_ref) = self.answered(conn, seq) {
            self.reply_ok(conn, jr.as_deref(), msg_ref.as_deref(), topic.as_str());
        }
        if deferred {
            return;
        }
        self.buf.clear();
        match reply {
            JoinedReply::State(state) => {
                if let Some((last, last_jr, frame)) = &self.last_state {
                    if Arc::ptr_eq(last, &state) && *last_jr == jr {
                        self.tx.send_frame(conn, frame.clone(), FrameKind::State);
                        return;
                    }
                }
                encode::presence_state(&mut self.buf, jr.as_deref(), topic.as_str(), &state);
                let frame: Frame = Rc::from(self.buf.as_slice());
                self.tx.send_frame(conn, frame.clone(), FrameKind::State);
                self.last_state = Some((state, jr, frame));
                return;
            }
            JoinedReply::Count { keys, metas } => {
                count_frame(&mut self.buf, jr.as_deref(), topic.as_str(), (keys, metas))
            }
            JoinedReply::Nothing => return,
        }
        self.tx.send(conn, &self.buf);
    }
}

/// The presence held by the leave grace (or the twin's closed original) is this join's now,
/// unless an update already replaced it: the owner then resolved the alias, and the update's
/// ref stands. Tells the owner the alias is no longer used.
fn adopt(
    joined: &mut Joined,
    (router, tx): (&Router, &mut Outbox),
    topic: TopicName,
    alias: PhxRef,
    adopted: PhxRef,
) {
    if joined.tracked() != Some(alias) {
        return;
    }
    joined.set_tracked(adopted);
    tx.mesh(
        router.topic_owner(topic.as_str()),
        MeshMsg::Adopted { topic, alias },
    );
}

/// One more of `reason`. The reasons are PROTOCOL.md's handful, so a list beats a map.
fn count_error(errors: &mut Vec<(&'static str, u64)>, reason: &'static str) {
    match errors.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, n)) => *n += 1,
        None => errors.push((reason, 1)),
    }
}

/// `buf` = a presence_count push.
fn count_frame(buf: &mut Vec<u8>, jr: Option<&str>, topic: &str, (keys, metas): (u32, u32)) {
    buf.clear();
    encode::presence_count(buf, jr, topic, keys.into(), metas.into());
}

/// Refs are unique per process run: shard id in the top 16 bits, a per-shard counter below,
/// scrambled by the run's seed (xor keeps them distinct).
fn next_ref(shard: ShardId, counter: &mut u64, seed: u64) -> PhxRef {
    *counter += 1;
    PhxRef(((shard.0 as u64) << 48 | (*counter & ((1 << 48) - 1))) ^ seed)
}

fn stored_meta(
    buf: &mut Vec<u8>,
    meta: ClientMeta<'_>,
    forced: Option<ClientMeta<'_>>,
    phx_ref: PhxRef,
    prev: Option<PhxRef>,
) -> Meta {
    buf.clear();
    meta.encode(buf, forced, phx_ref, prev);
    Meta::new(buf)
}

/// The meta fields the connection's token forces on every meta it tracks.
fn forced(c: &Connection) -> Option<ClientMeta<'_>> {
    c.grants.as_ref().and_then(|g| g.meta())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One shard, one connection: every request must get exactly the reply PROTOCOL.md gives.
    fn shard() -> Shard {
        let config = Config {
            max_topics_per_conn: 2,
            max_meta_bytes: 16,
            ..Config::default()
        };
        let mut s = Shard::new(ShardId(0), config);
        s.open(ConnId(1), UserKey::new("u1"));
        s
    }

    fn texts(s: &mut Shard) -> Vec<String> {
        s.flush();
        s.outputs()
            .map(|o| match o {
                Output::Send { frame, .. } => String::from_utf8_lossy(&frame).into_owned(),
                Output::Close { code, reason, .. } => format!("close {} {reason}", code.0),
                Output::Mesh { to, msg } => panic!("one shard sends nothing to {to:?}: {msg:?}"),
            })
            .collect()
    }

    fn send(s: &mut Shard, frame: &str) -> Vec<String> {
        s.frame(ConnId(1), frame.as_bytes());
        texts(s)
    }

    #[test]
    fn join_replies_then_state_then_own_join_diff() {
        let mut s = shard();
        let out = send(&mut s, r#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
        assert_eq!(
            out[0],
            r#"["1","1","room","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(out[1], r#"["1",null,"room","presence_state",{}]"#);
        assert!(
            out[2].starts_with(
                r#"[null,null,"room","presence_diff",{"joins":{"u1":{"metas":[{"a":1,"phx_ref":"#
            ),
            "{}",
            out[2]
        );
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn every_error_of_the_contract() {
        let mut s = shard();
        let err = |jr: &str, r: &str, t: &str, reason: &str| {
            format!(
                r#"[{jr},"{r}","{t}","phx_reply",{{"status":"error","response":{{"reason":"{reason}"}}}}]"#
            )
        };
        assert_eq!(
            send(&mut s, r#"[null,"1","room","shout",{}]"#),
            [err("null", "1", "room", "unmatched topic")]
        );
        assert_eq!(
            send(
                &mut s,
                r#"["2","2","room","phx_join",{"meta":{"x":"0123456789"}}]"#
            ),
            [err(r#""2""#, "2", "room", "meta too large")]
        );
        send(&mut s, r#"["3","3","a","phx_join",{"track":false}]"#);
        assert_eq!(
            send(&mut s, r#"["3","4","a","shout",{}]"#),
            [err(r#""3""#, "4", "a", "unknown event")]
        );
        assert_eq!(
            send(&mut s, r#"["3","5","a","presence_update",{"meta":{}}]"#),
            [err(r#""3""#, "5", "a", "not tracked")]
        );
        assert_eq!(
            send(&mut s, r#"["9","6","a","shout",{}]"#),
            [err(r#""9""#, "6", "a", "unmatched topic")],
            "stale join_ref"
        );
        assert_eq!(
            send(&mut s, r#"["3","7","a","phx_join",{"track":"yes"}]"#),
            [err(r#""3""#, "7", "a", "track must be a boolean")]
        );
        send(&mut s, r#"["8","8","b","phx_join",{}]"#);
        assert_eq!(
            send(&mut s, r#"["9","9","c","phx_join",{}]"#),
            [err(r#""9""#, "9", "c", "too many channels joined")]
        );
        assert_eq!(
            send(&mut s, r#"[null,"10","phoenix","heartbeat",{}]"#),
            [r#"[null,"10","phoenix","phx_reply",{"status":"ok","response":{}}]"#]
        );
        let long_topic = "t".repeat(256);
        assert_eq!(
            send(
                &mut s,
                &format!(r#"["5","5","{long_topic}","phx_join",{{}}]"#)
            ),
            [err(r#""5""#, "5", &long_topic, "topic too long")]
        );
        assert_eq!(
            send(&mut s, r#"["6","6","never-joined","phx_join",{"track":1}]"#),
            [err(
                r#""6""#,
                "6",
                "never-joined",
                "track must be a boolean"
            )]
        );
        // Not a V2 message: closed with 1007, and its presences leave.
        assert_eq!(
            send(&mut s, "[1]"),
            ["close 1007 invalid frame: expected [join_ref, ref, topic, event, payload]"]
        );
        s.tick(Millis(0));
        assert_eq!(s.topic_view("b"), None);
        assert!(
            send(&mut s, r#"[null,"11","phoenix","heartbeat",{}]"#).is_empty(),
            "closed connection is forgotten"
        );
        assert!(s.is_empty(), "{:?}", s.stats());
    }

    #[test]
    fn an_overlong_ref_closes_the_connection() {
        let mut s = shard();
        send(&mut s, r#"["1","1","room","phx_join",{}]"#);
        let frame = format!(r#"["1","{}","room","shout",{{}}]"#, "r".repeat(65));
        assert_eq!(
            send(&mut s, &frame),
            ["close 1007 invalid frame: join_ref or ref too long"]
        );
        s.tick(Millis(0));
        assert!(s.is_empty(), "{:?}", s.stats());
    }

    #[test]
    fn update_is_leave_plus_join_with_prev() {
        let mut s = shard();
        send(&mut s, r#"["1","1","room","phx_join",{"meta":{"p":1}}]"#);
        let out = send(
            &mut s,
            r#"["1","2","room","presence_update",{"meta":{"p":2}}]"#,
        );
        assert_eq!(
            out[0],
            r#"["1","2","room","phx_reply",{"status":"ok","response":{}}]"#
        );
        let diff: serde_json::Value = serde_json::from_str(&out[1]).expect("JSON");
        let joined = &diff[4]["joins"]["u1"]["metas"][0];
        let left = &diff[4]["leaves"]["u1"]["metas"][0];
        assert_eq!(
            (&joined["p"], &left["p"]),
            (&2.into(), &1.into()),
            "{}",
            out[1]
        );
        assert_eq!(joined["phx_ref_prev"], left["phx_ref"], "{}", out[1]);
        assert_ne!(joined["phx_ref"], left["phx_ref"], "{}", out[1]);
    }

    /// One shard with a leave grace of 1 s.
    fn graced() -> Shard {
        let config = Config {
            leave_grace: Millis(1000),
            ..Config::default()
        };
        Shard::new(ShardId(0), config)
    }

    fn diff_of(text: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(v[3], "presence_diff", "{text}");
        v[4].clone()
    }

    #[test]
    fn a_reconnect_within_the_grace_takes_the_presence_over() {
        let mut s = graced();
        let (old, observer, new, newer) = (ConnId(1), ConnId(2), ConnId(3), ConnId(4));
        s.open(old, UserKey::new("u1"));
        s.open(observer, UserKey::new("obs"));
        s.frame(old, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
        s.frame(observer, br#"["1","1","room","phx_join",{"track":false}]"#);
        let out = texts(&mut s);
        let state: serde_json::Value =
            serde_json::from_str(out.last().expect("observer state")).expect("JSON");
        let held_ref = state[4]["u1"]["metas"][0]["phx_ref"].clone();
        // The socket drops; the same key is back within the grace with the same meta.
        s.close(old);
        s.tick(Millis(500));
        s.open(new, UserKey::new("u1"));
        s.frame(new, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
        let out = texts(&mut s);
        assert_eq!(
            out.len(),
            2,
            "reply and state to the new connection only: {out:?}"
        );
        let state: serde_json::Value = serde_json::from_str(&out[1]).expect("JSON");
        assert_eq!(
            state[4]["u1"]["metas"][0]["phx_ref"], held_ref,
            "{}",
            out[1]
        );
        s.tick(Millis(5000));
        assert!(texts(&mut s).is_empty(), "no leave when the grace ends");
        // Its update names the adopted presence.
        s.frame(
            new,
            br#"["1","2","room","presence_update",{"meta":{"a":3}}]"#,
        );
        let out = texts(&mut s);
        assert_eq!(
            diff_of(&out[1])["leaves"]["u1"]["metas"][0]["phx_ref"],
            held_ref
        );
        let updated = diff_of(&out[1])["joins"]["u1"]["metas"][0]["phx_ref"].clone();
        // Another drop, and a return with a different meta: one update diff.
        s.close(new);
        s.tick(Millis(5500));
        s.open(newer, UserKey::new("u1"));
        s.frame(newer, br#"["1","1","room","phx_join",{"meta":{"a":2}}]"#);
        let out = texts(&mut s);
        let diffs: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
        assert_eq!(
            diffs.len(),
            2,
            "one diff each to observer and joiner: {out:?}"
        );
        let d = diff_of(diffs[0]);
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], updated, "{d}");
        assert_eq!(d["joins"]["u1"]["metas"][0]["phx_ref_prev"], updated, "{d}");
        assert_eq!(d["joins"]["u1"]["metas"][0]["a"], 2, "{d}");
        // A drop with nobody coming back: the leave goes out when the grace ends.
        s.close(newer);
        assert!(texts(&mut s).is_empty(), "held, not left");
        s.tick(Millis(6600));
        let out = texts(&mut s);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(diff_of(&out[0])["leaves"]["u1"].is_object(), "{}", out[0]);
        s.close(observer);
        s.tick(Millis(7000));
        assert!(s.is_empty(), "{:?}", s.stats());
    }

    #[test]
    fn a_large_topic_sends_one_diff_per_window_and_one_state_to_its_joiners() {
        let config = Config {
            diff_window: Millis(50),
            large_topic_threshold: 3,
            ..Config::default()
        };
        let mut s = Shard::new(ShardId(0), config);
        for i in 1..=3 {
            s.open(ConnId(i), UserKey::new(&format!("u{i}")));
            s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
            s.flush();
        }
        // u3 made it large: its diff opened a window, which ends quietly.
        s.tick(Millis(60));
        s.outputs().for_each(drop);
        // Three joins: the first goes out at once and opens a window, the other two wait, and
        // so do their joiners.
        for i in 4..=6 {
            s.open(ConnId(i), UserKey::new(&format!("u{i}")));
            s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
            s.flush();
        }
        let out = texts(&mut s);
        let diffs = out.iter().filter(|f| f.contains("presence_diff")).count();
        let states = out.iter().filter(|f| f.contains("presence_state")).count();
        assert_eq!((diffs, states), (4, 1), "{out:?}");
        s.tick(Millis(120));
        let out = texts(&mut s);
        let diffs: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
        let states: Vec<&String> = out
            .iter()
            .filter(|f| f.contains("presence_state"))
            .collect();
        assert_eq!(
            diffs.len(),
            4,
            "one diff to each of the 4 earlier members: {out:?}"
        );
        assert_eq!(
            diff_of(diffs[0])["joins"].as_object().map(|o| o.len()),
            Some(2),
            "u5 and u6 in one diff: {}",
            diffs[0]
        );
        assert_eq!(
            states.len(),
            2,
            "u5 and u6 get their state at the window's end"
        );
        let payload =
            |f: &str| serde_json::from_str::<serde_json::Value>(f).expect("JSON")[4].clone();
        assert_eq!(payload(states[0]), payload(states[1]));
        assert_eq!(
            payload(states[0]).as_object().map(|o| o.len()),
            Some(6),
            "{}",
            states[0]
        );
        assert_eq!(s.stats().diffs_coalesced, 2);
    }

    /// The driver's clock is an input: a window opened between two ticks lasts its whole length
    /// from the moment of the diff that opened it, whatever the phase of the driver's ticks, and
    /// `poll_timeout` names its end.
    #[test]
    fn a_window_lasts_its_full_length_whatever_the_phase_of_the_ticks() {
        for phase in [0u64, 1, 17, 49] {
            let config = Config {
                diff_window: Millis(50),
                large_topic_threshold: 2,
                ..Config::default()
            };
            let mut s = Shard::new(ShardId(0), config);
            let ms = |t: u64| t * 1000;
            for i in 1..=2 {
                s.advance(ms(1000));
                s.open(ConnId(i), UserKey::new(&format!("u{i}")));
                s.frame(ConnId(i), br#"["1","1","big","phx_join",{}]"#);
                s.flush();
            }
            // Quiet until the window u2's join opened has ended.
            s.tick(Millis(1100));
            s.outputs().for_each(drop);
            // (The wheel looks at deadlines beyond its horizon early, to check them.)
            let due = s.poll_timeout();
            assert!(
                due.is_some_and(|d| d.0 > 60_000),
                "nothing but the heartbeat timeouts waits on time: {due:?}"
            );
            // A join between two ticks (the driver ticks at phase + k*50): its diff goes at once
            // and opens a window from this moment.
            let t0 = 1100 + phase + 3;
            s.advance(ms(t0));
            s.open(ConnId(3), UserKey::new("u3"));
            s.frame(ConnId(3), br#"["1","1","big","phx_join",{}]"#);
            s.flush();
            let diffs = |s: &mut Shard| {
                texts(s)
                    .iter()
                    .filter(|f| f.contains("presence_diff"))
                    .count()
            };
            assert_eq!(diffs(&mut s), 3, "u3's join to u1, u2 and u3 at once");
            assert_eq!(s.poll_timeout(), Some(Millis(t0 + 50)));
            // One more change right after: it waits for the window's end, not the next tick.
            s.advance(ms(t0 + 1));
            s.open(ConnId(4), UserKey::new("u4"));
            s.frame(ConnId(4), br#"["1","1","big","phx_join",{"track":false}]"#);
            s.frame(
                ConnId(1),
                br#"["1","2","big","presence_update",{"meta":{"n":1}}]"#,
            );
            s.flush();
            assert_eq!(diffs(&mut s), 0, "held by the window");
            // A driver tick that happens to fall 1 ms before the end sends nothing...
            s.tick(Millis(t0 + 49));
            assert_eq!(
                diffs(&mut s),
                0,
                "phase {phase}: the window is not cut short"
            );
            // ...and the one poll_timeout asked for sends the window's diff, and u4, which joined
            // inside the window, its state.
            s.tick(Millis(t0 + 50));
            let out = texts(&mut s);
            let count = |what: &str| out.iter().filter(|f| f.contains(what)).count();
            assert_eq!(
                (count("presence_diff"), count("presence_state")),
                (3, 1),
                "phase {phase}: {out:?}"
            );
        }
    }

    #[test]
    fn a_reconnect_before_the_old_connection_closes_is_a_twin() {
        let mut s = graced();
        let (old, observer, new, tab) = (ConnId(1), ConnId(2), ConnId(3), ConnId(4));
        s.open(observer, UserKey::new("obs"));
        s.frame(observer, br#"["1","1","room","phx_join",{"track":false}]"#);
        s.open(old, UserKey::new("u1"));
        s.frame(old, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
        let out = texts(&mut s);
        let first =
            diff_of(out.last().expect("the join"))["joins"]["u1"]["metas"][0]["phx_ref"].clone();
        // The reconnect arrives before the old socket is seen closing: nobody hears of it...
        s.open(new, UserKey::new("u1"));
        s.frame(new, br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#);
        let out = texts(&mut s);
        assert!(out.iter().all(|f| !f.contains("presence_diff")), "{out:?}");
        assert_eq!(s.stats().twins, 1);
        // ...nor of the old one closing: the new connection has its presence now.
        s.close(old);
        s.tick(Millis(5000));
        assert!(texts(&mut s).is_empty());
        s.frame(
            new,
            br#"["1","2","room","presence_update",{"meta":{"a":2}}]"#,
        );
        let out = texts(&mut s);
        let d = diff_of(&out[1]);
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], first, "{d}");
        assert_eq!(
            s.topic_view("room").map(|v| v.presences[0].1.len()),
            Some(1)
        );
        // A second tab with the same meta whose twin stays open: announced when its grace ends.
        s.open(tab, UserKey::new("u1"));
        s.frame(tab, br#"["1","1","room","phx_join",{"meta":{"a":2}}]"#);
        assert!(texts(&mut s).iter().all(|f| !f.contains("presence_diff")));
        s.tick(Millis(6100));
        let out = texts(&mut s);
        let joins: Vec<&String> = out.iter().filter(|f| f.contains("presence_diff")).collect();
        assert_eq!(
            joins.len(),
            3,
            "observer, new and tab each see the tab: {out:?}"
        );
        assert_eq!(
            s.topic_view("room").map(|v| v.presences[0].1.len()),
            Some(2)
        );
    }

    #[test]
    fn a_presence_held_taken_over_and_held_again_keeps_its_second_grace() {
        let mut s = graced();
        s.open(ConnId(9), UserKey::new("obs"));
        s.frame(ConnId(9), br#"["1","1","room","phx_join",{"track":false}]"#);
        s.open(ConnId(1), UserKey::new("u1"));
        s.frame(
            ConnId(1),
            br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#,
        );
        texts(&mut s);
        s.close(ConnId(1)); // held until 1000
        s.tick(Millis(100));
        s.open(ConnId(2), UserKey::new("u1"));
        s.frame(
            ConnId(2),
            br#"["1","1","room","phx_join",{"meta":{"a":1}}]"#,
        );
        s.tick(Millis(200));
        s.close(ConnId(2)); // held again, until 1200
        assert!(texts(&mut s).iter().all(|f| !f.contains("presence_diff")));
        s.tick(Millis(1000));
        assert!(
            texts(&mut s).is_empty(),
            "the first hold's end must not release the second"
        );
        s.tick(Millis(1300));
        let out = texts(&mut s);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(diff_of(&out[0])["leaves"]["u1"].is_object());
        assert_eq!(s.stats().grace_expired, 1);
    }
}
