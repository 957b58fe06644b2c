//! A topic's cluster side, on the node's owner shard of the topic: the other nodes' parts it
//! holds (see `cluster::parts`), and this node's own part as it publishes it (the presences
//! this node's clients are tracked with, and their changes since the last delta).

use std::collections::BTreeMap;

use roster_proto::PhxRef;

use crate::cluster::frame::{Delta, Kind, Left, Origin, Part, Presence};
use crate::cluster::parts::RemoteParts;
use crate::core::{Meta, UserKey};

#[derive(Debug)]
pub(crate) struct TopicCluster {
    pub(crate) remote: RemoteParts,
    /// This node's part: what it answers part requests with.
    own: BTreeMap<(UserKey, u64), Meta>,
    joins: Vec<(UserKey, u64, Meta)>,
    leaves: Vec<(UserKey, u64)>,
    /// The last delta of this node's part on this topic.
    seq: u64,
}

impl TopicCluster {
    /// Interest starts: the other parts are being fetched.
    pub(crate) fn new(me: u64) -> TopicCluster {
        TopicCluster {
            remote: RemoteParts::fetching(me),
            own: BTreeMap::new(),
            joins: Vec::new(),
            leaves: Vec::new(),
            seq: 0,
        }
    }

    pub(crate) fn own_is_empty(&self) -> bool {
        self.own.is_empty()
    }

    /// A presence of this node joined.
    pub(crate) fn joined(&mut self, key: &UserKey, meta: &Meta) {
        let r = ref_of(meta);
        self.own.insert((key.clone(), r), meta.clone());
        self.joins.push((key.clone(), r, meta.clone()));
    }

    /// A presence of this node left. One that joined since the last delta is simply not
    /// announced (receivers apply a delta's leaves before its joins).
    pub(crate) fn left(&mut self, key: &UserKey, r: PhxRef) {
        self.own.remove(&(key.clone(), r.0));
        match self.joins.iter().position(|(_, j, _)| *j == r.0) {
            Some(at) => {
                self.joins.remove(at);
            }
            None => self.leaves.push((key.clone(), r.0)),
        }
    }

    /// The changes to this node's part since the last delta, as the next delta.
    pub(crate) fn take_delta(&mut self, name: &str, origin: Origin) -> Option<Delta> {
        if self.joins.is_empty() && self.leaves.is_empty() {
            return None;
        }
        self.seq += 1;
        let joins = std::mem::take(&mut self.joins);
        let leaves = std::mem::take(&mut self.leaves);
        Some(Delta {
            kind: Kind::Topic,
            name: name.to_owned(),
            origin,
            seq: self.seq,
            prev: self.seq - 1,
            joins: joins.into_iter().map(presence).collect(),
            leaves: leaves
                .into_iter()
                .map(|(k, r)| Left {
                    key: k.as_str().to_owned(),
                    phx_ref: r,
                })
                .collect(),
        })
    }

    /// This node's part now, for a part request, labelled with its last delta's seq. Changes
    /// since that delta are in it already and in the next delta too: applying a join of a
    /// presence held, or a leave of one not held, changes nothing (see `RemotePart::apply`).
    pub(crate) fn own_part(&self, name: &str, origin: Origin) -> Part {
        let own = self.own.iter();
        let presences = own.map(|((k, r), m)| presence((k.clone(), *r, m.clone())));
        let mut holders = self.remote.holders();
        holders.push(origin.node);
        Part {
            kind: Kind::Topic,
            name: name.to_owned(),
            origin,
            seq: self.seq,
            presences: presences.collect(),
            holders,
            chunk: 0,
            chunks: 1,
        }
    }
}

fn presence((key, phx_ref, meta): (UserKey, u64, Meta)) -> Presence {
    Presence {
        key: key.as_str().to_owned(),
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
