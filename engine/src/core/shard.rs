//! The shard state machine: client frames and shard messages in, frames and shard messages out.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use ahash::RandomState;
use roster_proto::encode;
use roster_proto::{
    decode, ClientEvent, ClientMessage, ClientMeta, JoinRequest, PhxRef, PresenceMode,
};

use crate::core::connection::{Connection, Joined};
use crate::core::names::Names;
use crate::core::subscribers::LocalSubs;
use crate::core::topic::Topic;
use crate::core::user::Users;
use crate::core::{
    CloseCode, Config, ConnAddr, ConnId, Frame, JoinMsg, JoinedReply, MeshMsg, Meta, Millis,
    TopicName, TopicView, Track, UserKey,
};
use crate::mesh::{Router, ShardId};

/// Something the driver must do.
#[derive(Debug)]
pub enum Output {
    /// Write `frame` to local connection `conn`.
    Send { conn: ConnId, frame: Frame },
    /// Close `conn` with this WebSocket close code and reason. The shard has already forgotten the
    /// connection (its presences are leaving); feeding it more frames does nothing.
    Close {
        conn: ConnId,
        code: CloseCode,
        reason: &'static str,
    },
    /// Put `msg` on the ring to shard `to`. Rings must deliver in order per (from, to) pair.
    Mesh { to: ShardId, msg: MeshMsg },
}

/// Sizes of a shard's tables, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub connections: usize,
    pub topics_owned: usize,
    pub presences_owned: usize,
    pub users_owned: usize,
    pub subscribed_topics: usize,
}

/// Messages to this shard itself go through a local queue instead of a ring, but are handled by
/// the same code as messages from other shards.
struct Outbox {
    me: ShardId,
    local: VecDeque<MeshMsg>,
    out: Vec<Output>,
}

impl Outbox {
    fn mesh(&mut self, to: ShardId, msg: MeshMsg) {
        if to == self.me {
            self.local.push_back(msg);
        } else {
            self.out.push(Output::Mesh { to, msg });
        }
    }
}

const REPLY_EMPTY: &[u8] = b"{}";

pub struct Shard {
    id: ShardId,
    router: Router,
    config: Config,
    conns: HashMap<ConnId, Connection, RandomState>,
    topics: HashMap<TopicName, Topic, RandomState>,
    /// Topics with changes not yet sent as a diff.
    to_flush: Vec<TopicName>,
    /// Topics whose counts changed since the last `presence_count` push.
    to_count: Vec<TopicName>,
    users: Users,
    subs: LocalSubs,
    names: Names,
    /// `ref` of each phx_join still waiting for its owner, by (connection, join seq).
    awaiting: HashMap<(ConnId, u32), Option<Box<str>>, RandomState>,
    tx: Outbox,
    /// Scratch for encoding; its capacity is reused across frames.
    buf: Vec<u8>,
    next_ref: u64,
    join_seq: u32,
}

impl Shard {
    pub fn new(id: ShardId, config: Config) -> Self {
        assert!(id.0 < config.shards, "shard {} of {}", id.0, config.shards);
        Shard {
            id,
            router: Router::new(config.shards),
            config,
            conns: HashMap::default(),
            topics: HashMap::default(),
            to_flush: Vec::new(),
            to_count: Vec::new(),
            users: Users::default(),
            subs: LocalSubs::default(),
            awaiting: HashMap::default(),
            names: Names::default(),
            tx: Outbox {
                me: id,
                local: VecDeque::new(),
                out: Vec::new(),
            },
            buf: Vec::with_capacity(4096),
            next_ref: 0,
            join_seq: 0,
        }
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    /// Outputs produced so far, in the order they must be carried out.
    pub fn outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.tx.out.drain(..)
    }

    /// A connection accepted on this shard, identified as `key`.
    pub fn open(&mut self, conn: ConnId, key: UserKey) {
        if let Some(old) = self.conns.insert(conn, Connection::new(key)) {
            // The driver reused an id without closing; leave the old connection's topics.
            self.part_all(conn, old);
        }
        self.drain_local();
    }

    /// The connection is gone (socket closed, timed out, or the driver closed it).
    pub fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            self.part_all(conn, c);
        }
        self.drain_local();
    }

    /// A text frame from a local connection.
    pub fn frame(&mut self, conn: ConnId, bytes: &[u8]) {
        if !self.conns.contains_key(&conn) {
            return;
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

    /// End of a batch of inputs: broadcast every topic's pending changes as one diff each.
    pub fn flush(&mut self) {
        while !self.to_flush.is_empty() {
            for name in std::mem::take(&mut self.to_flush) {
                if let Some(t) = self.topics.get_mut(&name) {
                    t.listed_for_flush = false;
                }
                self.flush_topic(&name);
                self.forget_if_idle(&name);
            }
            self.drain_local();
        }
    }

    /// Time passes: throttled count pushes fall due.
    pub fn tick(&mut self, now: Millis) {
        let interval = self.config.count_interval;
        let mut keep = Vec::new();
        for name in std::mem::take(&mut self.to_count) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            if t.count_shards().next().is_none() {
                // Nobody to tell; a later count subscriber gets counts in its join reply.
                t.take_count_due(now, Millis(0));
            } else if t.take_count_due(now, interval) {
                let (keys, metas) = t.counts();
                for shard in t.count_shards() {
                    self.tx.mesh(
                        shard,
                        MeshMsg::Count {
                            topic: name.clone(),
                            keys,
                            metas,
                        },
                    );
                }
            } else {
                keep.push(name);
                continue;
            }
            if let Some(t) = self.topics.get_mut(&name) {
                t.listed_for_count = false;
            }
            self.forget_if_idle(&name);
        }
        self.to_count = keep;
        self.drain_local();
    }

    pub fn stats(&self) -> ShardStats {
        ShardStats {
            connections: self.conns.len(),
            topics_owned: self.topics.len(),
            presences_owned: self.topics.values().map(|t| t.counts().1 as usize).sum(),
            users_owned: self.users.len(),
            subscribed_topics: self.subs.topics(),
        }
    }

    /// Nothing at all is held: no connection, topic, user, subscription or queued work.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
            && self.topics.is_empty()
            && self.users.len() == 0
            && self.subs.topics() == 0
            && self.to_flush.is_empty()
            && self.to_count.is_empty()
            && self.awaiting.is_empty()
            && self.names.in_use() == 0
            && self.tx.local.is_empty()
    }

    /// The presences of a topic this shard owns.
    pub fn topic_view(&self, topic: &str) -> Option<TopicView> {
        self.topics.get(topic).map(Topic::view)
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
                self.part(conn, &key, joined);
                self.reply_ok(conn, jr, r, topic);
            }
            ClientEvent::PresenceUpdate(meta) => self.update(conn, at, jr, r, topic, meta),
            // Watch lists are not built yet (issue: watch lists); until then they are unknown.
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
        if let Some(at) = c.position(topic) {
            // As Phoenix does: a second join of a joined topic closes the first channel.
            let old = c.joins.swap_remove(at);
            let key = c.key.clone();
            self.abandon_join(conn, &old);
            self.buf.clear();
            encode::phx_close(&mut self.buf, old.join_ref(), topic);
            self.send_buf(conn);
            self.part(conn, &key, old);
        }
        let c = self.conns.get_mut(&conn).expect("checked above");
        if c.joins.len() >= self.config.max_topics_per_conn {
            return self.reply_error(conn, jr, r, topic, "too many channels joined");
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
                meta: stored_meta(&mut self.buf, req.meta, phx_ref, None),
            }
        });
        // Per shard, not per connection: connection ids are reused, and a reply to a closed
        // connection's join must never match a new connection's join.
        self.join_seq = self.join_seq.wrapping_add(1);
        let seq = self.join_seq;
        c.push(Joined::new(
            name.clone(),
            jr,
            seq,
            req.presence,
            track.as_ref().map(|t| t.phx_ref),
        ));
        self.awaiting.insert((conn, seq), r.map(Box::from));
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
            })),
        );
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
        let joined = &mut c.joins[at];
        let Some(old) = joined.tracked() else {
            return self.reply_error(conn, jr, r, topic, "not tracked");
        };
        let phx_ref = next_ref(self.id, &mut self.next_ref, self.config.ref_seed);
        let new = Track {
            key: c.key.clone(),
            phx_ref,
            meta: stored_meta(&mut self.buf, meta, phx_ref, Some(old)),
        };
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
        if let Some(msg_ref) = self.awaiting.remove(&(conn, joined.seq)) {
            self.buf.clear();
            let topic = joined.topic.as_str();
            encode::reply_ok(
                &mut self.buf,
                joined.join_ref(),
                msg_ref.as_deref(),
                topic,
                REPLY_EMPTY,
            );
            self.send_buf(conn);
        }
    }

    /// The connection no longer has `joined`: stop delivering to it and tell the owner.
    fn part(&mut self, conn: ConnId, key: &UserKey, joined: Joined) {
        if joined.awaiting_reply {
            self.awaiting.remove(&(conn, joined.seq));
        } else {
            self.subs.remove(joined.topic.as_str(), conn, joined.mode);
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
        };
        self.tx.mesh(owner, msg);
    }

    fn part_all(&mut self, conn: ConnId, c: Connection) {
        for joined in c.joins {
            self.part(conn, &c.key, joined);
        }
    }

    fn close_with(&mut self, conn: ConnId, code: CloseCode, reason: &'static str) {
        self.tx.out.push(Output::Close { conn, code, reason });
        if let Some(c) = self.conns.remove(&conn) {
            self.part_all(conn, c);
        }
    }

    fn reply_ok(&mut self, conn: ConnId, jr: Option<&str>, r: Option<&str>, topic: &str) {
        self.buf.clear();
        encode::reply_ok(&mut self.buf, jr, r, topic, REPLY_EMPTY);
        self.send_buf(conn);
    }

    fn reply_error(
        &mut self,
        conn: ConnId,
        jr: Option<&str>,
        r: Option<&str>,
        topic: &str,
        reason: &str,
    ) {
        self.buf.clear();
        encode::reply_error(&mut self.buf, jr, r, topic, reason);
        self.send_buf(conn);
    }

    fn send_buf(&mut self, conn: ConnId) {
        self.tx.out.push(Output::Send {
            conn,
            frame: Rc::from(self.buf.as_slice()),
        });
    }

    // ---- mesh side ---------------------------------------------------------------------------

    fn drain_local(&mut self) {
        while let Some(msg) = self.tx.local.pop_front() {
            self.handle_mesh(msg);
        }
    }

    fn handle_mesh(&mut self, msg: MeshMsg) {
        match msg {
            MeshMsg::Join(j) => self.owner_join(*j),
            MeshMsg::Update {
                topic,
                from: _,
                old,
                new,
            } => {
                let Some(topic) = self.topics.get_key_value(&topic).map(|(k, _)| k.clone()) else {
                    return;
                };
                let t = self.topics.get_mut(&topic).expect("looked up above");
                if t.untrack(&new.key, old).is_some() {
                    let user_owner = self.router.user_owner(new.key.as_str());
                    let msg = MeshMsg::UserUntracked {
                        topic: topic.clone(),
                        key: new.key.clone(),
                        phx_ref: old,
                    };
                    self.tx.mesh(user_owner, msg);
                }
                t.track(new.key.clone(), new.meta.clone());
                self.tx.mesh(
                    self.router.user_owner(new.key.as_str()),
                    MeshMsg::UserTracked {
                        topic: topic.clone(),
                        track: new,
                    },
                );
                note_change(&mut self.to_flush, &mut self.to_count, &topic, t);
            }
            MeshMsg::Leave {
                topic,
                from,
                mode,
                tracked,
            } => {
                let Some(t) = self.topics.get_mut(&topic) else {
                    return;
                };
                t.unsubscribe(from.shard, mode);
                if let Some((key, phx_ref)) = tracked {
                    if t.untrack(&key, phx_ref).is_some() {
                        let user_owner = self.router.user_owner(key.as_str());
                        self.tx.mesh(
                            user_owner,
                            MeshMsg::UserUntracked {
                                topic: topic.clone(),
                                key,
                                phx_ref,
                            },
                        );
                    }
                }
                note_change(&mut self.to_flush, &mut self.to_count, &topic, t);
                self.forget_if_idle(&topic);
            }
            MeshMsg::Joined {
                topic,
                conn,
                seq,
                reply,
            } => self.joined_reply(topic, conn, seq, reply),
            MeshMsg::Diff { topic, frame } => {
                let frame: Frame = Rc::from(frame);
                for conn in self.subs.full(topic.as_str()) {
                    self.tx.out.push(Output::Send {
                        conn,
                        frame: frame.clone(),
                    });
                }
            }
            MeshMsg::Count { topic, keys, metas } => {
                for conn in self.subs.count(topic.as_str()) {
                    let jr = self
                        .conns
                        .get(&conn)
                        .and_then(|c| c.join_ref(topic.as_str()));
                    self.buf.clear();
                    encode::presence_count(
                        &mut self.buf,
                        jr,
                        topic.as_str(),
                        keys.into(),
                        metas.into(),
                    );
                    self.tx.out.push(Output::Send {
                        conn,
                        frame: Rc::from(self.buf.as_slice()),
                    });
                }
            }
            MeshMsg::UserTracked { topic, track } => {
                self.users.tracked(track.key, topic, track.meta);
            }
            MeshMsg::UserUntracked {
                topic,
                key,
                phx_ref,
            } => self.users.untracked(&key, &topic, phx_ref),
        }
    }

    fn owner_join(&mut self, j: JoinMsg) {
        if self.topics.get(&j.topic).is_some_and(Topic::has_pending) {
            // The joiner's state must be exactly "everything before the diffs it will get".
            self.flush_topic(&j.topic);
        }
        // The owner's own copy of the name goes into every table, so that names arriving in
        // messages are dropped instead of kept once per presence.
        let name = match self.topics.get_key_value(&j.topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name = self.names.intern(j.topic.as_str());
                self.topics.insert(name.clone(), Topic::default());
                name
            }
        };
        let t = self.topics.get_mut(&name).expect("inserted above");
        t.subscribe(j.from.shard, j.mode);
        // The state is taken before the joiner's own presence goes in: that presence reaches it
        // in the next diff like everyone else's, so a join and leave that cancel out within one
        // batch were never seen by anyone.
        let state = (j.mode == PresenceMode::Full).then(|| {
            self.buf.clear();
            t.encode_state(&mut self.buf);
            Box::<[u8]>::from(self.buf.as_slice())
        });
        if let Some(track) = j.track {
            t.track(track.key.clone(), track.meta.clone());
            let user_owner = self.router.user_owner(track.key.as_str());
            self.tx.mesh(
                user_owner,
                MeshMsg::UserTracked {
                    topic: name.clone(),
                    track,
                },
            );
            note_change(&mut self.to_flush, &mut self.to_count, &name, t);
        }
        let reply = match (state, j.mode) {
            (Some(state), _) => JoinedReply::State(state),
            (None, PresenceMode::Count) => {
                let (keys, metas) = t.counts();
                JoinedReply::Count { keys, metas }
            }
            (None, _) => JoinedReply::Nothing,
        };
        let msg = MeshMsg::Joined {
            topic: j.topic,
            conn: j.from.conn,
            seq: j.seq,
            reply,
        };
        self.tx.mesh(j.from.shard, msg);
    }

    fn joined_reply(&mut self, topic: TopicName, conn: ConnId, seq: u32, reply: JoinedReply) {
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
        let msg_ref = self.awaiting.remove(&(conn, seq)).flatten();
        let jr: Option<Box<str>> = joined.join_ref().map(Box::from);
        self.subs.add(&topic, conn, joined.mode);
        self.buf.clear();
        encode::reply_ok(
            &mut self.buf,
            jr.as_deref(),
            msg_ref.as_deref(),
            topic.as_str(),
            REPLY_EMPTY,
        );
        self.send_buf(conn);
        self.buf.clear();
        match reply {
            JoinedReply::State(state) => {
                encode::presence_state(&mut self.buf, jr.as_deref(), topic.as_str(), &state)
            }
            JoinedReply::Count { keys, metas } => encode::presence_count(
                &mut self.buf,
                jr.as_deref(),
                topic.as_str(),
                keys.into(),
                metas.into(),
            ),
            JoinedReply::Nothing => return,
        }
        self.send_buf(conn);
    }

    fn flush_topic(&mut self, name: &TopicName) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        if t.full_shards().next().is_none() {
            // Nobody to tell: later subscribers get all of it in their state.
            t.discard_pending();
            return;
        }
        self.buf.clear();
        if !t.take_diff(name.as_str(), &mut self.buf) {
            return;
        }
        for shard in t.full_shards() {
            self.tx.mesh(
                shard,
                MeshMsg::Diff {
                    topic: name.clone(),
                    frame: self.buf.as_slice().into(),
                },
            );
        }
    }

    fn forget_if_idle(&mut self, name: &TopicName) {
        if self.topics.get(name).is_some_and(Topic::is_idle) {
            self.topics.remove(name);
        }
    }
}

/// Puts a changed topic on the lists that `flush` and `tick` walk, once each.
fn note_change(
    to_flush: &mut Vec<TopicName>,
    to_count: &mut Vec<TopicName>,
    name: &TopicName,
    t: &mut Topic,
) {
    if t.has_pending() && !t.listed_for_flush {
        t.listed_for_flush = true;
        to_flush.push(name.clone());
    }
    if t.count_dirty() && !t.listed_for_count {
        t.listed_for_count = true;
        to_count.push(name.clone());
    }
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
    phx_ref: PhxRef,
    prev: Option<PhxRef>,
) -> Meta {
    buf.clear();
    meta.encode(buf, None, phx_ref, prev);
    Meta::new(buf)
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
}
