//! Owner-side state of one topic: the authoritative presence list, how many subscribers each
//! shard has, and the changes not yet broadcast.
//!
//! Changes are collected in [`Pending`] and turned into one `presence_diff` when the shard
//! flushes. That is the batching point: a flush ends every driver batch, and a large topic's
//! coalescing window holds it until the window ends (its full-mode joiners wait in `waiting`
//! and share one state then). Presences of closed connections wait in `held` for the leave
//! grace.

use roster_proto::encode::{DiffFrame, PresenceMap};
use roster_proto::meta::stored_body;
use roster_proto::{PhxRef, PresenceMode};
use smallvec::SmallVec;

use crate::cluster::frame::Kind;
use crate::core::hash::{Map, Seeds};
use crate::core::part::{ref_of, TopicCluster};
use crate::core::{ConnAddr, ConnId, Meta, Millis, Track, UserKey};
use crate::mesh::ShardId;

#[derive(Debug, Clone, Copy)]
struct ShardSubs {
    shard: ShardId,
    full: u32,
    count: u32,
}

/// Changes since the last flush, in the order applied.
#[derive(Debug, Default)]
struct Pending {
    joins: Vec<(UserKey, Meta)>,
    leaves: Vec<(UserKey, Meta)>,
}

/// A full-mode joiner (or a resync) waiting for the end of the topic's coalescing window.
#[derive(Debug)]
pub(crate) struct Waiter {
    pub(crate) shard: ShardId,
    pub(crate) conn: ConnId,
    pub(crate) seq: u32,
    pub(crate) adopted: Option<Box<(PhxRef, PhxRef)>>,
}

/// A new presence with the same key and meta as one already here: most likely a reconnect
/// whose old connection has not been seen closing yet. It is announced only when its grace ends
/// without that; if the old one closes first, it takes the old one's place unseen.
#[derive(Debug)]
pub(crate) struct Twin {
    pub(crate) track: Track,
    pub(crate) from: ConnAddr,
    pub(crate) until: Millis,
}

/// Leave-grace bookkeeping; most topics never have any, so it is boxed and absent.
#[derive(Debug)]
struct Held {
    /// Presences of closed connections still in the table: key -> (ref, end of its grace).
    by_key: Map<UserKey, SmallVec<[(PhxRef, Millis); 1]>>,
    /// A joiner that adopted a held presence made its own ref first; messages its shard sent
    /// before learning of the adoption still name that ref. alias -> adopted ref.
    aliases: Map<PhxRef, PhxRef>,
    /// Joins not announced yet, in arrival order.
    twins: Vec<Twin>,
}

#[derive(Debug)]
pub(crate) struct Topic {
    // Most keys have one meta (one tab); SmallVec keeps that one inline in the map. A meta's
    // phx_ref is read from its bytes. Its hasher (seeded by the shard) serves the topic's other
    // tables too.
    presences: Map<UserKey, SmallVec<[Meta; 1]>>,
    metas: u32,
    subs: SmallVec<[ShardSubs; 2]>,
    pending: Pending,
    count_dirty: bool,
    count_sent: Option<Millis>,
    /// On the shard's flush list / count list (each topic is listed at most once).
    pub(crate) listed_for_flush: bool,
    pub(crate) listed_for_count: bool,
    /// End of the open coalescing window; the topic is on the shard's window list while set.
    pub(crate) window_until: Option<Millis>,
    waiting: Vec<Waiter>,
    held: Option<Box<Held>>,
    /// In a cluster: the other nodes' parts held here and this node's own (boxed: absent on a
    /// single node).
    cluster: Option<Box<TopicCluster>>,
}

/// A read-only copy of a topic's presences (for tests and the HTTP API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicView {
    /// `(key, stored metas)`, sorted by key; metas in the order they were tracked.
    pub presences: Vec<(UserKey, Vec<Meta>)>,
}

impl Topic {
    pub(crate) fn new(seeds: Seeds) -> Self {
        Topic {
            presences: seeds.map(),
            metas: 0,
            subs: SmallVec::new(),
            pending: Pending::default(),
            count_dirty: false,
            count_sent: None,
            listed_for_flush: false,
            listed_for_count: false,
            window_until: None,
            waiting: Vec::new(),
            held: None,
            cluster: None,
        }
    }

    /// The topic's cluster side, for node `me`: what it tracks from now on is this node's part.
    pub(crate) fn join_cluster(&mut self, me: u64, epoch: u64) {
        self.cluster = Some(Box::new(TopicCluster::new(Kind::Topic, me, epoch)));
    }

    pub(crate) fn cluster(&self) -> Option<&TopicCluster> {
        self.cluster.as_deref()
    }

    pub(crate) fn cluster_mut(&mut self) -> Option<&mut TopicCluster> {
        self.cluster.as_deref_mut()
    }

    /// Its first fetch of the other nodes' parts is still on.
    pub(crate) fn fetching(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.remote.is_fetching())
    }

    /// The topic's own invariants (see `invariants.rs`).
    pub(crate) fn check(&self) -> Result<(), String> {
        let metas: usize = self.presences.values().map(|m| m.len()).sum();
        if metas != self.metas as usize {
            return Err(format!(
                "{} metas counted, {metas} in the table",
                self.metas
            ));
        }
        if self.presences.values().any(|m| m.is_empty()) {
            return Err("a key with no metas".into());
        }
        Ok(())
    }

    /// The leave-grace bookkeeping, made on first use with the topic's hasher.
    fn held_mut(&mut self) -> &mut Held {
        let hasher = self.presences.hasher();
        self.held.get_or_insert_with(|| {
            Box::new(Held {
                by_key: Map::with_hasher(hasher.clone()),
                aliases: Map::with_hasher(hasher.clone()),
                twins: Vec::new(),
            })
        })
    }

    /// A presence of this node's own. One another node's part shows already (taken over from
    /// a node that died or restarted) joins this node's part only: clients see it already.
    pub(crate) fn track(&mut self, key: UserKey, meta: Meta) {
        self.track_own(key, meta, false);
    }

    /// A presence of this node's previous run (its state file), which no connection has: in
    /// this node's part as held, so that a client coming back to any node may take it over.
    pub(crate) fn track_restored(&mut self, key: UserKey, meta: Meta) {
        self.track_own(key, meta, true);
    }

    fn track_own(&mut self, key: UserKey, meta: Meta, held: bool) {
        if let Some(c) = self.cluster.as_deref_mut() {
            c.joined(&key, &meta, held);
            if c.remote.claim(key.as_str(), ref_of(&meta)) {
                return;
            }
        }
        self.track_remote(key, meta);
    }

    /// A connection here took over held presence `r` of `key`: in a cluster, other nodes
    /// learn that a connection has it now.
    pub(crate) fn claim_held(&mut self, key: &UserKey, r: PhxRef) {
        if let Some(c) = self.cluster.as_deref_mut() {
            c.claimed(key, r.0);
        }
    }

    /// A presence of another node's part (in what clients see, not in this node's part).
    pub(crate) fn track_remote(&mut self, key: UserKey, meta: Meta) {
        self.presences
            .entry(key.clone())
            .or_default()
            .push(meta.clone());
        self.metas += 1;
        self.pending.joins.push((key, meta));
        self.count_dirty = true;
    }

    /// Removes this node's presence `phx_ref` of `key`; `None` if it is not here. One that
    /// another node's part shows too (it took the presence over as well) leaves this node's
    /// part only.
    pub(crate) fn untrack(&mut self, key: &UserKey, phx_ref: PhxRef) -> Option<Meta> {
        if let Some(c) = self.cluster.as_deref_mut() {
            if c.owns(key, phx_ref.0) && c.remote.holds(key.as_str(), phx_ref.0) {
                c.left(key, phx_ref);
                return self.meta(key, phx_ref).cloned();
            }
        }
        let gone = self.untrack_remote(key, phx_ref)?;
        if let Some(c) = self.cluster.as_deref_mut() {
            c.left(key, phx_ref);
        }
        Some(gone)
    }

    /// Removes a presence of another node's part.
    pub(crate) fn untrack_remote(&mut self, key: &UserKey, phx_ref: PhxRef) -> Option<Meta> {
        let metas = self.presences.get_mut(key)?;
        let at = metas.iter().position(|m| m.is_ref(phx_ref))?;
        let gone = metas.remove(at);
        if metas.is_empty() {
            self.presences.remove(key);
        }
        self.metas -= 1;
        self.pending.leaves.push((key.clone(), gone.clone()));
        self.count_dirty = true;
        Some(gone)
    }

    pub(crate) fn subscribe(&mut self, shard: ShardId, mode: PresenceMode) {
        if mode == PresenceMode::None {
            return;
        }
        let subs = match self.subs.iter_mut().find(|s| s.shard == shard) {
            Some(s) => s,
            None => {
                self.subs.push(ShardSubs {
                    shard,
                    full: 0,
                    count: 0,
                });
                self.subs.last_mut().expect("just pushed")
            }
        };
        match mode {
            PresenceMode::Full => subs.full += 1,
            PresenceMode::Count => subs.count += 1,
            PresenceMode::None => {}
        }
    }

    pub(crate) fn unsubscribe(&mut self, shard: ShardId, mode: PresenceMode) {
        let Some(at) = self.subs.iter().position(|s| s.shard == shard) else {
            return;
        };
        let subs = &mut self.subs[at];
        match mode {
            PresenceMode::Full => subs.full = subs.full.saturating_sub(1),
            PresenceMode::Count => subs.count = subs.count.saturating_sub(1),
            PresenceMode::None => {}
        }
        if subs.full == 0 && subs.count == 0 {
            self.subs.swap_remove(at);
        }
    }

    /// Shards with at least one full-mode subscriber.
    pub(crate) fn full_shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.subs.iter().filter(|s| s.full > 0).map(|s| s.shard)
    }

    pub(crate) fn count_shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.subs.iter().filter(|s| s.count > 0).map(|s| s.shard)
    }

    /// Tracked presences or full-mode subscribers, whichever is more: what makes a topic large.
    pub(crate) fn members(&self) -> u32 {
        let full: u32 = self.subs.iter().map(|s| s.full).sum();
        self.metas.max(full)
    }

    pub(crate) fn wait(&mut self, w: Waiter) {
        self.waiting.push(w);
    }

    pub(crate) fn take_waiters(&mut self) -> Vec<Waiter> {
        std::mem::take(&mut self.waiting)
    }

    /// Keeps presence `r` of a closed connection for the leave grace (false if it is not here).
    pub(crate) fn hold(&mut self, key: &UserKey, r: PhxRef, until: Millis) -> bool {
        if self.meta(key, r).is_none() {
            return false;
        }
        let held = self.held_mut();
        held.by_key.entry(key.clone()).or_default().push((r, until));
        true
    }

    /// A joiner of `key` takes over one of its held presences: one with the same client meta if
    /// any (then `true`), else the oldest.
    pub(crate) fn take_held(&mut self, key: &UserKey, meta: &Meta) -> Option<(PhxRef, bool)> {
        let held = self.held.as_mut()?;
        let refs = held.by_key.get_mut(key)?;
        let metas = self.presences.get(key);
        let same = |(r, _): &(PhxRef, Millis)| {
            metas
                .and_then(|ms| ms.iter().find(|m| m.is_ref(*r)))
                .is_some_and(|m| same_meta(m, meta))
        };
        let (at, equal) = match refs.iter().position(same) {
            Some(at) => (at, true),
            None => (0, false),
        };
        let (r, _) = refs.remove(at);
        if refs.is_empty() {
            held.by_key.remove(key);
        }
        self.shrink_held();
        Some((r, equal))
    }

    /// The grace of held presence `r`, held until `until`, ended: true if it is still held by
    /// that hold (it must leave now). A hold taken over and held again later has a later end.
    pub(crate) fn release_held(&mut self, key: &UserKey, r: PhxRef, until: Millis) -> bool {
        let Some(refs) = self.held.as_mut().and_then(|h| h.by_key.get_mut(key)) else {
            return false;
        };
        let Some(at) = refs.iter().position(|x| *x == (r, until)) else {
            return false;
        };
        // `remove`, not `swap_remove`: take_held's "oldest" is the first.
        refs.remove(at);
        if refs.is_empty() {
            self.held.as_mut().map(|h| h.by_key.remove(key));
        }
        self.shrink_held();
        true
    }

    /// Whether presence `r` of `key` is held by a grace (its connection closed, or it is of
    /// this node's previous run): no connection of this node has it.
    pub(crate) fn is_held(&self, key: &UserKey, r: PhxRef) -> bool {
        let held = self.held.as_ref().and_then(|h| h.by_key.get(key));
        held.is_some_and(|refs| refs.iter().any(|(h, _)| *h == r))
    }

    /// Presence `r` of `key` is held no longer, whatever its grace (another node claimed it).
    pub(crate) fn unhold(&mut self, key: &UserKey, r: PhxRef) {
        let Some(refs) = self.held.as_mut().and_then(|h| h.by_key.get_mut(key)) else {
            return;
        };
        refs.retain(|(h, _)| *h != r);
        if refs.is_empty() {
            self.held.as_mut().map(|h| h.by_key.remove(key));
        }
        self.shrink_held();
    }

    /// This node's presence `old` is now `new` (see `TopicOwner::reclaim`): messages of its
    /// connection that name `old`, or an alias of it, mean `new`.
    pub(crate) fn realias(&mut self, old: PhxRef, new: PhxRef) {
        let held = self.held_mut();
        for to in held.aliases.values_mut().filter(|to| **to == old) {
            *to = new;
        }
        held.aliases.insert(old, new);
    }

    pub(crate) fn add_alias(&mut self, alias: PhxRef, adopted: PhxRef) {
        let held = self.held_mut();
        held.aliases.insert(alias, adopted);
    }

    /// The presence a connection's message means by `r`: `r` itself unless `r` is an alias of an
    /// adopted presence. The alias ends here: the message that used it leaves or replaces it.
    pub(crate) fn resolve(&mut self, r: PhxRef) -> PhxRef {
        let Some(held) = self.held.as_mut() else {
            return r;
        };
        let resolved = held.aliases.remove(&r).unwrap_or(r);
        self.shrink_held();
        resolved
    }

    fn shrink_held(&mut self) {
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.by_key.is_empty() && h.aliases.is_empty() && h.twins.is_empty())
        {
            self.held = None;
        }
    }

    /// Whether any leave-grace bookkeeping (held presences, aliases, twins) is here.
    pub(crate) fn in_grace(&self) -> bool {
        self.held.is_some()
    }

    /// Whether `key` has a presence here with the same client meta as `meta`.
    pub(crate) fn has_same(&self, key: &UserKey, meta: &Meta) -> bool {
        self.presences
            .get(key)
            .is_some_and(|ms| ms.iter().any(|m| same_meta(m, meta)))
    }

    pub(crate) fn add_twin(&mut self, twin: Twin) {
        self.held_mut().twins.push(twin);
    }

    /// The oldest twin of presence `meta` of `key` (same key, same client meta).
    pub(crate) fn take_twin(&mut self, key: &UserKey, meta: &Meta) -> Option<Twin> {
        self.take_twin_where(|t| &t.track.key == key && same_meta(&t.track.meta, meta))
    }

    /// Every twin, oldest first.
    pub(crate) fn take_twins(&mut self) -> Vec<Twin> {
        let Some(held) = self.held.as_mut() else {
            return Vec::new();
        };
        let twins = std::mem::take(&mut held.twins);
        self.shrink_held();
        twins
    }

    /// The twin whose own ref is `r`, if `r` is one.
    pub(crate) fn remove_twin(&mut self, r: PhxRef) -> Option<Twin> {
        self.take_twin_where(|t| t.track.phx_ref == r)
    }

    fn take_twin_where(&mut self, pred: impl Fn(&Twin) -> bool) -> Option<Twin> {
        let twins = &mut self.held.as_mut()?.twins;
        let at = twins.iter().position(pred)?;
        let twin = twins.remove(at);
        self.shrink_held();
        Some(twin)
    }

    /// Twins whose grace ended by `now`: they are announced.
    pub(crate) fn due_twins(&mut self, now: Millis) -> Vec<Twin> {
        let Some(held) = self.held.as_mut() else {
            return Vec::new();
        };
        let (due, keep) = std::mem::take(&mut held.twins)
            .into_iter()
            .partition(|t| t.until.0 <= now.0);
        held.twins = keep;
        self.shrink_held();
        due
    }

    /// The meta a connection's message means by `r`, wherever it is kept: a twin, a presence
    /// not tracked yet (cluster), or the table under `r` or the presence `r` is an alias of.
    pub(crate) fn current_meta(&self, key: &UserKey, r: PhxRef) -> Option<&Meta> {
        let held = self.held.as_deref();
        if let Some(twin) = held.and_then(|h| h.twins.iter().find(|t| t.track.phx_ref == r)) {
            return Some(&twin.track.meta);
        }
        let deferred = self.cluster().map_or(&[][..], |c| &c.deferred[..]);
        if let Some((track, _)) = deferred.iter().find(|(t, _)| t.phx_ref == r) {
            return Some(&track.meta);
        }
        let resolved = held.and_then(|h| h.aliases.get(&r)).copied();
        self.meta(key, resolved.unwrap_or(r))
    }

    pub(crate) fn meta(&self, key: &UserKey, r: PhxRef) -> Option<&Meta> {
        self.presences.get(key)?.iter().find(|m| m.is_ref(r))
    }

    /// `(keys, metas)`.
    pub(crate) fn counts(&self) -> (u32, u32) {
        (self.presences.len() as u32, self.metas)
    }

    /// Nothing of this node's own tracked, nobody subscribed, nothing to send, on no list: the
    /// topic (and any other node's part of it) can be forgotten.
    pub(crate) fn is_idle(&self) -> bool {
        let own_empty = match self.cluster.as_deref() {
            Some(c) => c.own_is_empty(),
            None => self.presences.is_empty(),
        };
        own_empty
            && self.subs.is_empty()
            && !self.has_pending()
            && !self.listed_for_flush
            && !self.listed_for_count
            && self.window_until.is_none()
            && self.waiting.is_empty()
            && self.held.is_none()
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.joins.is_empty() || !self.pending.leaves.is_empty()
    }

    /// Writes the presence map `{KEY: {"metas": [...]}}` of everything tracked now.
    pub(crate) fn encode_state(&self, out: &mut Vec<u8>) {
        let mut map = PresenceMap::new(out);
        for (key, metas) in &self.presences {
            map.key(key.as_str());
            for m in metas {
                map.meta(m.bytes());
            }
        }
        map.finish();
    }

    pub(crate) fn discard_pending(&mut self) {
        self.pending = Pending::default();
    }

    /// Turns the pending changes into one `presence_diff` frame in `out`. A join and a leave of
    /// the same ref within one batch cancel out: no subscriber had seen that presence. Returns
    /// false (and writes nothing) when nothing is left to say.
    pub(crate) fn take_diff(&mut self, topic: &str, out: &mut Vec<u8>) -> bool {
        let Pending {
            mut joins,
            mut leaves,
        } = std::mem::take(&mut self.pending);
        if !joins.is_empty() && !leaves.is_empty() {
            // A ref's joins and leaves alternate, and one ref is one meta: as many of each as
            // both have cancel out. (Locally a ref joins and leaves once; another node's part
            // may leave, join and leave again within one batch when it is fetched again.)
            let mut joined: ahash::HashMap<_, u32> = ahash::HashMap::default();
            for j in &joins {
                *joined.entry(j.1.ref_text()).or_default() += 1;
            }
            let mut cancel: ahash::HashMap<_, u32> = ahash::HashMap::default();
            for l in &leaves {
                let r = l.1.ref_text();
                if let Some(n) = joined.get_mut(&r).filter(|n| **n > 0) {
                    *n -= 1;
                    *cancel.entry(r).or_default() += 1;
                }
            }
            if !cancel.is_empty() {
                let mut from_joins = cancel.clone();
                joins.retain(|j| !take_one(&mut from_joins, j.1.ref_text()));
                leaves.retain(|l| !take_one(&mut cancel, l.1.ref_text()));
            }
        }
        if joins.is_empty() && leaves.is_empty() {
            return false;
        }
        let mut diff = DiffFrame::new(out, topic);
        write_grouped(diff.joins(), &mut joins);
        write_grouped(diff.leaves(), &mut leaves);
        diff.finish();
        true
    }

    /// Whether a count push is due, marking it sent if so.
    /// When a count push falls due, if a change waits for one and someone counts. (A change
    /// nobody counts is dropped at the next tick; no need to wake for it.)
    pub(crate) fn count_due_at(&self, now: Millis, interval: Millis) -> Option<Millis> {
        let wanted = self.count_dirty && self.count_shards().next().is_some();
        wanted.then(|| {
            self.count_sent
                .map_or(now, |sent| Millis(sent.0.saturating_add(interval.0)))
        })
    }

    pub(crate) fn take_count_due(&mut self, now: Millis, interval: Millis) -> bool {
        let due = self.count_dirty
            && self
                .count_sent
                .is_none_or(|sent| now.0 >= sent.0.saturating_add(interval.0));
        if due {
            self.count_dirty = false;
            self.count_sent = Some(now);
        }
        due
    }

    pub(crate) fn count_dirty(&self) -> bool {
        self.count_dirty
    }

    /// Nobody to tell about this change: a later count subscriber gets counts in its join
    /// reply, and its first push is not held back by a push that never happened.
    pub(crate) fn forget_count_change(&mut self) {
        self.count_dirty = false;
    }

    /// Calls `f` with each presence's key and stored meta.
    pub(crate) fn each_presence(&self, f: &mut impl FnMut(&UserKey, &Meta)) {
        for (k, metas) in &self.presences {
            metas.iter().for_each(|m| f(k, m));
        }
    }

    pub(crate) fn view(&self) -> TopicView {
        let mut presences: Vec<(UserKey, Vec<Meta>)> = self
            .presences
            .iter()
            .map(|(k, metas)| (k.clone(), metas.to_vec()))
            .collect();
        presences.sort_by(|a, b| a.0.cmp(&b.0));
        TopicView { presences }
    }
}

/// Takes one of `r` from the counts: true if there was one.
fn take_one(
    counts: &mut ahash::HashMap<[u8; PhxRef::TEXT_LEN], u32>,
    r: [u8; PhxRef::TEXT_LEN],
) -> bool {
    match counts.get_mut(&r) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// Two stored metas with the same client fields, whatever their refs.
pub(crate) fn same_meta(a: &Meta, b: &Meta) -> bool {
    stored_body(a.bytes()) == stored_body(b.bytes())
}

/// JSON objects keep only the last of repeated keys, so all metas of one key must be written
/// under one key: sort by key (stable, so per-key order is kept) and group.
fn write_grouped(mut map: PresenceMap<'_>, changes: &mut [(UserKey, Meta)]) {
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut last: Option<&UserKey> = None;
    for (key, meta) in changes.iter() {
        if last != Some(key) {
            map.key(key.as_str());
            last = Some(key);
        }
        map.meta(meta.bytes());
    }
    map.finish();
}

#[cfg(test)]
mod tests {

    use roster_proto::ClientMeta;

    use super::*;

    fn meta(r: u64) -> Meta {
        let mut out = Vec::new();
        ClientMeta::from_json(r#"{"n":1}"#)
            .expect("meta")
            .encode(&mut out, None, PhxRef(r), None);
        Meta::new(&out)
    }

    fn diff(t: &mut Topic) -> Option<serde_json::Value> {
        let mut out = Vec::new();
        t.take_diff("t", &mut out)
            .then(|| serde_json::from_slice::<serde_json::Value>(&out).expect("JSON")[4].clone())
    }

    #[test]
    fn join_and_leave_in_one_batch_cancel_out() {
        let mut t = Topic::new(Seeds::new(0));
        let k = UserKey::new("k");
        t.track(k.clone(), meta(1));
        assert_eq!(t.untrack(&k, PhxRef(1)), Some(meta(1)));
        assert_eq!(diff(&mut t), None);
        assert!(t.presences.is_empty());
    }

    #[test]
    fn metas_of_one_key_are_grouped_under_one_key() {
        let mut t = Topic::new(Seeds::new(0));
        let (a, b) = (UserKey::new("a"), UserKey::new("b"));
        t.track(a.clone(), meta(1));
        t.track(b.clone(), meta(2));
        t.track(a.clone(), meta(3));
        let d = diff(&mut t).expect("a diff");
        assert_eq!(
            d["joins"]["a"]["metas"].as_array().map(Vec::len),
            Some(2),
            "{d}"
        );
        assert_eq!(
            d["joins"]["b"]["metas"].as_array().map(Vec::len),
            Some(1),
            "{d}"
        );
        assert_eq!(t.counts(), (2, 3));
        t.untrack(&a, PhxRef(3));
        t.untrack(&a, PhxRef(1));
        assert_eq!(t.untrack(&a, PhxRef(1)), None, "already gone");
        let d = diff(&mut t).expect("a diff");
        assert_eq!(
            d["leaves"]["a"]["metas"].as_array().map(Vec::len),
            Some(2),
            "{d}"
        );
        assert_eq!(t.counts(), (1, 1));
    }

    #[test]
    fn subscriber_counts_per_shard() {
        let mut t = Topic::new(Seeds::new(0));
        t.subscribe(ShardId(1), PresenceMode::Full);
        t.subscribe(ShardId(1), PresenceMode::Count);
        t.subscribe(ShardId(2), PresenceMode::None);
        assert_eq!(t.full_shards().collect::<Vec<_>>(), [ShardId(1)]);
        assert_eq!(t.count_shards().collect::<Vec<_>>(), [ShardId(1)]);
        t.unsubscribe(ShardId(1), PresenceMode::Full);
        t.unsubscribe(ShardId(1), PresenceMode::Count);
        t.unsubscribe(ShardId(2), PresenceMode::None);
        assert!(t.is_idle());
    }
}
