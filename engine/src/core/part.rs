//! A name's cluster side, on the node's owner shard of the name: the other nodes' parts it
//! holds (see `cluster::parts`), and this node's own part as it publishes it (the presences
//! this node's clients are tracked with, and their changes since the last delta). A topic's
//! parts are keyed by user key; a user's (for watch lists) by topic name.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use roster_proto::PhxRef;

use crate::cluster::frame::{Delta, Kind, Left, Origin, Part, Presence};
use crate::cluster::parts::RemoteParts;
use crate::core::{Meta, TopicName, UserKey};

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
    joins: Vec<(K, u64, Meta)>,
    leaves: Vec<(K, u64)>,
    /// The seq of this node's last delta on this topic since interest started (0: none).
    last: u64,
}

impl<K: Clone + Ord + Borrow<str>> NameCluster<K> {
    /// Interest starts: the other parts are being fetched.
    pub(crate) fn new(kind: Kind, me: u64, epoch: u64) -> NameCluster<K> {
        NameCluster {
            kind,
            epoch,
            remote: RemoteParts::fetching(me),
            own: BTreeMap::new(),
            joins: Vec::new(),
            leaves: Vec::new(),
            last: 0,
        }
    }

    pub(crate) fn own_is_empty(&self) -> bool {
        self.own.is_empty()
    }

    /// Presences of this node's own part.
    pub(crate) fn own_len(&self) -> usize {
        self.own.len()
    }

    /// A presence of this node joined.
    pub(crate) fn joined(&mut self, key: &K, meta: &Meta) {
        let r = ref_of(meta);
        self.own.insert((key.clone(), r), meta.clone());
        self.joins.push((key.clone(), r, meta.clone()));
    }

    /// A presence of this node left. Its leave goes out even if its join has not yet: a part
    /// sent meanwhile may have shown the join (receivers apply a delta's joins before its
    /// leaves, so the pair nets out where the join was not seen).
    pub(crate) fn left(&mut self, key: &K, r: PhxRef) {
        self.own.remove(&(key.clone(), r.0));
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
        let presences = own.map(|((k, r), m)| presence((k.clone(), *r, m.clone())));
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
        }
    }
}

fn presence<K: Borrow<str>>((key, phx_ref, meta): (K, u64, Meta)) -> Presence {
    Presence {
        key: key.borrow().to_owned(),
        phx_ref,
        meta: meta.bytes().to_vec(),
    }
}

/// The ref a stored meta carries (its tail).
fn ref_of(meta: &Meta) -> u64 {
    let text = meta.ref_text();
    let text = std::str::from_utf8(&text).unwrap_or_default();
    PhxRef::parse(text).map_or(0, |r| r.0)
}
