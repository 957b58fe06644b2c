//! A name's cluster side, on the node's owner shard of the name: the other nodes' parts it
//! holds (see `cluster::parts`), and this node's own part as it publishes it (the presences
//! this node's clients are tracked with, and their changes since the last delta). A topic's
//! parts are keyed by user key; a user's (for watch lists) by topic name.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use roster_proto::PhxRef;

use crate::cluster::frame::{
    part_frames, Delta, Frame, Kind, Left, Origin, Part, PartRequest, Presence,
};
use crate::cluster::parts::RemoteParts;
use crate::core::outbox::{NatsOut, Outbox};
use crate::core::{ClusterConfig, ConnAddr, Meta, Millis, TopicName, Track, UserKey};

/// A topic's cluster side: its presences by user key.
pub(crate) type TopicCluster = NameCluster<UserKey>;
/// A user's cluster side: its presences by topic.
pub(crate) type UserCluster = NameCluster<TopicName>;

#[derive(Debug)]
pub(crate) struct NameCluster<K> {
    kind: Kind,
    /// This interest's number on the owner shard (see `PartRequest::ask`).
    pub(crate) epoch: u64,
    pub(crate) remote: RemoteParts,
    /// This node's part: what it answers part requests with.
    own: BTreeMap<(K, u64), Meta>,
    /// Those of its presences no connection has: taken back from the state file and not
    /// claimed by a client yet (see `Presence::held`).
    own_held: BTreeSet<(K, u64)>,
    joins: Vec<(K, u64, Meta, bool)>,
    leaves: Vec<(K, u64)>,
    /// The seq of this node's last delta on this topic since interest started (0: none).
    last: u64,
    /// Presences of joins made while the first fetch is on (a topic's): tracked once it is
    /// complete, so that a join can take over a presence that only the fetch shows.
    pub(crate) deferred: Vec<(Track, ConnAddr)>,
}

impl<K: Clone + Ord + Borrow<str>> NameCluster<K> {
    /// Interest starts: the other parts are being fetched.
    pub(crate) fn new(kind: Kind, me: u64, epoch: u64) -> NameCluster<K> {
        NameCluster {
            kind,
            epoch,
            remote: RemoteParts::fetching(me),
            own: BTreeMap::new(),
            own_held: BTreeSet::new(),
            joins: Vec::new(),
            leaves: Vec::new(),
            last: 0,
            deferred: Vec::new(),
        }
    }

    /// Nothing of this node's part, and no presence waiting to join it.
    pub(crate) fn own_is_empty(&self) -> bool {
        self.own.is_empty() && self.deferred.is_empty()
    }

    /// Takes the deferred presence of ref `r` (its connection left or changed it first).
    pub(crate) fn take_deferred(&mut self, r: PhxRef) -> Option<(Track, ConnAddr)> {
        let at = self.deferred.iter().position(|(t, _)| t.phx_ref == r)?;
        Some(self.deferred.swap_remove(at))
    }

    /// Whether `part` answers this interest's requests (or nobody's: a holder announcing its
    /// part), and not an interest given up since.
    pub(crate) fn takes(&self, part: &Part) -> bool {
        part.ask == 0 || part.ask == self.epoch
    }

    /// The first fetch is complete: this node answers part requests from now on, and says what
    /// its own part holds (a node whose request crossed this one's unanswered, as it was
    /// fetching too, hears it that way).
    pub(crate) fn fetched(&self, c: &ClusterConfig, name: &str, floor: u64, tx: &mut Outbox) {
        let scope = self.kind.into();
        tx.nats(NatsOut::Subscribe(c.subjects.parts(scope, name)));
        if !self.own.is_empty() {
            self.announce(c, name, floor, tx);
        }
    }

    /// Publishes this node's part on the name's deltas subject (in order with its deltas), for
    /// holders that may not have it: one whose request crossed this node's first fetch, or
    /// whose request this node may have lost (then even an empty part: the asker waits for
    /// it, holding what this node's lost deltas would have taken away).
    pub(crate) fn announce(&self, c: &ClusterConfig, name: &str, floor: u64, tx: &mut Outbox) {
        if self.remote.is_fetching() {
            return;
        }
        let part = self.own_part(name, c.me, floor, 0);
        for frame in part_frames(part, c.max_payload) {
            let subject = c.subjects.deltas(self.kind.into(), name);
            tx.nats(NatsOut::Publish { subject, frame });
        }
    }

    /// Asks every node whose part is being fetched again, and has not come, once more,
    /// directly; true if there was any (see `Retries`).
    pub(crate) fn reask(&self, c: &ClusterConfig, name: &str, tx: &mut Outbox) -> bool {
        let nodes = self.remote.awaiting();
        for &node in &nodes {
            tx.nats(ask(c, self.kind, name, c.subjects.node(node), self.epoch));
        }
        !nodes.is_empty()
    }

    /// Whether this node's part has presence `r` of `key`.
    pub(crate) fn owns(&self, key: &K, r: u64) -> bool {
        self.own.contains_key(&(key.clone(), r))
    }

    /// The stored meta of this node's presence `r` of `key`.
    pub(crate) fn own_meta(&self, key: &K, r: u64) -> Option<&Meta> {
        self.own.get(&(key.clone(), r))
    }

    /// Whether this node's part changed since its last delta.
    pub(crate) fn has_delta(&self) -> bool {
        !self.joins.is_empty() || !self.leaves.is_empty()
    }

    /// Presences of this node's own part.
    pub(crate) fn own_len(&self) -> usize {
        self.own.len()
    }

    /// A presence of this node joined. `held`: one of its previous run, taken back with no
    /// connection yet, which any node may take over for a client of its key that comes back.
    pub(crate) fn joined(&mut self, key: &K, meta: &Meta, held: bool) {
        let r = ref_of(meta);
        self.own.insert((key.clone(), r), meta.clone());
        if held {
            self.own_held.insert((key.clone(), r));
        }
        self.joins.push((key.clone(), r, meta.clone(), held));
    }

    /// A held presence of this node's part is a connection's now: joined again, unheld.
    pub(crate) fn claimed(&mut self, key: &K, r: u64) {
        let id = (key.clone(), r);
        if self.own_held.remove(&id) {
            if let Some(meta) = self.own.get(&id) {
                self.joins.push((id.0, r, meta.clone(), false));
            }
        }
    }

    /// Whether this node's presence `r` of `key` is one no connection has claimed yet.
    pub(crate) fn owns_held(&self, key: &K, r: u64) -> bool {
        !self.own_held.is_empty() && self.own_held.contains(&(key.clone(), r))
    }

    /// A presence of this node left. Its leave goes out even if its join has not yet: a part
    /// sent meanwhile may have shown the join (receivers apply a delta's joins before its
    /// leaves, so the pair nets out where the join was not seen).
    pub(crate) fn left(&mut self, key: &K, r: PhxRef) {
        self.own.remove(&(key.clone(), r.0));
        if !self.own_held.is_empty() {
            self.own_held.remove(&(key.clone(), r.0));
        }
        self.leaves.push((key.clone(), r.0));
    }

    /// The changes to this node's part since the last delta, as the next delta. `counter` is
    /// the owner shard's, for all its topics: a topic forgotten and made again must not start
    /// its seqs over, or receivers would take its new deltas for ones they have applied.
    pub(crate) fn take_delta(
        &mut self,
        name: &str,
        origin: Origin,
        counter: &mut u64,
    ) -> Option<Delta> {
        if self.joins.is_empty() && self.leaves.is_empty() {
            return None;
        }
        *counter += 1;
        let (seq, prev) = (*counter, self.last);
        self.last = seq;
        let joins = std::mem::take(&mut self.joins);
        let leaves = std::mem::take(&mut self.leaves);
        Some(Delta {
            kind: self.kind,
            name: name.to_owned(),
            origin,
            seq,
            prev,
            joins: joins.into_iter().map(presence).collect(),
            leaves: leaves
                .into_iter()
                .map(|(k, r)| Left {
                    key: k.borrow().to_owned(),
                    phx_ref: r,
                })
                .collect(),
        })
    }

    /// This node's part now, for a part request, labelled with its last delta's seq. Changes
    /// since that delta are in it already and in the next delta too: applying a join of a
    /// presence held, or a leave of one not held, changes nothing (see `RemotePart::apply`).
    /// `ask`: the request's, or 0 when nobody asked.
    pub(crate) fn own_part(&self, name: &str, origin: Origin, floor: u64, ask: u64) -> Part {
        let own = self.own.iter();
        let presences = own.map(|((k, r), m)| {
            let held = self.owns_held(k, *r);
            presence((k.clone(), *r, m.clone(), held))
        });
        let mut holders = self.remote.holders();
        holders.push(origin.node);
        Part {
            kind: self.kind,
            name: name.to_owned(),
            origin,
            seq: self.last,
            floor,
            presences: presences.collect(),
            holders,
            ask,
            chunk: 0,
            chunks: 1,
            relayed: false,
        }
    }
}

/// Names whose parts are being fetched again from some nodes, and when to ask those again
/// if they have not answered: a request or its answer may be lost (NATS promises nothing), and
/// a node that has forgotten the name since will not announce it.
#[derive(Debug)]
pub(crate) struct Retries<N> {
    /// In the order their times come (every wait is the same, and time only goes forward).
    due: VecDeque<(Millis, N)>,
    /// The names in `due`, each once: a gap may ask for thousands of names at once, and a
    /// tick must not scan them all.
    listed: BTreeSet<N>,
}

impl<N: Ord + Clone> Retries<N> {
    pub(crate) fn new() -> Retries<N> {
        Retries {
            due: VecDeque::new(),
            listed: BTreeSet::new(),
        }
    }

    /// Some node was asked for `name`'s part again at `now`.
    pub(crate) fn asked(&mut self, name: &N, now: Millis, wait: Millis) {
        if self.listed.insert(name.clone()) {
            let at = Millis(now.0.saturating_add(wait.0));
            debug_assert!(self.due.back().is_none_or(|b| b.0 <= at));
            self.due.push_back((at, name.clone()));
        }
    }

    /// Names whose retry time has come (taken off: ask again, and call `asked` again).
    pub(crate) fn due(&mut self, now: Millis) -> Vec<N> {
        let mut due = Vec::new();
        while self.due.front().is_some_and(|(at, _)| at.0 <= now.0) {
            let (_, name) = self.due.pop_front().expect("front exists");
            self.listed.remove(&name);
            due.push(name);
        }
        due
    }

    pub(crate) fn next(&self) -> Option<Millis> {
        self.due.front().map(|(at, _)| *at)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

/// A request for `name`'s parts on `subject` (every holder's, or one node's), on behalf of the
/// asker's interest `ask`.
pub(crate) fn ask(c: &ClusterConfig, kind: Kind, name: &str, subject: String, ask: u64) -> NatsOut {
    let request = Frame::PartRequest(PartRequest {
        kind,
        name: name.to_owned(),
        from: c.me,
        ask,
    });
    NatsOut::Request {
        subject,
        kind,
        name: name.to_owned(),
        frame: request.encode(),
    }
}

/// Answers request `q` on its reply subject `to` with this node's part of the name (`held`).
/// A node asked about a name it holds nothing of (it forgot it, or the request overtook its
/// interest) answers all the same, with an empty part: the asker must not wait for it.
/// `floor` is the owner shard's delta counter for the name's kind.
pub(crate) fn answer<K: Clone + Ord + Borrow<str>>(
    c: &ClusterConfig,
    q: &PartRequest,
    held: Option<&NameCluster<K>>,
    floor: u64,
    to: &str,
    tx: &mut Outbox,
) {
    let part = match held {
        Some(side) => side.own_part(&q.name, c.me, floor, q.ask),
        None => Part {
            kind: q.kind,
            name: q.name.clone(),
            origin: c.me,
            seq: 0,
            floor,
            presences: Vec::new(),
            holders: vec![c.me.node],
            ask: q.ask,
            chunk: 0,
            chunks: 1,
            relayed: false,
        },
    };
    // What this node holds of ended nodes first: the asker's fetch may complete with this
    // node's own part, and replies to one inbox come in order.
    let ended = held
        .map(|side| side.remote.ended_parts())
        .unwrap_or_default();
    for (origin, presences) in ended {
        let relayed = Part {
            kind: q.kind,
            name: q.name.clone(),
            origin,
            seq: 0,
            floor: 0,
            presences,
            holders: Vec::new(),
            ask: q.ask,
            chunk: 0,
            chunks: 1,
            relayed: true,
        };
        for frame in part_frames(relayed, c.max_payload) {
            let to = to.to_owned();
            tx.nats(NatsOut::Reply { to, frame });
        }
    }
    for frame in part_frames(part, c.max_payload) {
        let to = to.to_owned();
        tx.nats(NatsOut::Reply { to, frame });
    }
}

fn presence<K: Borrow<str>>((key, phx_ref, meta, held): (K, u64, Meta, bool)) -> Presence {
    Presence {
        key: key.borrow().to_owned(),
        phx_ref,
        meta: meta.bytes().to_vec(),
        held,
    }
}

/// The ref a stored meta carries (its tail).
pub(crate) fn ref_of(meta: &Meta) -> u64 {
    let text = meta.ref_text();
    let text = std::str::from_utf8(&text).unwrap_or_default();
    PhxRef::parse(text).map_or(0, |r| r.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_come_due_in_order_once_per_name() {
        let mut r = Retries::new();
        let wait = Millis(100);
        r.asked(&"a", Millis(0), wait);
        r.asked(&"b", Millis(10), wait);
        r.asked(&"a", Millis(20), wait); // already listed: its first time stands
        assert_eq!(r.next(), Some(Millis(100)));
        assert!(r.due(Millis(99)).is_empty());
        assert_eq!(r.due(Millis(100)), ["a"]);
        r.asked(&"a", Millis(100), wait);
        assert_eq!(r.due(Millis(250)), ["b", "a"]);
        assert!(r.is_empty() && r.next().is_none());
    }
}
