//! The shard as topic owner (authoritative presence lists, diffs, coalescing windows, leave
//! grace, counts) and as user owner (where each user is, who watches them).

use std::sync::Arc;

use roster_proto::meta::restamp_prev;
use roster_proto::{PhxRef, PresenceMode};

use crate::core::outbox::Outbox;
use crate::core::topic::{Topic, Twin, Waiter};
use crate::core::Shard;
use crate::core::{
    ConnAddr, JoinMsg, JoinedReply, MeshMsg, Meta, Millis, TopicName, Track, UserKey,
};
use crate::mesh::{Router, ShardId};

/// Where a topic's changes go: to the user owner, and onto the flush and count lists. Borrowed
/// beside the topic itself, so that a change costs one table lookup.
struct Sink<'a> {
    router: &'a Router,
    tx: &'a mut Outbox,
    to_flush: &'a mut Vec<TopicName>,
    to_count: &'a mut Vec<TopicName>,
}

/// A [`Sink`] of `$shard`'s fields, usable while one of its topics is borrowed.
macro_rules! sink {
    ($shard:expr) => {
        Sink {
            router: &$shard.router,
            tx: &mut $shard.tx,
            to_flush: &mut $shard.to_flush,
            to_count: &mut $shard.to_count,
        }
    };
}

impl Sink<'_> {
    /// Tracks a presence and tells everyone.
    fn announce(&mut self, t: &mut Topic, name: &TopicName, track: Track) {
        t.track(track.key.clone(), track.meta.clone());
        let user_owner = self.router.user_owner(track.key.as_str());
        let msg = MeshMsg::UserTracked {
            topic: name.clone(),
            track,
        };
        self.tx.mesh(user_owner, msg);
        note_change(self.to_flush, self.to_count, name, t);
    }

    /// Removes a presence and tells everyone (nothing if it is not here).
    fn untrack(&mut self, t: &mut Topic, name: &TopicName, key: UserKey, phx_ref: PhxRef) {
        if t.untrack(&key, phx_ref).is_some() {
            let user_owner = self.router.user_owner(key.as_str());
            let msg = MeshMsg::UserUntracked {
                topic: name.clone(),
                key,
                phx_ref,
            };
            self.tx.mesh(user_owner, msg);
            note_change(self.to_flush, self.to_count, name, t);
        }
    }
}

impl Shard {
    pub(crate) fn owner_message(&mut self, msg: MeshMsg) {
        match msg {
            MeshMsg::Join(j) => self.owner_join(*j),
            MeshMsg::Update {
                topic, old, new, ..
            } => self.owner_update(topic, old, new),
            MeshMsg::Leave {
                topic,
                from,
                mode,
                tracked,
                closed,
            } => self.owner_leave(topic, from.shard, mode, tracked, closed),
            MeshMsg::Adopted { topic, alias } => {
                if let Some(t) = self.topics.get_mut(&topic) {
                    t.resolve(alias);
                }
                self.forget_if_idle(&topic);
            }
            MeshMsg::UserTracked { topic, track } => {
                if self.users.watchers(track.key.as_str()).is_empty() {
                    self.users.tracked(track.key, topic, track.meta);
                } else {
                    self.users
                        .tracked(track.key.clone(), topic.clone(), track.meta.clone());
                    self.tell_watchers(&track.key, vec![(topic, track.meta)], Vec::new());
                }
            }
            MeshMsg::UserUntracked {
                topic,
                key,
                phx_ref,
            } => {
                if let Some(meta) = self.users.untracked(&key, &topic, phx_ref) {
                    self.tell_watchers(&key, Vec::new(), vec![(topic, meta)]);
                }
            }
            MeshMsg::UserUpdated { topic, old, track } => {
                let left = self.users.untracked(&track.key, &topic, old);
                self.users
                    .tracked(track.key.clone(), topic.clone(), track.meta.clone());
                let leaves = left.map(|m| vec![(topic.clone(), m)]).unwrap_or_default();
                self.tell_watchers(&track.key, vec![(topic, track.meta)], leaves);
            }
            MeshMsg::Watch { key, from, seq } => {
                let presences = self.users.presences(key.as_str());
                self.users.watch(key.clone(), from);
                let msg = MeshMsg::UserState {
                    key,
                    seq,
                    presences,
                };
                self.tx.mesh(from, msg);
            }
            MeshMsg::Unwatch { key, from } => self.users.unwatch(&key, from),
            // Connection-side messages are handled before they get here.
            MeshMsg::Joined { .. }
            | MeshMsg::Adopt { .. }
            | MeshMsg::Diff { .. }
            | MeshMsg::Count { .. }
            | MeshMsg::UserState { .. }
            | MeshMsg::UserChanged { .. } => {}
        }
    }

    fn tell_watchers(
        &mut self,
        key: &UserKey,
        joins: Vec<(TopicName, Meta)>,
        leaves: Vec<(TopicName, Meta)>,
    ) {
        let shards = self.users.watchers(key.as_str());
        let Some((&last, rest)) = shards.split_last() else {
            return;
        };
        for &shard in rest {
            let msg = MeshMsg::UserChanged {
                key: key.clone(),
                joins: joins.clone(),
                leaves: leaves.clone(),
            };
            self.tx.mesh(shard, msg);
        }
        let msg = MeshMsg::UserChanged {
            key: key.clone(),
            joins,
            leaves,
        };
        self.tx.mesh(last, msg);
    }

    /// The owner's own copy of a topic name, creating the topic if needed: names arriving in
    /// messages are dropped instead of kept once per presence.
    fn owned_name(&mut self, topic: &TopicName) -> TopicName {
        match self.topics.get_key_value(topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name = self.names.intern(topic.as_str());
                self.topics.insert(name.clone(), Topic::new(self.seeds));
                name
            }
        }
    }

    fn owner_join(&mut self, j: JoinMsg) {
        let name = self.owned_name(&j.topic);
        let t = self.topics.get_mut(&name).expect("created above");
        if !j.resync {
            t.subscribe(j.from.shard, j.mode);
        }
        let in_window = t.window_until.is_some();
        if j.mode == PresenceMode::Full && in_window {
            // Answered with everyone else of this window, from one state, when it ends.
            let adopted = j.track.and_then(|track| self.track(&name, track, j.from));
            let t = self.topics.get_mut(&name).expect("created above");
            t.wait(Waiter {
                shard: j.from.shard,
                conn: j.from.conn,
                seq: j.seq,
                adopted,
            });
            return;
        }
        let mut state = None;
        if j.mode == PresenceMode::Full {
            if t.has_pending() {
                // The joiner's state must be exactly "everything before the diffs it will get".
                self.flush_now(&name);
            }
            state = Some(self.encode_state(&name));
        }
        // The state was taken before the joiner's own presence goes in: that presence reaches it
        // in the next diff like everyone else's, so a join and leave that cancel out within one
        // batch were never seen by anyone.
        let adopted = j.track.and_then(|track| self.track(&name, track, j.from));
        let reply = match (state, j.mode) {
            (Some(state), _) => JoinedReply::State(state),
            (None, PresenceMode::Count) => {
                let t = self.topics.get(&name).expect("created above");
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
            adopted,
        };
        self.tx.mesh(j.from.shard, msg);
    }

    fn encode_state(&mut self, name: &TopicName) -> Arc<[u8]> {
        self.buf.clear();
        if let Some(t) = self.topics.get(name) {
            t.encode_state(&mut self.buf);
        }
        Arc::from(self.buf.as_slice())
    }

    /// Tracks a joiner's presence, or lets it take over one the leave grace holds for its key.
    /// Returns `(its own ref, the held ref it adopted)` when the metas are equal (nothing
    /// changes then). With a leave grace, a presence equal to one its key already has here is a
    /// twin: not announced until its grace ends (see [`Twin`]).
    fn track(
        &mut self,
        name: &TopicName,
        track: Track,
        from: ConnAddr,
    ) -> Option<Box<(PhxRef, PhxRef)>> {
        let grace = self.config.leave_grace;
        let t = self.topics.get_mut(name).expect("caller made it");
        let taken = t.take_held(&track.key, &track.meta);
        self.stats.takeovers += u64::from(taken.is_some());
        match taken {
            Some((held, true)) => {
                t.add_alias(track.phx_ref, held);
                Some(Box::new((track.phx_ref, held)))
            }
            Some((held, false)) => {
                // One update diff: the held meta leaves, the new one joins in its place.
                self.buf.clear();
                restamp_prev(track.meta.bytes(), held, &mut self.buf);
                let track = Track {
                    meta: Meta::new(&self.buf),
                    ..track
                };
                self.replace(name, held, track);
                None
            }
            None if grace.0 > 0 && t.has_same(&track.key, &track.meta) => {
                let until = Millis(self.now.0.saturating_add(grace.0));
                t.add_twin(Twin { track, from, until });
                self.stats.twins += 1;
                // Expiry pops from the front: the queue stays in deadline order because the
                // grace is one length and time never goes back.
                debug_assert!(self.twins_due.back().is_none_or(|b| b.0 <= until));
                self.twins_due.push_back((until, name.clone()));
                None
            }
            None => {
                sink!(self).announce(t, name, track);
                None
            }
        }
    }

    /// Tracks a presence and tells everyone.
    fn announce(&mut self, name: &TopicName, track: Track) {
        if let Some(t) = self.topics.get_mut(name) {
            sink!(self).announce(t, name, track);
        }
    }

    /// Twins whose grace ended without their twin closing are announced.
    pub(crate) fn announce_twins(&mut self) {
        while let Some((until, _)) = self.twins_due.front() {
            if until.0 > self.now.0 {
                break;
            }
            let (_, name) = self.twins_due.pop_front().expect("front exists");
            let now = self.now;
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            for twin in t.due_twins(now) {
                self.announce(&name, twin.track);
            }
            self.forget_if_idle(&name);
        }
    }

    fn owner_update(&mut self, topic: TopicName, old: PhxRef, new: Track) {
        let Some(name) = self.topics.get_key_value(&topic).map(|(k, _)| k.clone()) else {
            return;
        };
        let t = self.topics.get_mut(&name).expect("looked up above");
        if t.remove_twin(old).is_some() {
            // Never announced: the new meta is simply a join.
            return self.announce(&name, new);
        }
        let old = t.resolve(old);
        self.replace(&name, old, new);
    }

    /// Presence `old` of `track.key` is replaced by `track`: one diff leaves the old and joins
    /// the new, and the user owner (so watchers) hears of both at once.
    fn replace(&mut self, name: &TopicName, old: PhxRef, track: Track) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        let replaced = t.untrack(&track.key, old).is_some();
        t.track(track.key.clone(), track.meta.clone());
        let user_owner = self.router.user_owner(track.key.as_str());
        let topic = name.clone();
        let msg = if replaced {
            MeshMsg::UserUpdated { topic, old, track }
        } else {
            MeshMsg::UserTracked { topic, track }
        };
        self.tx.mesh(user_owner, msg);
        note_change(&mut self.to_flush, &mut self.to_count, name, t);
    }

    fn owner_leave(
        &mut self,
        topic: TopicName,
        from: ShardId,
        mode: PresenceMode,
        tracked: Option<(UserKey, PhxRef)>,
        closed: bool,
    ) {
        let graced = closed && self.config.leave_grace.0 > 0;
        let Some(t) = self.topics.get_mut(&topic) else {
            return;
        };
        t.unsubscribe(from, mode);
        match tracked {
            Some((key, phx_ref)) if graced || t.in_grace() => {
                self.leave_presence(&topic, key, phx_ref, graced)
            }
            // The common case: no grace bookkeeping on this topic.
            Some((key, phx_ref)) => sink!(self).untrack(t, &topic, key, phx_ref),
            None => {}
        }
        self.forget_if_idle(&topic);
    }

    /// A connection's presence ends. `graced`: its connection closed and a leave grace is set,
    /// so a twin takes its place unseen, or it is held for a reconnect.
    fn leave_presence(&mut self, topic: &TopicName, key: UserKey, phx_ref: PhxRef, graced: bool) {
        let grace = self.config.leave_grace;
        let Some(name) = self.topics.get_key_value(topic).map(|(k, _)| k.clone()) else {
            return;
        };
        let t = self.topics.get_mut(&name).expect("looked up above");
        if t.remove_twin(phx_ref).is_some() {
            return; // Never announced.
        }
        let phx_ref = t.resolve(phx_ref);
        let Some(meta) = t.meta(&key, phx_ref).cloned() else {
            return;
        };
        let twin = t.take_twin(&key, &meta);
        match twin {
            Some(twin) if graced => {
                // The reconnect arrived before its old connection was seen closing.
                self.stats.takeovers += 1;
                t.add_alias(twin.track.phx_ref, phx_ref);
                let msg = MeshMsg::Adopt {
                    topic: name,
                    conn: twin.from.conn,
                    alias: twin.track.phx_ref,
                    adopted: phx_ref,
                };
                self.tx.mesh(twin.from.shard, msg);
            }
            _ if graced => {
                let until = Millis(self.now.0.saturating_add(grace.0));
                t.hold(&key, phx_ref, until);
                debug_assert!(self.held.back().is_none_or(|b| b.0 <= until));
                self.held.push_back((until, name, key, phx_ref));
            }
            twin => {
                self.untrack(&name, key, phx_ref);
                // The twin stands alone now: announce it rather than let the key look gone.
                if let Some(twin) = twin {
                    self.announce(&name, twin.track);
                }
            }
        }
    }

    fn untrack(&mut self, topic: &TopicName, key: UserKey, phx_ref: PhxRef) {
        if let Some(t) = self.topics.get_mut(topic) {
            sink!(self).untrack(t, topic, key, phx_ref);
        }
    }

    /// The leave grace of held presences ended: they leave now.
    pub(crate) fn expire_held(&mut self) {
        while let Some((until, ..)) = self.held.front() {
            if until.0 > self.now.0 {
                break;
            }
            let (until, topic, key, phx_ref) = self.held.pop_front().expect("front exists");
            let Some(t) = self.topics.get_mut(&topic) else {
                continue;
            };
            // Taken over since (and maybe held again, until later): nothing to do.
            if t.release_held(&key, phx_ref, until) {
                self.stats.grace_expired += 1;
                self.untrack(&topic, key, phx_ref);
            }
            self.forget_if_idle(&topic);
        }
    }

    /// Topics changed in this batch send their diffs; a large topic opens a coalescing window
    /// instead of sending again before the window ends.
    pub(crate) fn flush_topics(&mut self) {
        for name in std::mem::take(&mut self.to_flush) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            t.listed_for_flush = false;
            if t.window_until.is_some() {
                self.stats.diffs_coalesced += u64::from(t.has_pending());
                continue;
            }
            self.flush_now(&name);
            self.forget_if_idle(&name);
        }
    }

    /// Sends the topic's changes now; a large topic then opens a window, so that the next
    /// changes wait for its end.
    fn flush_now(&mut self, name: &TopicName) {
        if self.flush_topic(name) && self.start_window(name) {
            self.windows.push(name.clone());
        }
    }

    /// Opens a coalescing window on a large topic; the caller lists it.
    fn start_window(&mut self, name: &TopicName) -> bool {
        let window = self.config.diff_window;
        let threshold = self.config.large_topic_threshold;
        let Some(t) = self.topics.get_mut(name) else {
            return false;
        };
        let start = window.0 > 0 && t.window_until.is_none() && t.members() >= threshold;
        if start {
            t.window_until = Some(Millis(self.now.0.saturating_add(window.0)));
        }
        start
    }

    /// Windows that ended: their changes go out as one diff, then their joiners get one shared
    /// state. A window that had something to send opens again (the topic is still busy).
    pub(crate) fn end_windows(&mut self) {
        let mut open = Vec::new();
        for name in std::mem::take(&mut self.windows) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            if t.window_until.is_some_and(|until| until.0 > self.now.0) {
                open.push(name);
                continue;
            }
            t.window_until = None;
            let waiters = t.take_waiters();
            let sent = self.flush_topic(&name);
            let answered = !waiters.is_empty();
            if answered {
                let state = self.encode_state(&name);
                for w in waiters {
                    let msg = MeshMsg::Joined {
                        topic: name.clone(),
                        conn: w.conn,
                        seq: w.seq,
                        reply: JoinedReply::State(state.clone()),
                        adopted: w.adopted,
                    };
                    self.tx.mesh(w.shard, msg);
                }
            }
            // A window that sent something opens again; after a quiet one the next change goes
            // out at once.
            if (sent || answered) && self.start_window(&name) {
                open.push(name);
            } else {
                self.forget_if_idle(&name);
            }
        }
        open.append(&mut self.windows);
        self.windows = open;
    }

    /// Throttled `presence_count` pushes that are due.
    pub(crate) fn push_counts(&mut self) {
        let interval = self.config.count_interval;
        let now = self.now;
        let mut keep = Vec::new();
        for name in std::mem::take(&mut self.to_count) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            if t.count_shards().next().is_none() {
                t.forget_count_change();
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
        // The kept ones' due times are read again by the next poll_timeout.
        self.count_wake = None;
        self.count_scanned = 0;
    }

    /// Sends the topic's pending changes as one diff; false if there was nothing to send.
    pub(crate) fn flush_topic(&mut self, name: &TopicName) -> bool {
        let Some(t) = self.topics.get_mut(name) else {
            return false;
        };
        if t.full_shards().next().is_none() {
            // Nobody to tell: later subscribers get all of it in their state.
            t.discard_pending();
            return false;
        }
        self.buf.clear();
        if !t.take_diff(name.as_str(), &mut self.buf) {
            return false;
        }
        self.stats.diffs_sent += 1;
        for shard in t.full_shards() {
            self.tx.mesh(
                shard,
                MeshMsg::Diff {
                    topic: name.clone(),
                    frame: self.buf.as_slice().into(),
                },
            );
        }
        true
    }

    pub(crate) fn forget_if_idle(&mut self, name: &TopicName) {
        if self.topics.get(name).is_some_and(Topic::is_idle) {
            self.topics.remove(name);
        }
    }
}

/// Puts a changed topic on the lists that `flush` and `tick` walk, once each.
pub(crate) fn note_change(
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
