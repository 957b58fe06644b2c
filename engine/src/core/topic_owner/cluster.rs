//! The topic owner in a cluster (see `cluster/`): interest in a topic starts when it is made
//! here (a client of this node joined it or is present) and ends when it is forgotten; this
//! node's part goes out as deltas at each flush; the other nodes' parts come in as deltas and
//! answers and change what this node's clients see. On a single node (`Config::cluster` None)
//! every function here does nothing. Watch lists across nodes are `core/user_cluster.rs`.

use roster_proto::meta::restamp_ref;
use roster_proto::PhxRef;

use super::{Env, Topic, TopicOwner};
use crate::cluster::frame::{Frame, Kind, Origin};
use crate::cluster::parts::{Applied, Change};
use crate::cluster::reporter::reporter;
use crate::cluster::subject::Scope;
use crate::core::event::{Event, EventKind, Reason};
use crate::core::ids::next_ref;
use crate::core::message::UserCheck;
use crate::core::outbox::{NatsOut, Outbox};
use crate::core::part::{self, answer, ref_of};
use crate::core::topic::same_meta;
use crate::core::{ClusterConfig, MeshMsg, Meta, Millis, TopicName, Track, UserKey};

impl TopicOwner {
    /// A topic was made here: subscribe to its deltas, and ask for the other nodes' parts (its
    /// joiners wait for them). Part requests are subscribed to once the fetch is complete:
    /// until then NATS's "no responders" must be able to say that nobody else holds anything.
    pub(super) fn cluster_interest(&mut self, name: &TopicName, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        self.asks += 1;
        t.join_cluster(c.me.node, self.asks);
        let until = Millis(env.now.0.saturating_add(c.fetch_timeout.0));
        debug_assert!(self.fetches.back().is_none_or(|b| b.0 <= until));
        self.fetches.push_back((until, name.clone()));
        let subjects = &c.subjects;
        let tx = &mut *env.tx;
        tx.nats(NatsOut::Subscribe(
            subjects.deltas(Scope::Topic, name.as_str()),
        ));
        tx.nats(ask(
            c,
            name,
            subjects.parts(Scope::Topic, name.as_str()),
            self.asks,
        ));
    }

    /// First fetches past their deadline complete with what came.
    pub(super) fn expire_fetches(&mut self, env: &mut Env<'_>) {
        while let Some((until, _)) = self.fetches.front() {
            if until.0 > env.now.0 {
                break;
            }
            let (_, name) = self.fetches.pop_front().expect("front exists");
            let Some(tc) = self.topics.get(&name).and_then(|t| t.cluster()) else {
                continue;
            };
            if !tc.remote.is_fetching() {
                continue;
            }
            // Holders named but silent (they may be fetching themselves, so not yet answering
            // on the topic's subject) are asked directly; their answers are taken when they
            // come, after the fetch.
            self.on_remote(&name, env, |r| r.fetch_expired());
        }
    }

    /// Parts asked for again and still not in are asked for once more.
    pub(super) fn retry_refetches(&mut self, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        for name in self.retries.due(env.now) {
            let tc = self.topics.get(&name).and_then(|t| t.cluster());
            if tc.is_some_and(|tc| tc.reask(c, name.as_str(), env.tx)) {
                self.retries.asked(&name, env.now, c.fetch_timeout);
            }
        }
    }

    /// The topic goes: so does this node's interest.
    pub(super) fn cluster_forget(&mut self, name: &TopicName, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let fetched = self.topics.get(name).is_some_and(|t| !t.fetching());
        let subjects = &c.subjects;
        tx.nats(NatsOut::Unsubscribe(
            subjects.deltas(Scope::Topic, name.as_str()),
        ));
        if fetched {
            tx.nats(NatsOut::Unsubscribe(
                subjects.parts(Scope::Topic, name.as_str()),
            ));
        }
    }

    /// This node's part changed since its last delta: the next one goes out.
    pub(super) fn publish_delta(&mut self, name: &TopicName, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(tc) = self.topics.get_mut(name).and_then(|t| t.cluster_mut()) else {
            return;
        };
        if let Some(d) = tc.take_delta(name.as_str(), c.me, &mut self.delta_seq) {
            let subject = c.subjects.deltas(Scope::Topic, name.as_str());
            let frame = Frame::Delta(d).encode();
            tx.nats(NatsOut::Publish { subject, frame });
        }
    }

    /// A node declared down is heard again (a partition healed): its frames count again.
    pub(crate) fn node_up(&mut self, origin: Origin) {
        self.dead.remove(&origin);
        self.ended.remove(&origin);
    }

    /// A frame from NATS about a topic (already validated); `reply` is where a request wants
    /// its answer.
    pub(crate) fn nats_frame(&mut self, frame: Frame, reply: Option<&str>, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let me = c.me;
        let from = match &frame {
            Frame::Delta(d) => Some(d.origin),
            // What another node holds of an ended one counts until that one's grace ends here.
            Frame::Part(p) if p.relayed && self.ended.contains(&p.origin) => None,
            Frame::Part(p) => Some(p.origin),
            _ => None,
        };
        if from.is_some_and(|o| self.dead.contains(&o)) {
            return;
        }
        match frame {
            Frame::Delta(d) if d.kind == Kind::Topic => {
                let Some(name) = self.held(&d.name) else {
                    return; // Not of interest here (a hash shared with another name).
                };
                self.on_remote(&name, env, |r| r.delta(d));
            }
            Frame::Part(p) if p.kind == Kind::Topic => {
                let Some(name) = self.held(&p.name) else {
                    return;
                };
                let tc = self.topics.get(&name).and_then(|t| t.cluster());
                if !tc.is_some_and(|tc| tc.takes(&p)) {
                    return; // A late answer to an interest this node has given up since.
                }
                self.on_remote(&name, env, |r| r.part(p));
            }
            Frame::PartRequest(q) if q.kind == Kind::Topic && q.from.node != me.node => {
                let Some(to) = reply else {
                    return;
                };
                let held = self.topics.get(q.name.as_str()).and_then(|t| t.cluster());
                if let Some(c) = &self.config.cluster {
                    answer(c, &q, held, self.delta_seq, to, env.tx);
                }
            }
            _ => {}
        }
    }

    /// The request for `name`'s parts found no subscriber: nobody else holds anything there.
    pub(crate) fn no_responders(&mut self, name: &str, env: &mut Env<'_>) {
        if let Some(name) = self.held(name) {
            self.on_remote(&name, env, |r| r.no_responders());
        }
    }

    /// A node is down: its parts leave every topic here, and what it sent before it died and
    /// still comes in is dropped (until it is heard again: a partition healed).
    pub(crate) fn node_down(&mut self, origin: Origin, env: &mut Env<'_>) {
        self.dead.insert(origin);
        self.ended.remove(&origin);
        for name in self.cluster_topics() {
            self.on_remote_down(&name, env, Some(origin), |r| r.node_down(origin));
        }
    }

    /// The topics with a cluster side here.
    fn cluster_topics(&self) -> Vec<TopicName> {
        let topics = self.topics.iter();
        let clustered = topics.filter(|(_, t)| t.cluster().is_some());
        clustered.map(|(n, _)| n.clone()).collect()
    }

    /// A node ended under a grace (it died with a leave grace set, or stopped to restart): its
    /// parts stay as they are, and its presences may be taken over by joins here, until
    /// `node_down`. What it sent before it ended and still comes in is dropped.
    pub(crate) fn node_held(&mut self, origin: Origin, env: &mut Env<'_>) {
        self.dead.insert(origin);
        self.ended.insert(origin);
        for name in self.cluster_topics() {
            self.on_remote(&name, env, |r| r.node_held(origin));
            self.twins_take_over(&name, env);
        }
    }

    /// This node's presence `r` of `key`, a connection's, was claimed by a connection of a
    /// node ranked first too (see `contest`): the connection moves to another presence with
    /// the same meta that no connection has (unseen), or to a presence of its own (one join).
    fn reclaim(&mut self, name: &TopicName, key: UserKey, r: PhxRef, env: &mut Env<'_>) {
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        let Some(tc) = t.cluster() else {
            return;
        };
        let Some(meta) = tc.own_meta(&key, r.0).cloned() else {
            return;
        };
        let fits = |other: u64, m: &Meta| same_meta(m, &meta) && !tc.owns(&key, other);
        let meta = match tc.remote.adoptable(key.as_str(), fits) {
            Some((_, other)) => other,
            None => {
                let fresh = next_ref(self.shard, &mut self.minted, self.config.ref_seed);
                env.buf.clear();
                restamp_ref(meta.bytes(), fresh, env.buf);
                Meta::new(env.buf)
            }
        };
        let phx_ref = PhxRef(ref_of(&meta));
        t.realias(r, phx_ref);
        let track = Track { key, phx_ref, meta };
        self.replace(name, r, track, env);
    }

    /// Frames of `origin` may have been lost: its part of every topic with interest here is
    /// asked for again (see `RemoteParts::refetch`).
    pub(crate) fn node_gap(&mut self, origin: Origin, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        for (name, t) in self.topics.iter_mut() {
            if refetch(c, name, t, origin, env) {
                self.retries.asked(name, env.now, c.fetch_timeout);
            }
        }
    }

    /// A frame of `origin` about topic `name` was lost (dropped before this shard took it): its
    /// part of that topic alone is asked for again.
    pub(crate) fn topic_gap(&mut self, name: &str, origin: Origin, env: &mut Env<'_>) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(name) = self.held(name) else {
            return;
        };
        let Some(t) = self.topics.get_mut(&name) else {
            return;
        };
        if refetch(c, &name, t, origin, env) {
            self.retries.asked(&name, env.now, c.fetch_timeout);
        }
    }

    /// Requests to this node may have been lost (its NATS client dropped messages): its part
    /// of every topic with interest here goes out unasked.
    pub(crate) fn announce_parts(&self, tx: &mut Outbox) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        for (name, t) in self.topics.iter() {
            if let Some(tc) = t.cluster() {
                tc.announce(c, name.as_str(), self.delta_seq, tx);
            }
        }
    }

    /// A node declared down is back (a partition healed, or this node's own isolation ended):
    /// its frames are taken again and its parts asked for, as nothing of it is held any more
    /// and its next delta may be far off.
    pub(crate) fn node_back(&mut self, origin: Origin, env: &mut Env<'_>) {
        self.dead.remove(&origin);
        self.ended.remove(&origin);
        self.node_gap(origin, env);
    }

    fn held(&self, name: &str) -> Option<TopicName> {
        self.topics.get_key_value(name).map(|(n, _)| n.clone())
    }

    /// Runs `input` on the topic's remote parts and carries out what it says: changes to what
    /// clients see, re-fetches, and once a first fetch completes, the joiners that waited.
    fn on_remote(
        &mut self,
        name: &TopicName,
        env: &mut Env<'_>,
        input: impl FnOnce(&mut crate::cluster::parts::RemoteParts) -> Applied,
    ) {
        self.on_remote_down(name, env, None, input)
    }

    /// As `on_remote`; `down`: the input is that node's death, whose leaves this node reports
    /// to the backend if it is the topic's reporter (`cluster::reporter`). With no candidate
    /// (no surviving node has a presence in the topic) every node holding the dead node's part
    /// reports them, with the same ids.
    fn on_remote_down(
        &mut self,
        name: &TopicName,
        env: &mut Env<'_>,
        down: Option<Origin>,
        input: impl FnOnce(&mut crate::cluster::parts::RemoteParts) -> Applied,
    ) {
        let Some(c) = &self.config.cluster else {
            return;
        };
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        let was_fetching = t.fetching();
        let Some(tc) = t.cluster_mut() else {
            return;
        };
        let applied = input(&mut tc.remote);
        let report = down.filter(|dead| {
            let me = c.me.node;
            let mine = (tc.own_len() > 0).then_some(me);
            let candidates = tc.remote.nodes_present().filter(|n| *n != dead.node);
            let candidates: Vec<u64> = candidates.chain(mine).collect();
            env.tx.events && reporter(name.as_str(), dead.node, candidates).is_none_or(|r| r == me)
        });
        // What this node's own part shows too is not a change for its clients, but another
        // node's claim on it (see `contest`).
        let own =
            |t: &super::Topic, key: &UserKey, r: u64| t.cluster().is_some_and(|c| c.owns(key, r));
        let mut contests = Vec::new();
        for change in applied.changes {
            match change {
                Change::Join { key, meta, phx_ref } => {
                    let key = UserKey::new(&key);
                    if !own(t, &key, phx_ref) {
                        t.track_remote(key, meta);
                    } else if let Some(c) = t.cluster() {
                        if let Some((node, held)) = c.remote.claimant(key.as_str(), phx_ref) {
                            contests.push((key, PhxRef(phx_ref), node, held));
                        }
                    }
                }
                Change::Leave { key, phx_ref, meta } => {
                    let key = UserKey::new(&key);
                    if own(t, &key, phx_ref) {
                        continue;
                    }
                    t.untrack_remote(&key, PhxRef(phx_ref));
                    if let Some(dead) = report {
                        // Whether that was the key's last presence anywhere is its user
                        // owner's to find out.
                        let check = UserCheck {
                            key: key.clone(),
                            dead,
                            topic: name.clone(),
                            meta: meta.clone(),
                        };
                        let user_owner = self.router.user_owner(key.as_str());
                        env.tx.mesh(user_owner, MeshMsg::UserCheck(Box::new(check)));
                        env.tx.event(|| Event {
                            kind: EventKind::Leave,
                            topic: name.clone(),
                            key,
                            meta,
                            prev: None,
                            reason: Some(Reason::NodeDown),
                            origin: Some(dead),
                        });
                    }
                }
            }
        }
        for claim in applied.claims {
            let key = UserKey::new(&claim.key);
            if own(t, &key, claim.phx_ref) {
                contests.push((key, PhxRef(claim.phx_ref), claim.node, claim.held));
            }
        }
        let epoch = t.cluster().map_or(0, |tc| tc.epoch);
        self.changed.note(name, t);
        for origin in &applied.refetch {
            env.tx
                .nats(ask(c, name, c.subjects.node(origin.node), epoch));
        }
        if !applied.refetch.is_empty() {
            self.retries.asked(name, env.now, c.fetch_timeout);
        }
        let fetched = self
            .topics
            .get(name)
            .is_some_and(|t| was_fetching && !t.fetching());
        if fetched {
            self.fetch_done(name, env);
        }
        for (key, r, node, held) in contests {
            self.contest(name, key, r, (node, held), env);
        }
    }

    /// Presence `r` of `key`, in this node's part, shows in `node`'s part too: both nodes took
    /// it over from an ended node (or its next run took it back), or a client of this node
    /// that closed (its presence held by the leave grace) came back there. A connection's
    /// claim beats a presence no connection has (here: held by a grace; there: `held`, taken
    /// back from a state file); between two connections, the node ranked first (lower id)
    /// keeps it and the other moves its connection (`reclaim`). Every node decides the same,
    /// and clients see the presence once meanwhile.
    fn contest(
        &mut self,
        name: &TopicName,
        key: UserKey,
        r: PhxRef,
        (node, theirs_held): (u64, bool),
        env: &mut Env<'_>,
    ) {
        let Some(me) = self.config.cluster.as_ref().map(|c| c.me.node) else {
            return;
        };
        let Some(t) = self.topics.get_mut(name) else {
            return;
        };
        if theirs_held {
            return;
        }
        if t.is_held(&key, r) {
            // Their client took it: this node's copy goes from its part, unseen.
            t.unhold(&key, r);
            self.untrack(name, key, r, None, env.tx);
        } else if node < me {
            self.reclaim(name, key, r, env);
        }
    }

    /// The topic's first fetch is complete: this node answers part requests, and the joiners
    /// that waited get their state (after the window, if one is open).
    fn fetch_done(&mut self, name: &TopicName, env: &mut Env<'_>) {
        let deferred = self.topics.get_mut(name).and_then(|t| t.cluster_mut());
        let deferred = deferred.map(|c| std::mem::take(&mut c.deferred));
        for (track, from) in deferred.unwrap_or_default() {
            if let Some(taken) = self.track(name, track, from, env) {
                super::tell_adopted(name, from, *taken, env.tx);
            }
        }
        let (Some(c), Some(t)) = (&self.config.cluster, self.topics.get_mut(name)) else {
            return;
        };
        if let Some(tc) = t.cluster() {
            tc.fetched(c, name.as_str(), self.delta_seq, env.tx);
        }
        if t.window_until.is_none() {
            // The joiners that waited get their state, after what changed goes to the
            // subscribers that were live already.
            let waiters = t.take_waiters();
            if t.has_pending() {
                self.flush_now(name, env);
            }
            self.answer_waiters(name, waiters, env);
        }
    }
}

/// Asks `origin` again for its part of topic `name` if it has interest here; true if asked.
fn refetch(
    c: &ClusterConfig,
    name: &TopicName,
    t: &mut Topic,
    origin: Origin,
    env: &mut Env<'_>,
) -> bool {
    let Some(tc) = t.cluster_mut() else {
        return false;
    };
    if !tc.remote.refetch(origin) {
        return false;
    }
    env.tx
        .nats(ask(c, name, c.subjects.node(origin.node), tc.epoch));
    true
}

/// A request for a topic's parts, on `subject` (everyone's, or one node's).
fn ask(c: &ClusterConfig, name: &TopicName, subject: String, epoch: u64) -> NatsOut {
    part::ask(c, Kind::Topic, name.as_str(), subject, epoch)
}
