//! Joining a topic: the request to its owner, the owner's answer (ok, then the state or the
//! count), and takeovers of held presences.

use super::*;
use crate::core::ids::next_ref;

impl Shard {
    pub(super) fn join(
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
            self.part(conn, &key, old, Reason::Left);
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
    pub(super) fn push_join(
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

    /// A join still waiting for its owner is being left or replaced. Phoenix answers a join
    /// before it reads the next message, so the client would have had its ok by now: send it, so
    /// that no request goes unanswered. The state that would follow is moot.
    pub(super) fn abandon_join(&mut self, conn: ConnId, joined: &Joined) {
        if let Some((msg_ref, _)) = self.awaiting.remove(&(conn, joined.seq)) {
            let topic = joined.topic.as_str();
            self.reply_ok(conn, joined.join_ref(), msg_ref.as_deref(), topic);
        }
    }

    pub(super) fn joined_reply(
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
pub(super) fn adopt(
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

/// `buf` = a presence_count push.
pub(super) fn count_frame(
    buf: &mut Vec<u8>,
    jr: Option<&str>,
    topic: &str,
    (keys, metas): (u32, u32),
) {
    buf.clear();
    encode::presence_count(buf, jr, topic, keys.into(), metas.into());
}

pub(super) fn stored_meta(
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
pub(super) fn forced(c: &Connection) -> Option<ClientMeta<'_>> {
    c.grants.as_ref().and_then(|g| g.meta())
}
