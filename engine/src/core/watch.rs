//! Watching side of watch lists: the users this shard's connections watch through `watch:`
//! topics. Each watched user has one replica per watching shard (its presences, fed by the user
//! owner), shared by every local watcher: a second watcher of a watched user is answered from the
//! replica at once, and a change costs one message per watching shard, not per watcher.
//!
//! A watch set (one `watch:` join of one connection) is `Joining` until every user in it has a
//! replica, then `Live` (it has had its state and gets diffs); a slow consumer's set is
//! `Suspended` until it drains and gets a fresh state.

use std::collections::BTreeSet;
use std::rc::Rc;

use roster_proto::encode::{DiffFrame, FrameKind, PresenceMap};
use smallvec::SmallVec;

use crate::core::hash::{Map, Seeds, Set};
use crate::core::outbox::Outbox;
use crate::core::{ConnId, Frame, MeshMsg, Meta, TopicName, UserKey};
use crate::mesh::Router;

/// Topics whose join watches users instead of tracking a presence.
pub(crate) fn is_watch_topic(topic: &str) -> bool {
    topic.starts_with("watch:")
}

#[derive(Debug)]
struct Watched {
    /// The [`MeshMsg::Watch`] this replica waits for or came from; older answers are stale.
    seq: u32,
    ready: bool,
    presences: Vec<(TopicName, Meta)>,
    /// Every local set watching this user: (connection, its watch topic).
    watchers: SmallVec<[(ConnId, TopicName); 1]>,
    /// Changes since the last flush.
    joins: Vec<(TopicName, Meta)>,
    leaves: Vec<(TopicName, Meta)>,
    listed: bool,
}

impl Watched {
    fn has_pending(&self) -> bool {
        !self.joins.is_empty() || !self.leaves.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetState {
    Joining { unready: u32 },
    Live,
    Suspended,
}

#[derive(Debug)]
struct WatchSet {
    topic: TopicName,
    /// Ordered, so that what a set does (messages to owners, state layout) does not depend on a
    /// hasher's seed: simulations replay exactly from their seed.
    users: BTreeSet<UserKey>,
    state: SetState,
}

#[derive(Debug)]
pub(crate) struct Watches {
    seeds: Seeds,
    users: Map<UserKey, Watched>,
    conns: Map<ConnId, SmallVec<[WatchSet; 1]>>,
    changed: Vec<UserKey>,
    seq: u32,
}

impl Watches {
    pub(crate) fn new(seeds: Seeds) -> Self {
        Watches {
            seeds,
            users: seeds.map(),
            conns: seeds.map(),
            changed: Vec::new(),
            seq: 0,
        }
    }

    /// Users `conn` watches over all its watch sets.
    pub(crate) fn watched_by(&self, conn: ConnId) -> usize {
        self.conns
            .get(&conn)
            .map_or(0, |sets| sets.iter().map(|s| s.users.len()).sum())
    }

    /// How many of `users` `conn` does not watch yet in `topic` (what a watch_add would add).
    pub(crate) fn new_in(&self, conn: ConnId, topic: &str, users: &[UserKey]) -> usize {
        let set = self.set(conn, topic);
        let mut seen: Set<&str> = self.seeds.set();
        users
            .iter()
            .filter(|u| set.is_none_or(|s| !s.users.contains(*u)) && seen.insert(u.as_str()))
            .count()
    }

    /// Starts watch set `topic` of `conn`. True when every user's replica is ready: the caller
    /// then calls [`Watches::go_live`]. Otherwise [`Watches::user_state`] reports it later.
    pub(crate) fn join(
        &mut self,
        conn: ConnId,
        topic: TopicName,
        users: Vec<UserKey>,
        router: &Router,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) -> bool {
        let mut set = WatchSet {
            topic,
            users: BTreeSet::new(),
            state: SetState::Joining { unready: 0 },
        };
        let mut unready = 0;
        for u in users {
            if set.users.insert(u.clone()) && !self.attach(conn, &set.topic, u, router, tx, buf) {
                unready += 1;
            }
        }
        set.state = SetState::Joining { unready };
        self.conns.entry(conn).or_default().push(set);
        unready == 0
    }

    /// watch_add: newly watched users whose replica is ready arrive as joins now, the others when
    /// their replica is.
    pub(crate) fn add(
        &mut self,
        conn: ConnId,
        topic: &str,
        users: Vec<UserKey>,
        router: &Router,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) {
        for u in users {
            let Some(set) = self.set_mut(conn, topic) else {
                return;
            };
            if !set.users.insert(u.clone()) {
                continue;
            }
            let name = set.topic.clone();
            let ready = self.attach(conn, &name, u.clone(), router, tx, buf);
            let set = self.set_mut(conn, topic).expect("found above");
            match set.state {
                SetState::Live if ready => {
                    let w = &self.users[&u];
                    send_user_diff(tx, buf, &name, &u, &w.presences, &[], [conn]);
                }
                SetState::Joining { ref mut unready } if !ready => *unready += 1,
                _ => {}
            }
        }
    }

    /// watch_remove: removed users who were present leave in a diff. True if this completed a
    /// joining set (the caller then sends its state).
    pub(crate) fn remove(
        &mut self,
        conn: ConnId,
        topic: &str,
        users: &[UserKey],
        router: &Router,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) -> bool {
        for u in users {
            let ready = self.users.get(u).is_some_and(|w| w.ready);
            let Some(set) = self.set_mut(conn, topic) else {
                return false;
            };
            if !set.users.remove(u) {
                continue;
            }
            let name = set.topic.clone();
            match set.state {
                SetState::Live if ready => {
                    self.flush_user(u, tx, buf);
                    let w = &self.users[u];
                    send_user_diff(tx, buf, &name, u, &[], &w.presences, [conn]);
                }
                SetState::Joining { ref mut unready } if !ready => *unready -= 1,
                _ => {}
            }
            self.detach(conn, &name, u, router, tx);
        }
        self.set(conn, topic)
            .is_some_and(|s| s.state == SetState::Joining { unready: 0 })
    }

    /// The watch set is gone (left, replaced, or its connection closed): no diffs.
    pub(crate) fn part(&mut self, conn: ConnId, topic: &str, router: &Router, tx: &mut Outbox) {
        let Some(sets) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(at) = sets.iter().position(|s| s.topic.as_str() == topic) else {
            return;
        };
        let set = sets.swap_remove(at);
        if sets.is_empty() {
            self.conns.remove(&conn);
        }
        for u in &set.users {
            self.detach(conn, &set.topic, u, router, tx);
        }
    }

    /// The user owner's answer to a watch: the replica is ready. Returns the sets that are now
    /// complete (the caller sends each its reply and [`Watches::go_live`]); live sets watching
    /// this user get its presences as joins.
    pub(crate) fn user_state(
        &mut self,
        key: UserKey,
        seq: u32,
        presences: Vec<(TopicName, Meta)>,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) -> Vec<(ConnId, TopicName)> {
        let Some(w) = self
            .users
            .get_mut(&key)
            .filter(|w| w.seq == seq && !w.ready)
        else {
            return Vec::new();
        };
        w.ready = true;
        w.presences = presences;
        let watchers = w.watchers.clone();
        let mut complete = Vec::new();
        for (conn, topic) in watchers {
            let Some(set) = self.set_mut(conn, topic.as_str()) else {
                continue;
            };
            match set.state {
                SetState::Joining { ref mut unready } => {
                    *unready -= 1;
                    if *unready == 0 {
                        complete.push((conn, topic));
                    }
                }
                SetState::Live => {
                    let w = &self.users[&key];
                    send_user_diff(tx, buf, &topic, &key, &w.presences, &[], [conn]);
                }
                SetState::Suspended => {}
            }
        }
        complete
    }

    /// A change of a watched user, from its owner.
    pub(crate) fn user_changed(
        &mut self,
        key: UserKey,
        joins: Vec<(TopicName, Meta)>,
        leaves: Vec<(TopicName, Meta)>,
    ) {
        // Not ready: the state this replica waits for is newer than this change.
        let Some(w) = self.users.get_mut(&key).filter(|w| w.ready) else {
            return;
        };
        for (topic, meta) in &leaves {
            if let Some(at) = w
                .presences
                .iter()
                .position(|(t, m)| t == topic && m.ref_text() == meta.ref_text())
            {
                w.presences.remove(at);
            }
        }
        w.presences.extend(joins.iter().cloned());
        w.joins.extend(joins);
        w.leaves.extend(leaves);
        if !w.listed {
            w.listed = true;
            self.changed.push(key);
        }
    }

    /// Every changed user's changes go to its live watchers: one diff per user and watch topic.
    pub(crate) fn flush(&mut self, tx: &mut Outbox, buf: &mut Vec<u8>) {
        for key in std::mem::take(&mut self.changed) {
            if let Some(w) = self.users.get_mut(&key) {
                w.listed = false;
            }
            self.flush_user(&key, tx, buf);
        }
    }

    /// A complete or resumed set starts getting diffs; its presence_state payload, from the
    /// replicas, is left in `buf`.
    pub(crate) fn go_live(
        &mut self,
        conn: ConnId,
        topic: &str,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) {
        let users: Vec<UserKey> = self
            .set(conn, topic)
            .map(|s| s.users.iter().cloned().collect())
            .unwrap_or_default();
        // Changes not yet flushed go out first, to the sets live already: the state below holds
        // them, and the diffs this set gets from now on must come after it.
        for u in &users {
            if self.users.get(u).is_some_and(Watched::has_pending) {
                self.flush_user(u, tx, buf);
            }
        }
        if let Some(set) = self.set_mut(conn, topic) {
            set.state = SetState::Live;
        }
        buf.clear();
        let mut map = PresenceMap::new(buf);
        for u in &users {
            let Some(w) = self
                .users
                .get(u)
                .filter(|w| w.ready && !w.presences.is_empty())
            else {
                continue;
            };
            map.key(u.as_str());
            for (t, m) in &w.presences {
                map.meta_with_topic(m.bytes(), t.as_str());
            }
        }
        map.finish();
    }

    /// A slow consumer lost diffs: no more for its live sets until it drains.
    pub(crate) fn suspend(&mut self, conn: ConnId, topic: &str) -> bool {
        match self.set_mut(conn, topic) {
            Some(set) if set.state == SetState::Live => {
                set.state = SetState::Suspended;
                true
            }
            _ => false,
        }
    }

    /// A set completed while its connection's diffs are being dropped: it goes live when the
    /// connection drains.
    pub(crate) fn suspend_joining(&mut self, conn: ConnId, topic: &str) {
        if let Some(set) = self.set_mut(conn, topic) {
            set.state = SetState::Suspended;
        }
    }

    /// The slow consumer drained: true if the set was suspended and must now
    /// [`Watches::go_live`] with a fresh state.
    pub(crate) fn is_suspended(&self, conn: ConnId, topic: &str) -> bool {
        self.set(conn, topic)
            .is_some_and(|s| s.state == SetState::Suspended)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty() && self.conns.is_empty() && self.changed.is_empty()
    }

    /// Watched users with a replica here (for stats).
    pub(crate) fn users(&self) -> usize {
        self.users.len()
    }

    fn set(&self, conn: ConnId, topic: &str) -> Option<&WatchSet> {
        self.conns
            .get(&conn)?
            .iter()
            .find(|s| s.topic.as_str() == topic)
    }

    fn set_mut(&mut self, conn: ConnId, topic: &str) -> Option<&mut WatchSet> {
        self.conns
            .get_mut(&conn)?
            .iter_mut()
            .find(|s| s.topic.as_str() == topic)
    }

    /// Adds a watcher of `u`; the first local watcher asks the user owner for a replica.
    /// Returns whether the replica is ready.
    fn attach(
        &mut self,
        conn: ConnId,
        topic: &TopicName,
        u: UserKey,
        router: &Router,
        tx: &mut Outbox,
        buf: &mut Vec<u8>,
    ) -> bool {
        if self.users.get(&u).is_some_and(Watched::has_pending) {
            // The new watcher starts from the replica as it is now: what is pending must go to
            // the others first, or a later diff would repeat (or cancel against) what it saw.
            self.flush_user(&u, tx, buf);
        }
        if let Some(w) = self.users.get_mut(&u) {
            w.watchers.push((conn, topic.clone()));
            return w.ready;
        }
        self.seq = self.seq.wrapping_add(1);
        tx.mesh(
            router.user_owner(u.as_str()),
            MeshMsg::Watch {
                key: u.clone(),
                from: tx.me,
                seq: self.seq,
            },
        );
        let mut watchers = SmallVec::new();
        watchers.push((conn, topic.clone()));
        self.users.insert(
            u,
            Watched {
                seq: self.seq,
                ready: false,
                presences: Vec::new(),
                watchers,
                joins: Vec::new(),
                leaves: Vec::new(),
                listed: false,
            },
        );
        false
    }

    /// Removes a watcher of `u`; the last one drops the replica and tells the user owner.
    fn detach(
        &mut self,
        conn: ConnId,
        topic: &TopicName,
        u: &UserKey,
        router: &Router,
        tx: &mut Outbox,
    ) {
        let Some(w) = self.users.get_mut(u) else {
            return;
        };
        if let Some(at) = w
            .watchers
            .iter()
            .position(|(c, t)| *c == conn && t == topic)
        {
            w.watchers.swap_remove(at);
        }
        if w.watchers.is_empty() {
            self.users.remove(u);
            self.changed.retain(|k| k != u);
            tx.mesh(
                router.user_owner(u.as_str()),
                MeshMsg::Unwatch {
                    key: u.clone(),
                    from: tx.me,
                },
            );
        }
    }

    fn flush_user(&mut self, key: &UserKey, tx: &mut Outbox, buf: &mut Vec<u8>) {
        let Some(w) = self.users.get_mut(key) else {
            return;
        };
        let mut joins = std::mem::take(&mut w.joins);
        let mut leaves = std::mem::take(&mut w.leaves);
        // A presence that came and went within one batch was never seen by anyone.
        joins.retain(|(t, m)| {
            let gone = leaves
                .iter()
                .position(|(lt, lm)| lt == t && lm.ref_text() == m.ref_text());
            gone.map(|at| leaves.swap_remove(at)).is_none()
        });
        if joins.is_empty() && leaves.is_empty() {
            return;
        }
        let mut live: Vec<(TopicName, ConnId)> = w
            .watchers
            .iter()
            .filter(|(c, t)| {
                self.conns
                    .get(c)
                    .and_then(|sets| sets.iter().find(|s| &s.topic == t))
                    .is_some_and(|s| s.state == SetState::Live)
            })
            .map(|(c, t)| (t.clone(), *c))
            .collect();
        live.sort_by(|a, b| a.0.cmp(&b.0));
        for group in live.chunk_by(|a, b| a.0 == b.0) {
            send_user_diff(
                tx,
                buf,
                &group[0].0,
                key,
                &joins,
                &leaves,
                group.iter().map(|(_, c)| *c),
            );
        }
    }
}

/// One `presence_diff` about one watched user on watch topic `topic`, encoded once and shared by
/// `conns`.
fn send_user_diff(
    tx: &mut Outbox,
    buf: &mut Vec<u8>,
    topic: &TopicName,
    key: &UserKey,
    joins: &[(TopicName, Meta)],
    leaves: &[(TopicName, Meta)],
    conns: impl IntoIterator<Item = ConnId>,
) {
    if joins.is_empty() && leaves.is_empty() {
        return;
    }
    buf.clear();
    let mut diff = DiffFrame::new(buf, topic.as_str());
    write_user(diff.joins(), key, joins);
    write_user(diff.leaves(), key, leaves);
    diff.finish();
    let frame: Frame = Rc::from(buf.as_slice());
    for conn in conns {
        tx.send_frame(conn, frame.clone(), FrameKind::Diff);
    }
}

fn write_user(mut map: PresenceMap<'_>, key: &UserKey, items: &[(TopicName, Meta)]) {
    if !items.is_empty() {
        map.key(key.as_str());
        for (t, m) in items {
            map.meta_with_topic(m.bytes(), t.as_str());
        }
    }
    map.finish();
}
