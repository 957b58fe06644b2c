//! The user owner in a cluster: watch lists across nodes. A user key is a name like a topic
//! (`Kind::User`, its own subjects): this node's part of it is where its own clients are
//! present (the user table), and the other nodes' parts come in as deltas and answers. Interest
//! in a key starts when it gets a presence or a watcher here and ends, at a flush, when it has
//! neither. A watcher's first state waits for the first fetch of the key's parts, as a topic's
//! joiners wait for theirs. On a single node (`cluster` None) none of this runs.

use std::collections::{BTreeSet, VecDeque};

use roster_proto::PhxRef;

use crate::cluster::frame::{Frame, Kind, Origin};
use crate::cluster::parts::{Applied, Change, RemoteParts};
use crate::cluster::subject::Scope;
use crate::core::event::EventKind;
use crate::core::hash::{Map, Seeds};
use crate::core::message::UserCheck;
use crate::core::outbox::{NatsOut, Outbox};
use crate::core::part::{self, answer, Retries, UserCluster};
use crate::core::topic_owner::Env;
use crate::core::user::Users;
use crate::core::user_owner::user_event;
use crate::core::{ClusterConfig, MeshMsg, Meta, Millis, TopicName, UserKey};
use crate::mesh::ShardId;

#[derive(Debug)]
pub(crate) struct UserClusters {
    config: ClusterConfig,
    sides: Map<UserKey, Box<UserSide>>,
    /// First fetches in the order their deadlines come.
    fetches: VecDeque<(Millis, UserKey)>,
    /// Keys with parts asked for again and not answered yet.
    retries: Retries<UserKey>,
    /// Keys whose part or watchers changed since the last flush.
    touched: Vec<UserKey>,
    /// The seq of this shard's last user delta, over all its keys (see
    /// `NameCluster::take_delta`).
    delta_seq: u64,
    /// Incarnations declared down: their late frames are dropped.
    dead: BTreeSet<Origin>,
    /// Those of them held for a grace: what other nodes hold of them is taken.
    ended: BTreeSet<Origin>,
    /// Interests taken up so far (see `PartRequest::ask`).
    asks: u64,
}

#[derive(Debug)]
struct UserSide {
    part: UserCluster,
    /// Watches waiting for the first fetch: (watching shard, its watch seq).
    waiting: Vec<(ShardId, u32)>,
    /// The key got its first presence here during the first fetch (this one): whether it is
    /// online (no other node shows it) is decided when the fetch completes; so is whether it
    /// went offline again meanwhile (`pending_left`, the presence that left last).
    pending_online: Option<(TopicName, Meta)>,
    pending_left: Option<(TopicName, Meta)>,
    /// A dead node's presence of the key left: whether it is offline is decided when the
    /// fetch completes (see `check_offline`).
    pending_offline: Option<Box<UserCheck>>,
}

impl UserClusters {
    pub(crate) fn new(config: ClusterConfig, seeds: Seeds) -> UserClusters {
        UserClusters {
            config,
            sides: seeds.map(),
            fetches: VecDeque::new(),
            retries: Retries::new(),
            touched: Vec::new(),
            delta_seq: 0,
            dead: BTreeSet::new(),
            ended: BTreeSet::new(),
            asks: 0,
        }
    }

    /// Keys with interest here.
    pub(crate) fn len(&self) -> usize {
        self.sides.len()
    }

    /// Interest in `key` starts if it has not: subscribe to its deltas and ask for its parts.
    fn interest(&mut self, key: &UserKey, now: Millis, tx: &mut Outbox) -> &mut UserSide {
        if !self.sides.contains_key(key) {
            let c = &self.config;
            tx.nats(NatsOut::Subscribe(
                c.subjects.deltas(Scope::User, key.as_str()),
            ));
            self.asks += 1;
            tx.nats(ask(
                c,
                key,
                c.subjects.parts(Scope::User, key.as_str()),
                self.asks,
            ));
            let until = Millis(now.0.saturating_add(c.fetch_timeout.0));
            self.fetches.push_back((until, key.clone()));
            let side = UserSide {
                part: UserCluster::new(Kind::User, c.me.node, self.asks),
                waiting: Vec::new(),
                pending_online: None,
                pending_left: None,
                pending_offline: None,
            };
            self.sides.insert(key.clone(), Box::new(side));
        }
        self.sides.get_mut(key).expect("inserted above")
    }
}

impl Users {
    /// A presence of this node's own was tracked for `key`.
    pub(crate) fn cluster_tracked(
        &mut self,
        key: &UserKey,
        topic: &TopicName,
        meta: &Meta,
        env: &mut Env<'_>,
    ) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        uc.interest(key, env.now, env.tx)
            .part
            .joined(topic, meta, false);
        uc.touched.push(key.clone());
    }

    /// A presence of this node's own left.
    pub(crate) fn cluster_untracked(&mut self, key: &UserKey, topic: &TopicName, phx_ref: PhxRef) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        if let Some(side) = uc.sides.get_mut(key) {
            side.part.left(topic, phx_ref);
            uc.touched.push(key.clone());
        }
    }

    /// `key`'s own part here went from empty to not (`now_present`) or back: `user_online` or
    /// `user_offline` if no other node's part shows the key. Two nodes whose first presences
    /// of a key come within the time a delta takes to cross both report it online (their ids
    /// differ: each names its own first presence); the last leave is reported by the node it
    /// left, unless another's delta crossed it.
    pub(crate) fn cluster_own_part_turned(
        &mut self,
        key: &UserKey,
        now_present: bool,
        env: &mut Env<'_>,
    ) {
        let elsewhere = self.remote_one(key).is_some();
        let first = now_present
            .then(|| self.presences(key.as_str()).into_iter().next())
            .flatten();
        let last = (!now_present).then(|| self.last_left.take()).flatten();
        let Some(side) = self
            .cluster
            .as_deref_mut()
            .and_then(|uc| uc.sides.get_mut(key))
        else {
            return;
        };
        let fetching = side.part.remote.is_fetching();
        let event = if now_present {
            if fetching {
                side.pending_left = None;
                if side.pending_online.is_none() {
                    side.pending_online = first;
                }
                return;
            }
            if elsewhere {
                return;
            }
            first.map(|(topic, meta)| (EventKind::Online, topic, meta))
        } else {
            if side.pending_online.is_some() {
                // Whether it was ever online is not known yet: both are decided together.
                side.pending_left = last;
                return;
            }
            if fetching || elsewhere {
                return;
            }
            last.map(|(topic, meta)| (EventKind::Offline, topic, meta))
        };
        if let Some((kind, topic, meta)) = event {
            env.tx
                .event(|| user_event(kind, key.clone(), topic, meta, None));
        }
    }

    /// A dead node's presence of `check.key` left, reported here: the key is offline if no
    /// node has a presence of it. Found out by taking an interest in the key (its parts
    /// fetched, as a watcher's first state is); the interest ends at the next flush after,
    /// if nothing else holds it.
    pub(crate) fn check_offline(&mut self, check: UserCheck, env: &mut Env<'_>) {
        if self.users.contains_key(&check.key) {
            return;
        }
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        let side = uc.interest(&check.key, env.now, env.tx);
        if side.part.remote.is_fetching() {
            side.pending_offline = Some(Box::new(check));
            return;
        }
        uc.touched.push(check.key.clone());
        if self.remote_one(&check.key).is_none() {
            offline_for(check, env.tx);
        }
    }

    /// A presence of `key` another node's part shows here (one this node has not taken over).
    fn remote_one(&self, key: &UserKey) -> Option<(TopicName, Meta)> {
        let side = self.cluster.as_deref()?.sides.get(key)?;
        side.part
            .remote
            .presences()
            .into_iter()
            .find_map(|(topic, r, meta)| {
                let topic = TopicName::new(topic);
                (!side.part.owns(&topic, r)).then(|| (topic, meta.clone()))
            })
    }

    /// A shard watches `key`: its state now, or once the key's parts are here.
    pub(crate) fn cluster_watch(
        &mut self,
        key: UserKey,
        from: ShardId,
        seq: u32,
        env: &mut Env<'_>,
    ) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        let side = uc.interest(&key, env.now, env.tx);
        if side.part.remote.is_fetching() {
            side.waiting.push((from, seq));
            return;
        }
        let presences = self.all_presences(&key, env);
        env.tx.mesh(
            from,
            MeshMsg::UserState {
                key,
                seq,
                presences,
            },
        );
    }

    /// A shard stopped watching `key`: interest may end at the next flush.
    pub(crate) fn cluster_unwatched(&mut self, key: &UserKey) {
        if let Some(uc) = self.cluster.as_deref_mut() {
            uc.touched.push(key.clone());
        }
    }

    /// This node's and the other nodes' presences of `key`, as a watcher's state shows them.
    fn all_presences(&self, key: &UserKey, env: &mut Env<'_>) -> Vec<(TopicName, Meta)> {
        self.with_remote(key.as_str(), |topic| env.names.intern(topic))
    }

    /// This node's and the other nodes' presences of `key` held here, the other nodes' topic
    /// names made by `name`.
    fn with_remote(
        &self,
        key: &str,
        mut name: impl FnMut(&str) -> TopicName,
    ) -> Vec<(TopicName, Meta)> {
        let mut all = self.presences(key);
        let remote = self.cluster.as_deref().and_then(|uc| uc.sides.get(key));
        if let Some(side) = remote {
            for (topic, r, meta) in side.part.remote.presences() {
                let topic = name(topic);
                // Taken over by this node: listed among its own already.
                if !side.part.owns(&topic, r) {
                    all.push((topic, meta.clone()));
                }
            }
            all.sort_by(|a, b| a.0.cmp(&b.0));
        }
        all
    }

    /// This node's and the other nodes' presences of `key` held here, for the admin API.
    pub(crate) fn view(&self, key: &str) -> Vec<(TopicName, Meta)> {
        self.with_remote(key, TopicName::new)
    }

    /// `key` has interest here and its first fetch is complete: its view is the cluster's.
    pub(crate) fn is_fetched(&self, key: &str) -> bool {
        let side = self.cluster.as_deref().and_then(|uc| uc.sides.get(key));
        side.is_some_and(|s| !s.part.remote.is_fetching())
    }

    /// End of a batch: this node's changed parts go out as deltas, and keys with neither a
    /// presence nor a watcher here are forgotten.
    pub(crate) fn cluster_flush(&mut self, tx: &mut Outbox) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        let touched = std::mem::take(&mut uc.touched);
        for key in touched {
            let Some(side) = uc.sides.get_mut(&key) else {
                continue;
            };
            let c = &uc.config;
            if let Some(d) = side.part.take_delta(key.as_str(), c.me, &mut uc.delta_seq) {
                let subject = c.subjects.deltas(Scope::User, key.as_str());
                let frame = Frame::Delta(d).encode();
                tx.nats(NatsOut::Publish { subject, frame });
            }
            let interested = self.users.contains_key(&key) || self.watchers.contains_key(&key);
            // A first fetch that decides an online or offline is waited for (it ends within
            // the fetch timeout).
            let deciding = side.pending_online.is_some() || side.pending_offline.is_some();
            if interested || deciding {
                continue;
            }
            let side = uc.sides.remove(&key).expect("looked up above");
            tx.nats(NatsOut::Unsubscribe(
                c.subjects.deltas(Scope::User, key.as_str()),
            ));
            if !side.part.remote.is_fetching() {
                tx.nats(NatsOut::Unsubscribe(
                    c.subjects.parts(Scope::User, key.as_str()),
                ));
            }
        }
    }

    /// A frame about a user key (already validated).
    pub(crate) fn user_frame(&mut self, frame: Frame, reply: Option<&str>, env: &mut Env<'_>) {
        let Some(uc) = self.cluster.as_deref() else {
            return;
        };
        let me = uc.config.me;
        match frame {
            Frame::Delta(d) if !uc.dead.contains(&d.origin) => {
                let key = UserKey::new(&d.name);
                self.on_remote(&key, env, |r| r.delta(d));
            }
            Frame::Part(p)
                if !uc.dead.contains(&p.origin) || (p.relayed && uc.ended.contains(&p.origin)) =>
            {
                let key = UserKey::new(&p.name);
                if !uc.sides.get(&key).is_some_and(|s| s.part.takes(&p)) {
                    return; // A late answer to an interest this node has given up since.
                }
                self.on_remote(&key, env, |r| r.part(p));
            }
            Frame::PartRequest(q) if q.from.node != me.node => {
                let Some(to) = reply else {
                    return;
                };
                let held = uc.sides.get(q.name.as_str()).map(|s| &s.part);
                answer(&uc.config, &q, held, uc.delta_seq, to, env.tx);
            }
            _ => {}
        }
    }

    /// Nobody else holds anything of `key`.
    pub(crate) fn user_no_responders(&mut self, key: &str, env: &mut Env<'_>) {
        let key = UserKey::new(key);
        self.on_remote(&key, env, |r| r.no_responders());
    }

    /// A node is down: its parts leave every key's watchers.
    pub(crate) fn user_node_down(&mut self, origin: Origin, env: &mut Env<'_>) {
        self.node_ended(origin, false, env);
    }

    /// A node ended under a grace: its parts stay until `user_node_down`.
    pub(crate) fn user_node_held(&mut self, origin: Origin, env: &mut Env<'_>) {
        self.node_ended(origin, true, env);
    }

    /// Its late frames are dropped; what other nodes relay of it is taken while it is `held`.
    fn node_ended(&mut self, origin: Origin, held: bool, env: &mut Env<'_>) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        uc.dead.insert(origin);
        if held {
            uc.ended.insert(origin);
        } else {
            uc.ended.remove(&origin);
        }
        let keys: Vec<UserKey> = uc.sides.keys().cloned().collect();
        let events = env.tx.events;
        for key in keys {
            if held {
                self.on_remote(&key, env, |r| r.node_held(origin));
                continue;
            }
            let before = if events { self.remote_one(&key) } else { None };
            self.on_remote(&key, env, |r| r.node_down(origin));
            // The dead node had the key's last presences. Whoever held its part of the key
            // reports the key offline (a node with a presence of it would not be here): only
            // watchers, each with the same event id (see `net::events`).
            let Some((topic, meta)) = before else {
                continue;
            };
            if !self.users.contains_key(&key) && self.remote_one(&key).is_none() {
                let check = UserCheck {
                    key: key.clone(),
                    dead: origin,
                    topic,
                    meta,
                };
                offline_for(check, env.tx);
            }
        }
    }

    /// Whether another node's part of `key` (live or held) shows its presence `r` in `topic`:
    /// then a change of this node's own to it is no change for watchers (a takeover).
    pub(crate) fn remote_shows(&self, key: &UserKey, topic: &TopicName, r: PhxRef) -> bool {
        let side = self.cluster.as_deref().and_then(|uc| uc.sides.get(key));
        side.is_some_and(|s| s.part.remote.holds(topic.as_str(), r.0))
    }

    pub(crate) fn user_node_up(&mut self, origin: Origin) {
        if let Some(uc) = self.cluster.as_deref_mut() {
            uc.dead.remove(&origin);
            uc.ended.remove(&origin);
        }
    }

    /// A node declared down is back: its parts of every key are asked for directly.
    pub(crate) fn user_node_back(&mut self, origin: Origin, now: Millis, tx: &mut Outbox) {
        if let Some(uc) = self.cluster.as_deref_mut() {
            uc.dead.remove(&origin);
            uc.ended.remove(&origin);
        }
        self.user_node_gap(origin, now, tx);
    }

    /// As the topic owner's `announce`, for the keys with interest here.
    pub(crate) fn user_announce(&self, tx: &mut Outbox) {
        let Some(uc) = self.cluster.as_deref() else {
            return;
        };
        for (key, side) in uc.sides.iter() {
            side.part
                .announce(&uc.config, key.as_str(), uc.delta_seq, tx);
        }
    }

    /// Frames of `origin` may have been lost: its parts of every key with interest here are
    /// asked for again (see `RemoteParts::refetch`).
    pub(crate) fn user_node_gap(&mut self, origin: Origin, now: Millis, tx: &mut Outbox) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        for (key, side) in uc.sides.iter_mut() {
            if side.part.remote.refetch(origin) {
                let subject = uc.config.subjects.node(origin.node);
                tx.nats(ask(&uc.config, key, subject, side.part.epoch));
                uc.retries.asked(key, now, uc.config.fetch_timeout);
            }
        }
    }

    /// A frame of `origin` about `key` was lost (dropped before this shard took it): its part
    /// of that key alone is asked for again.
    pub(crate) fn user_gap(&mut self, key: &str, origin: Origin, now: Millis, tx: &mut Outbox) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        let key = UserKey::new(key);
        let Some(side) = uc.sides.get_mut(&key) else {
            return;
        };
        if side.part.remote.refetch(origin) {
            let subject = uc.config.subjects.node(origin.node);
            tx.nats(ask(&uc.config, &key, subject, side.part.epoch));
            uc.retries.asked(&key, now, uc.config.fetch_timeout);
        }
    }

    /// First fetches past their deadline complete with what came (silent holders named in
    /// answers are asked directly, see `RemoteParts::fetch_expired`); re-fetches not answered
    /// are asked again.
    pub(crate) fn user_tick(&mut self, env: &mut Env<'_>) {
        self.retry_refetches(env);
        loop {
            let Some(uc) = self.cluster.as_deref_mut() else {
                return;
            };
            let Some((until, _)) = uc.fetches.front() else {
                return;
            };
            if until.0 > env.now.0 {
                return;
            }
            let (_, key) = uc.fetches.pop_front().expect("front exists");
            if uc
                .sides
                .get(&key)
                .is_some_and(|s| s.part.remote.is_fetching())
            {
                self.on_remote(&key, env, |r| r.fetch_expired());
            }
        }
    }

    /// Parts asked for again and still not in are asked for once more.
    fn retry_refetches(&mut self, env: &mut Env<'_>) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        for key in uc.retries.due(env.now) {
            let side = uc.sides.get(&key);
            if side.is_some_and(|s| s.part.reask(&uc.config, key.as_str(), env.tx)) {
                uc.retries.asked(&key, env.now, uc.config.fetch_timeout);
            }
        }
    }

    /// When the next first fetch times out, or a re-fetch is asked again.
    pub(crate) fn user_next_deadline(&self) -> Option<Millis> {
        let uc = self.cluster.as_deref()?;
        let fetch = uc.fetches.front().map(|(at, _)| *at);
        [fetch, uc.retries.next()].into_iter().flatten().min()
    }

    /// Runs `input` on the key's remote parts and carries out what it says: changes go to the
    /// watching shards; re-fetches are asked for; once a first fetch completes, this node
    /// answers part requests, says what its own part holds, and the waiting watches get their
    /// states.
    fn on_remote(
        &mut self,
        key: &UserKey,
        env: &mut Env<'_>,
        input: impl FnOnce(&mut RemoteParts) -> Applied,
    ) {
        let Some(uc) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(side) = uc.sides.get_mut(key) else {
            return; // Not of interest here (a hash shared with another key).
        };
        let was_fetching = side.part.remote.is_fetching();
        let applied = input(&mut side.part.remote);
        let done = was_fetching && !side.part.remote.is_fetching();
        let c = &uc.config;
        for origin in &applied.refetch {
            env.tx
                .nats(ask(c, key, c.subjects.node(origin.node), side.part.epoch));
        }
        if !applied.refetch.is_empty() {
            uc.retries.asked(key, env.now, c.fetch_timeout);
        }
        let waiting = if done {
            side.part.fetched(c, key.as_str(), uc.delta_seq, env.tx);
            std::mem::take(&mut side.waiting)
        } else {
            Vec::new()
        };
        let pending_online = side.pending_online.take_if(|_| done);
        let pending_left = side.pending_left.take_if(|_| done);
        let pending_offline = side.pending_offline.take_if(|_| done);
        if pending_offline.is_some() || pending_online.is_some() {
            // Kept for this answer (see `cluster_flush`); its interest may end now.
            uc.touched.push(key.clone());
        }
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        for change in applied.changes {
            let (list, topic, meta, phx_ref) = match change {
                Change::Join { key, meta, phx_ref } => (&mut joins, key, meta, phx_ref),
                Change::Leave { key, meta, phx_ref } => (&mut leaves, key, meta, phx_ref),
            };
            let topic = env.names.intern(&topic);
            // What this node's own part shows too is no change for watchers.
            if !side.part.owns(&topic, phx_ref) {
                list.push((topic, meta));
            }
        }
        if !joins.is_empty() || !leaves.is_empty() {
            self.tell_watchers(key, joins, leaves, env.tx);
        }
        if let Some(check) = pending_offline {
            if !self.users.contains_key(key) && self.remote_one(key).is_none() {
                offline_for(*check, env.tx);
            }
        }
        if let (Some((topic, meta)), None) = (pending_online, self.remote_one(key)) {
            let event = || user_event(EventKind::Online, key.clone(), topic, meta, None);
            env.tx.event(event);
            if let Some((topic, meta)) = pending_left.filter(|_| !self.users.contains_key(key)) {
                let event = || user_event(EventKind::Offline, key.clone(), topic, meta, None);
                env.tx.event(event);
            }
        }
        for (from, seq) in waiting {
            let presences = self.all_presences(key, env);
            let msg = MeshMsg::UserState {
                key: key.clone(),
                seq,
                presences,
            };
            env.tx.mesh(from, msg);
        }
    }
}

/// A request for a user's parts, on `subject` (every holder's, or one node's).
fn ask(c: &ClusterConfig, key: &UserKey, subject: String, epoch: u64) -> NatsOut {
    part::ask(c, Kind::User, key.as_str(), subject, epoch)
}

/// The key of `check` has no presence left: `user_offline`, named by the dead node.
fn offline_for(check: UserCheck, tx: &mut Outbox) {
    let UserCheck {
        key,
        dead,
        topic,
        meta,
    } = check;
    tx.event(|| user_event(EventKind::Offline, key, topic, meta, Some(dead)));
}
