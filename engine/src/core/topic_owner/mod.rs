//! The shard as topic owner: the authoritative presence list of each topic hashed here, its
//! diffs, coalescing windows, leave grace, twins and throttled counts. Its own state, apart from
//! the connection side; what it says to other shards (and to the user owners) goes through the
//! shard's outbox, and the time comes in with each call.

mod cluster;
mod restore;
mod server;

use std::collections::VecDeque;
use std::sync::Arc;

use roster_proto::meta::{self, restamp_prev};
use roster_proto::{PhxRef, PresenceMode};

use crate::core::event::{Event, EventKind, Reason};
use crate::core::grants::claims;
use crate::core::hash::{Map, Seeds};
use crate::core::ids::OWNER_REFS;
use crate::core::names::Names;
use crate::core::outbox::Outbox;
use crate::core::part::Retries;
use crate::core::topic::{same_meta, Topic, TopicView, Twin, Waiter};
use crate::core::{
    Config, ConnAddr, JoinMsg, JoinedReply, MeshMsg, Meta, Millis, Reforce, TopicName, Track,
    UserKey,
};
use crate::mesh::{Router, ShardId};

/// What a call to the owner side writes to and when it happens: the shard's outbox, its table of
/// interned names, its scratch buffer (one per shard: a large topic's state grows it once, for
/// the owner's encode and the joiner's frame alike) and its clock.
pub(crate) struct Env<'a> {
    pub(crate) now: Millis,
    pub(crate) tx: &'a mut Outbox,
    pub(crate) names: &'a mut Names,
    pub(crate) buf: &'a mut Vec<u8>,
}

/// Counters of what the owner side did, for [`ShardStats`](crate::core::ShardStats).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OwnerStats {
    pub(crate) diffs_sent: u64,
    pub(crate) diffs_coalesced: u64,
    pub(crate) takeovers: u64,
    pub(crate) twins: u64,
    pub(crate) grace_expired: u64,
}

/// Topics with changes not yet sent as a diff, and topics whose counts changed since the last
/// `presence_count` push: the lists that `flush` and `tick` walk, each topic once (its flags say
/// whether it is listed).
#[derive(Default)]
struct Changed {
    to_flush: Vec<TopicName>,
    to_count: Vec<TopicName>,
}

impl Changed {
    fn note(&mut self, name: &TopicName, t: &mut Topic) {
        // A takeover changes this node's part (its next delta) and nothing clients see.
        let delta = || t.cluster().is_some_and(|c| c.has_delta());
        if (t.has_pending() || delta()) && !t.listed_for_flush {
            t.listed_for_flush = true;
            self.to_flush.push(name.clone());
        }
        if t.count_dirty() && !t.listed_for_count {
            t.listed_for_count = true;
            self.to_count.push(name.clone());
        }
    }
}

/// Where a topic's changes go: to the user owner, and onto the change lists. Borrowed beside
/// the topic itself, so that a change costs one table lookup.
struct Sink<'a> {
    router: &'a Router,
    tx: &'a mut Outbox,
    changed: &'a mut Changed,
}

impl Sink<'_> {
    /// Tracks a presence of this node's previous run (see `restore`) and tells the user owner.
    fn announce_restored(&mut self, t: &mut Topic, name: &TopicName, track: Track) {
        t.track_restored(track.key.clone(), track.meta.clone());
        self.tell_tracked(t, name, track);
    }

    /// Tracks a presence and tells everyone; `seen`: it is new to the backend too (not a
    /// presence taken over, which the backend knows already).
    fn announce(&mut self, t: &mut Topic, name: &TopicName, track: Track, seen: bool) {
        t.track(track.key.clone(), track.meta.clone());
        if seen {
            self.tx.event(|| Event {
                kind: EventKind::Join,
                topic: name.clone(),
                key: track.key.clone(),
                meta: track.meta.clone(),
                prev: None,
                reason: None,
                origin: None,
            });
        }
        self.tell_tracked(t, name, track);
    }

    fn tell_tracked(&mut self, t: &mut Topic, name: &TopicName, track: Track) {
        let user_owner = self.router.user_owner(track.key.as_str());
        let msg = MeshMsg::UserTracked {
            topic: name.clone(),
            track,
        };
        self.tx.mesh(user_owner, msg);
        self.changed.note(name, t);
    }

    /// Removes a presence and tells everyone (nothing if it is not here); `why` None: the
    /// backend is not told (a copy another node's client took, see `contest`).
    fn untrack(
        &mut self,
        t: &mut Topic,
        name: &TopicName,
        key: UserKey,
        phx_ref: PhxRef,
        why: Option<Reason>,
    ) {
        if let Some(meta) = t.untrack(&key, phx_ref) {
            if let Some(why) = why {
                self.tx.event(|| Event {
                    kind: EventKind::Leave,
                    topic: name.clone(),
                    key: key.clone(),
                    meta,
                    prev: None,
                    reason: Some(why),
                    origin: None,
                });
            }
            let user_owner = self.router.user_owner(key.as_str());
            let msg = MeshMsg::UserUntracked {
                topic: name.clone(),
                key,
                phx_ref,
            };
            self.tx.mesh(user_owner, msg);
            self.changed.note(name, t);
        }
    }
}

/// The topics this shard owns, and every deadline about them.
pub(crate) struct TopicOwner {
    config: Config,
    /// The shard this owner is, and its last ref of its own (see `ids::next_ref`).
    shard: ShardId,
    minted: u64,
    router: Router,
    seeds: Seeds,
    topics: Map<TopicName, Topic>,
    changed: Changed,
    /// Topics with an open coalescing window.
    windows: Vec<TopicName>,
    /// Presences held by the leave grace, in the order their grace ends.
    held: VecDeque<(Millis, TopicName, UserKey, PhxRef)>,
    /// Presences of this node's previous run (its state file), held the same way until the
    /// restart grace ends (a queue of its own: that grace is another length).
    restored: VecDeque<(Millis, TopicName, UserKey, PhxRef)>,
    /// Topics with twins (unannounced joins, see `topic::Twin`), in the order their grace ends.
    twins_due: VecDeque<(Millis, TopicName)>,
    /// In a cluster: topics fetching the other nodes' parts, in the order their fetch times out.
    fetches: VecDeque<(Millis, TopicName)>,
    /// In a cluster: topics with parts asked for again and not answered yet.
    retries: Retries<TopicName>,
    /// The seq of this shard's last delta, over all its topics (see `TopicCluster::take_delta`).
    delta_seq: u64,
    /// Interests taken up so far (see `PartRequest::ask`).
    asks: u64,
    /// Incarnations declared down: what they sent before dying is dropped.
    dead: std::collections::BTreeSet<crate::cluster::frame::Origin>,
    /// Those of them held for a grace (see `node_held`).
    ended: std::collections::BTreeSet<crate::cluster::frame::Origin>,
    /// Server-side presences (the admin API's), by (topic, key), and their TTLs in order.
    server: Map<(TopicName, UserKey), server::ServerPresence>,
    server_due: std::collections::BTreeSet<(Millis, TopicName, UserKey)>,
    /// The earliest count push due among `to_count[..count_scanned]` (see `poll_timeout`).
    count_wake: Option<Millis>,
    count_scanned: usize,
    pub(crate) stats: OwnerStats,
}

impl TopicOwner {
    pub(crate) fn new(config: &Config, seeds: Seeds, shard: ShardId) -> Self {
        TopicOwner {
            shard,
            minted: OWNER_REFS,
            config: config.clone(),
            router: Router::new(config.shards),
            seeds,
            topics: seeds.map(),
            changed: Changed::default(),
            windows: Vec::new(),
            held: VecDeque::new(),
            restored: VecDeque::new(),
            twins_due: VecDeque::new(),
            fetches: VecDeque::new(),
            retries: Retries::new(),
            dead: std::collections::BTreeSet::new(),
            ended: std::collections::BTreeSet::new(),
            server: seeds.map(),
            server_due: std::collections::BTreeSet::new(),
            delta_seq: 0,
            asks: 0,
            count_wake: None,
            count_scanned: 0,
            stats: OwnerStats::default(),
        }
    }

    /// A message for the topic owner (joins, updates, leaves, adoptions).
    pub(crate) fn message(&mut self, msg: MeshMsg, env: &mut Env<'_>) {
        match msg {
            MeshMsg::Join(j) => self.join(*j, env),
            MeshMsg::Update {
                topic, old, new, ..
            } => self.update(topic, old, new, env),
            MeshMsg::Reforce(r) => self.reforce(*r, env),
            MeshMsg::Leave {
                topic,
                from,
                mode,
                tracked,
                why,
            } => self.leave(topic, from.shard, mode, tracked, why, env),
            MeshMsg::Adopted { topic, alias } => {
                if let Some(t) = self.topics.get_mut(&topic) {
                    t.resolve(alias);
                }
                self.forget_if_idle(&topic, env.tx);
            }
            _ => debug_assert!(false, "not a topic owner's message: {msg:?}"),
        }
    }

    /// Time passed: held presences and twins whose grace ended, windows that ended, counts due.
    pub(crate) fn tick(&mut self, env: &mut Env<'_>) {
        self.expire_fetches(env);
        self.retry_refetches(env);
        self.expire_held(env);
        self.expire_server(env);
        self.announce_twins(env);
        self.end_windows(env);
        self.push_counts(env);
    }

    /// Whether changes wait for [`TopicOwner::flush`].
    pub(crate) fn has_changes(&self) -> bool {
        !self.changed.to_flush.is_empty()
    }

    /// The earliest end of a coalescing window, of a leave grace or a twin's grace, or of a
    /// count interval with a change waiting.
    pub(crate) fn poll_timeout(&mut self, now: Millis) -> Option<Millis> {
        // New count changes are appended; read only those not seen yet.
        let interval = self.config.count_interval;
        let to_count = &self.changed.to_count;
        for name in &to_count[self.count_scanned.min(to_count.len())..] {
            let due = self
                .topics
                .get(name)
                .and_then(|t| t.count_due_at(now, interval));
            self.count_wake = match (self.count_wake, due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.count_scanned = to_count.len();
        let windows = self
            .windows
            .iter()
            .filter_map(|name| self.topics.get(name)?.window_until);
        let queued = [
            self.held.front().map(|h| h.0),
            self.restored.front().map(|h| h.0),
            self.twins_due.front().map(|t| t.0),
            self.fetches.front().map(|f| f.0),
            self.retries.next(),
            self.count_wake,
            self.next_server_expiry(),
        ];
        windows.chain(queued.into_iter().flatten()).min()
    }

    pub(crate) fn topics(&self) -> usize {
        self.topics.len()
    }

    pub(crate) fn presences(&self) -> usize {
        self.topics.values().map(|t| t.counts().1 as usize).sum()
    }

    /// Presences of other nodes held here, for the topics this node's clients touch.
    pub(crate) fn remote_presences(&self) -> usize {
        let remote = |t: &Topic| {
            let c = t.cluster()?;
            Some((t.counts().1 as usize).saturating_sub(c.own_len()))
        };
        self.topics.values().filter_map(remote).sum()
    }

    pub(crate) fn view(&self, topic: &str) -> Option<TopicView> {
        self.topics.get(topic).map(Topic::view)
    }

    /// The topic has interest here and its first fetch is complete: its view is the cluster's.
    pub(crate) fn is_fetched(&self, topic: &str) -> bool {
        let t = self.topics.get(topic);
        t.is_some_and(|t| t.cluster().is_some() && !t.fetching())
    }

    /// Nothing owned and nothing waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.topics.is_empty()
            && self.changed.to_flush.is_empty()
            && self.changed.to_count.is_empty()
            && self.windows.is_empty()
            && self.held.is_empty()
            && self.restored.is_empty()
            && self.twins_due.is_empty()
            && self.fetches.is_empty()
            && self.retries.is_empty()
            && self.server.is_empty()
    }

    /// The invariants of the owner's tables (see `invariants.rs`), or the first one broken.
    pub(crate) fn check(&self) -> Result<(), String> {
        let sorted = |what: &str, times: Vec<u64>| {
            if times.windows(2).all(|w| w[0] <= w[1]) {
                Ok(())
            } else {
                Err(format!("{what} out of order: {times:?}"))
            }
        };
        sorted("held presences", self.held.iter().map(|h| h.0 .0).collect())?;
        sorted(
            "restored presences",
            self.restored.iter().map(|h| h.0 .0).collect(),
        )?;
        sorted("twins", self.twins_due.iter().map(|t| t.0 .0).collect())?;
        sorted("fetches", self.fetches.iter().map(|f| f.0 .0).collect())?;
        let Changed { to_flush, to_count } = &self.changed;
        for (name, t) in &self.topics {
            t.check()
                .map_err(|e| format!("topic {}: {e}", name.as_str()))?;
            let listed = |list: &[TopicName]| list.iter().any(|n| n == name);
            for (what, flag, list) in [
                ("flush flag", t.listed_for_flush, to_flush),
                ("count flag", t.listed_for_count, to_count),
                ("window", t.window_until.is_some(), &self.windows),
            ] {
                if flag != listed(list) {
                    return Err(format!("topic {}: {what} and list disagree", name.as_str()));
                }
            }
        }
        for list in [to_flush, to_count, &self.windows] {
            let mut names: Vec<&str> = list.iter().map(|n| n.as_str()).collect();
            let len = names.len();
            names.sort_unstable();
            names.dedup();
            if names.len() != len {
                return Err(format!("a topic listed twice: {list:?}"));
            }
        }
        Ok(())
    }

    /// The owner's own copy of a topic name, creating the topic if needed (in a cluster, its
    /// interest starts: see `cluster.rs`).
    fn owned_name(&mut self, topic: &TopicName, env: &mut Env<'_>) -> TopicName {
        match self.topics.get_key_value(topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name = env.names.intern(topic.as_str());
                self.topics.insert(name.clone(), Topic::new(self.seeds));
                self.cluster_interest(&name, env);
                name
            }
        }
    }

    fn join(&mut self, mut j: JoinMsg, env: &mut Env<'_>) {
        let name = self.owned_name(&j.topic, env);
        let t = self.topics.get_mut(&name).expect("created above");
        if !j.resync {
            t.subscribe(j.from.shard, j.mode);
        }
        if let (true, Some(c)) = (t.fetching(), t.cluster_mut()) {
            // Tracked when the other nodes' parts are in (see `fetch_done`): it may take one
            // of their presences over.
            if let Some(track) = j.track.take() {
                c.deferred.push((track, j.from));
            }
        }
        // In a window, or while the other nodes' parts are fetched.
        let in_window = t.window_until.is_some() || t.fetching();
        if j.mode == PresenceMode::Full && in_window {
            // Answered with everyone else of this window, from one state, when it ends.
            let adopted = j
                .track
                .and_then(|track| self.track(&name, track, j.from, env));
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
                self.flush_now(&name, env);
            }
            state = Some(self.encode_state(&name, env.buf));
        }
        // The state was taken before the joiner's own presence goes in: that presence reaches it
        // in the next diff like everyone else's, so a join and leave that cancel out within one
        // batch were never seen by anyone.
        let adopted = j
            .track
            .and_then(|track| self.track(&name, track, j.from, env));
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
        env.tx.mesh(j.from.shard, msg);
    }

    fn encode_state(&self, name: &TopicName, buf: &mut Vec<u8>) -> Arc<[u8]> {
        buf.clear();
        if let Some(t) = self.topics.get(name) {
            t.encode_state(buf);
        }
        Arc::from(buf.as_slice())
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
        env: &mut Env<'_>,
    ) -> Option<Box<(PhxRef, PhxRef)>> {
        let grace = self.config.leave_grace;
        let t = self.topics.get_mut(name).expect("caller made it");
        let taken = t.take_held(&track.key, &track.meta);
        let adopt = taken.is_none().then(|| adoptable(t, &track)).flatten();
        self.stats.takeovers += u64::from(taken.is_some() || adopt.is_some());
        match taken {
            Some((held, true)) => {
                t.claim_held(&track.key, held);
                t.add_alias(track.phx_ref, held);
                Some(Box::new((track.phx_ref, held)))
            }
            Some((held, false)) => {
                // One update diff: the held meta leaves, the new one joins in its place.
                env.buf.clear();
                restamp_prev(track.meta.bytes(), held, env.buf);
                let track = Track {
                    meta: Meta::new(env.buf),
                    ..track
                };
                self.replace(name, held, track, env);
                None
            }
            None if adopt.is_some() => {
                // A presence of a node that ended (died under a leave grace, or restarts) that
                // no live node has taken over: this joiner takes it, unseen.
                let (r, meta) = adopt.expect("checked above");
                Some(self.take_over(name, track, (PhxRef(r), meta), env))
            }
            None if grace.0 > 0 && t.has_same(&track.key, &track.meta) => {
                let until = Millis(env.now.0.saturating_add(grace.0));
                t.add_twin(Twin { track, from, until });
                self.stats.twins += 1;
                // Expiry pops from the front: the queue stays in deadline order because the
                // grace is one length and time never goes back.
                debug_assert!(self.twins_due.back().is_none_or(|b| b.0 <= until));
                self.twins_due.push_back((until, name.clone()));
                None
            }
            None => {
                let mut sink = Sink {
                    router: &self.router,
                    tx: env.tx,
                    changed: &mut self.changed,
                };
                sink.announce(t, name, track, true);
                None
            }
        }
    }

    /// `track`'s connection takes over presence `held` of an ended node: its own ref is an
    /// alias of that one from now on. Returns (its own ref, the one it took).
    fn take_over(
        &mut self,
        name: &TopicName,
        track: Track,
        (held, meta): (PhxRef, Meta),
        env: &mut Env<'_>,
    ) -> Box<(PhxRef, PhxRef)> {
        let own = track.phx_ref;
        if let Some(t) = self.topics.get_mut(name) {
            t.add_alias(own, held);
        }
        let track = Track {
            phx_ref: held,
            meta,
            ..track
        };
        self.announce(name, track, false, env.tx);
        Box::new((own, held))
    }

    /// Twins are joins with the key and meta of a presence already shown, held back for the
    /// leave grace: some were reconnects of a node's clients that came before the node was
    /// found dead. Now that its presences are held, those take them over, unseen.
    fn twins_take_over(&mut self, name: &TopicName, env: &mut Env<'_>) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        for twin in t.take_twins() {
            let Some(t) = self.topics.get_mut(name) else {
                return;
            };
            let Some((r, meta)) = adoptable(t, &twin.track) else {
                t.add_twin(twin);
                continue;
            };
            self.stats.takeovers += 1;
            let from = twin.from;
            let taken = self.take_over(name, twin.track, (PhxRef(r), meta), env);
            tell_adopted(name, from, *taken, env.tx);
        }
    }

    /// Tracks a presence and tells everyone (the backend if `seen`, see `Sink::announce`).
    fn announce(&mut self, name: &TopicName, track: Track, seen: bool, tx: &mut Outbox) {
        if let Some(t) = self.topics.get_mut(name) {
            let mut sink = Sink {
                router: &self.router,
                tx,
                changed: &mut self.changed,
            };
            sink.announce(t, name, track, seen);
        }
    }

    /// Removes a presence and tells everyone (nothing if it is not here; the backend if `why`).
    fn untrack(
        &mut self,
        name: &TopicName,
        key: UserKey,
        phx_ref: PhxRef,
        why: Option<Reason>,
        tx: &mut Outbox,
    ) {
        if let Some(t) = self.topics.get_mut(name) {
            let mut sink = Sink {
                router: &self.router,
                tx,
                changed: &mut self.changed,
            };
            sink.untrack(t, name, key, phx_ref, why);
        }
    }

    /// Twins whose grace ended without their twin closing are announced.
    fn announce_twins(&mut self, env: &mut Env<'_>) {
        while let Some((until, _)) = self.twins_due.front() {
            if until.0 > env.now.0 {
                break;
            }
            let (_, name) = self.twins_due.pop_front().expect("front exists");
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            for twin in t.due_twins(env.now) {
                self.announce(&name, twin.track, true, env.tx);
            }
            self.forget_if_idle(&name, env.tx);
        }
    }

    fn update(&mut self, topic: TopicName, old: PhxRef, new: Track, env: &mut Env<'_>) {
        let Some(name) = self.topics.get_key_value(&topic).map(|(k, _)| k.clone()) else {
            return;
        };
        let t = self.topics.get_mut(&name).expect("looked up above");
        if t.remove_twin(old).is_some() {
            // Never announced: the new meta is simply a join.
            return self.announce(&name, new, true, env.tx);
        }
        if let Some(c) = t.cluster_mut() {
            if let Some((_, from)) = c.take_deferred(old) {
                // Not tracked yet: the new meta waits in its place.
                c.deferred.push((new, from));
                return;
            }
        }
        let old = t.resolve(old);
        self.replace(&name, old, new, env);
    }

    /// A connection's presence `old` takes its fresh token's meta claims: an update whose meta
    /// the owner makes from the one it holds. Nothing if the presence is not here (it left).
    fn reforce(&mut self, r: Reforce, env: &mut Env<'_>) {
        let Some(t) = self.topics.get(&r.topic) else {
            return;
        };
        let Some(stored) = t.current_meta(&r.key, r.old) else {
            return;
        };
        let (was, forced) = (claims(r.was.as_deref()), claims(r.forced.as_deref()));
        env.buf.clear();
        let refs = (r.new, r.old);
        if meta::reforce(stored.bytes(), was, forced, refs, env.buf).is_err() {
            debug_assert!(false, "a stored meta is valid JSON: {stored:?}");
            return;
        }
        let track = Track {
            key: r.key,
            phx_ref: r.new,
            meta: Meta::new(env.buf),
        };
        self.update(r.topic, r.old, track, env);
    }

    /// Presence `old` of `track.key` is replaced by `track`: one diff leaves the old and joins
    /// the new, and the user owner (so watchers) hears of both at once.
    fn replace(&mut self, name: &TopicName, old: PhxRef, track: Track, env: &mut Env<'_>) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        let replaced = t.untrack(&track.key, old);
        t.track(track.key.clone(), track.meta.clone());
        env.tx.event(|| Event {
            kind: if replaced.is_some() {
                EventKind::Update
            } else {
                EventKind::Join
            },
            topic: name.clone(),
            key: track.key.clone(),
            meta: track.meta.clone(),
            prev: replaced.clone(),
            reason: None,
            origin: None,
        });
        let replaced = replaced.is_some();
        let user_owner = self.router.user_owner(track.key.as_str());
        let topic = name.clone();
        let msg = if replaced {
            MeshMsg::UserUpdated { topic, old, track }
        } else {
            MeshMsg::UserTracked { topic, track }
        };
        env.tx.mesh(user_owner, msg);
        self.changed.note(name, t);
    }

    fn leave(
        &mut self,
        topic: TopicName,
        from: ShardId,
        mode: PresenceMode,
        tracked: Option<(UserKey, PhxRef)>,
        why: Reason,
        env: &mut Env<'_>,
    ) {
        let graced = why.may_hold() && self.config.leave_grace.0 > 0;
        let Some(t) = self.topics.get_mut(&topic) else {
            return;
        };
        t.unsubscribe(from, mode);
        let deferred = |t: &mut Topic, r: PhxRef| t.cluster_mut()?.take_deferred(r);
        if let Some((_, r)) = &tracked {
            if deferred(t, *r).is_some() {
                // Never tracked: nothing to take away.
                return self.forget_if_idle(&topic, env.tx);
            }
        }
        match tracked {
            Some((key, phx_ref)) if graced || t.in_grace() => {
                self.leave_presence(&topic, key, phx_ref, (graced, why), env)
            }
            // The common case: no grace bookkeeping on this topic.
            Some((key, phx_ref)) => {
                let mut sink = Sink {
                    router: &self.router,
                    tx: env.tx,
                    changed: &mut self.changed,
                };
                sink.untrack(t, &topic, key, phx_ref, Some(why));
            }
            None => {}
        }
        self.forget_if_idle(&topic, env.tx);
    }

    /// A connection's presence ends, for `why`. `graced`: its connection closed and a leave
    /// grace is set, so a twin takes its place unseen, or it is held for a reconnect.
    fn leave_presence(
        &mut self,
        topic: &TopicName,
        key: UserKey,
        phx_ref: PhxRef,
        (graced, why): (bool, Reason),
        env: &mut Env<'_>,
    ) {
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
                tell_adopted(&name, twin.from, (twin.track.phx_ref, phx_ref), env.tx);
            }
            _ if graced => {
                let until = Millis(env.now.0.saturating_add(grace.0));
                t.hold(&key, phx_ref, until);
                debug_assert!(self.held.back().is_none_or(|b| b.0 <= until));
                self.held.push_back((until, name, key, phx_ref));
            }
            twin => {
                self.untrack(&name, key, phx_ref, Some(why), env.tx);
                // The twin stands alone now: announce it rather than let the key look gone.
                if let Some(twin) = twin {
                    self.announce(&name, twin.track, true, env.tx);
                }
            }
        }
    }

    /// The leave grace of held presences, or the restart grace of restored ones, ended: they
    /// leave now.
    fn expire_held(&mut self, env: &mut Env<'_>) {
        let mut held = std::mem::take(&mut self.held);
        self.expire(&mut held, env);
        self.held = held;
        let mut restored = std::mem::take(&mut self.restored);
        self.expire(&mut restored, env);
        self.restored = restored;
    }

    fn expire(
        &mut self,
        queue: &mut VecDeque<(Millis, TopicName, UserKey, PhxRef)>,
        env: &mut Env<'_>,
    ) {
        while let Some((until, ..)) = queue.front() {
            if until.0 > env.now.0 {
                break;
            }
            let (until, topic, key, phx_ref) = queue.pop_front().expect("front exists");
            let Some(t) = self.topics.get_mut(&topic) else {
                continue;
            };
            // Taken over since (and maybe held again, until later): nothing to do.
            if t.release_held(&key, phx_ref, until) {
                self.stats.grace_expired += 1;
                let why = Some(Reason::GraceExpired);
                self.untrack(&topic, key, phx_ref, why, env.tx);
            }
            self.forget_if_idle(&topic, env.tx);
        }
    }

    /// Topics changed in this batch send their diffs; a large topic opens a coalescing window
    /// instead of sending again before the window ends.
    pub(crate) fn flush(&mut self, env: &mut Env<'_>) {
        for name in std::mem::take(&mut self.changed.to_flush) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            t.listed_for_flush = false;
            if t.window_until.is_some() {
                self.stats.diffs_coalesced += u64::from(t.has_pending());
                continue;
            }
            self.flush_now(&name, env);
            self.forget_if_idle(&name, env.tx);
        }
    }

    /// Sends the topic's changes now; a large topic then opens a window, so that the next
    /// changes wait for its end.
    fn flush_now(&mut self, name: &TopicName, env: &mut Env<'_>) {
        if self.flush_topic(name, env) && self.start_window(name, env.now) {
            self.windows.push(name.clone());
        }
    }

    /// Opens a coalescing window on a large topic; the caller lists it.
    fn start_window(&mut self, name: &TopicName, now: Millis) -> bool {
        let window = self.config.diff_window;
        let threshold = self.config.large_topic_threshold;
        let Some(t) = self.topics.get_mut(name) else {
            return false;
        };
        let start = window.0 > 0 && t.window_until.is_none() && t.members() >= threshold;
        if start {
            t.window_until = Some(Millis(now.0.saturating_add(window.0)));
        }
        start
    }

    /// Windows that ended: their changes go out as one diff, then their joiners get one shared
    /// state. A window that had something to send opens again (the topic is still busy).
    fn end_windows(&mut self, env: &mut Env<'_>) {
        let mut open = Vec::new();
        for name in std::mem::take(&mut self.windows) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            if t.window_until.is_some_and(|until| until.0 > env.now.0) {
                open.push(name);
                continue;
            }
            t.window_until = None;
            // Joiners waiting for the other nodes' parts wait on.
            let waiters = if t.fetching() {
                Vec::new()
            } else {
                t.take_waiters()
            };
            let sent = self.flush_topic(&name, env);
            let answered = !waiters.is_empty();
            self.answer_waiters(&name, waiters, env);
            // A window that sent something opens again; after a quiet one the next change goes
            // out at once.
            if (sent || answered) && self.start_window(&name, env.now) {
                open.push(name);
            } else {
                self.forget_if_idle(&name, env.tx);
            }
        }
        open.append(&mut self.windows);
        self.windows = open;
    }

    /// Joiners that waited get one shared state, as of now.
    fn answer_waiters(&mut self, name: &TopicName, waiters: Vec<Waiter>, env: &mut Env<'_>) {
        if waiters.is_empty() {
            return;
        }
        let state = self.encode_state(name, env.buf);
        for w in waiters {
            let msg = MeshMsg::Joined {
                topic: name.clone(),
                conn: w.conn,
                seq: w.seq,
                reply: JoinedReply::State(state.clone()),
                adopted: w.adopted,
            };
            env.tx.mesh(w.shard, msg);
        }
    }

    /// Throttled `presence_count` pushes that are due.
    fn push_counts(&mut self, env: &mut Env<'_>) {
        let interval = self.config.count_interval;
        let mut keep = Vec::new();
        for name in std::mem::take(&mut self.changed.to_count) {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            if t.count_shards().next().is_none() {
                t.forget_count_change();
            } else if t.take_count_due(env.now, interval) {
                let (keys, metas) = t.counts();
                for shard in t.count_shards() {
                    env.tx.mesh(
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
            self.forget_if_idle(&name, env.tx);
        }
        self.changed.to_count = keep;
        // The kept ones' due times are read again by the next poll_timeout.
        self.count_wake = None;
        self.count_scanned = 0;
    }

    /// Sends the topic's pending changes as one diff; false if there was nothing to send.
    fn flush_topic(&mut self, name: &TopicName, env: &mut Env<'_>) -> bool {
        self.publish_delta(name, env.tx);
        let Some(t) = self.topics.get_mut(name) else {
            return false;
        };
        if t.full_shards().next().is_none() {
            // Nobody to tell: later subscribers get all of it in their state.
            t.discard_pending();
            return false;
        }
        env.buf.clear();
        if !t.take_diff(name.as_str(), env.buf) {
            return false;
        }
        self.stats.diffs_sent += 1;
        for shard in t.full_shards() {
            env.tx.mesh(
                shard,
                MeshMsg::Diff {
                    topic: name.clone(),
                    frame: env.buf.as_slice().into(),
                },
            );
        }
        true
    }

    fn forget_if_idle(&mut self, name: &TopicName, tx: &mut Outbox) {
        if self.topics.get(name).is_some_and(Topic::is_idle) {
            self.cluster_forget(name, tx);
            self.topics.remove(name);
        }
    }
}

/// Tells connection `from`, whose presence was tracked as `alias`, that it has `adopted`
/// instead (after its join was answered).
fn tell_adopted(
    name: &TopicName,
    from: ConnAddr,
    (alias, adopted): (PhxRef, PhxRef),
    tx: &mut Outbox,
) {
    let msg = MeshMsg::Adopt {
        topic: name.clone(),
        conn: from.conn,
        alias,
        adopted,
    };
    tx.mesh(from.shard, msg);
}

/// A presence of another node's ended incarnation, of `track`'s key and with its client meta,
/// that this node may take over for `track`'s joiner: (its ref, its stored meta).
fn adoptable(t: &Topic, track: &Track) -> Option<(u64, Meta)> {
    let c = t.cluster()?;
    let fits = |r: u64, m: &Meta| same_meta(m, &track.meta) && !c.owns(&track.key, r);
    c.remote.adoptable(track.key.as_str(), fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_invariants_are_named() {
        let config = Config::default();
        let mut o = TopicOwner::new(&config, Seeds::new(0), ShardId(0));
        assert_eq!(o.check(), Ok(()));
        let (t, k) = (TopicName::new("t"), UserKey::new("k"));
        o.held
            .push_back((Millis(10), t.clone(), k.clone(), PhxRef(1)));
        o.held.push_back((Millis(5), t.clone(), k, PhxRef(2)));
        let e = o.check().unwrap_err();
        assert!(e.contains("held presences out of order"), "{e}");
        o.held.clear();
        o.windows.push(t.clone());
        o.windows.push(t);
        assert!(o.check().unwrap_err().contains("listed twice"));
    }
}
