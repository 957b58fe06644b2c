//! Slow consumers being resynced: the one record of who is. Between [`Shard::resync`] and
//! [`Shard::drained`] the driver drops every diff for such a connection, and subscriptions that
//! start meanwhile wait for the drain too; one that does not drain within the slow-consumer
//! timeout is closed.
//!
//! [`Shard::resync`]: crate::core::Shard::resync
//! [`Shard::drained`]: crate::core::Shard::drained

use crate::core::hash::{Map, Seeds};
use crate::core::{ConnId, Millis};

pub(crate) struct Resyncing {
    /// When each lost its diffs.
    since: Map<ConnId, Millis>,
}

impl Resyncing {
    pub(crate) fn new(seeds: Seeds) -> Self {
        Resyncing { since: seeds.map() }
    }

    /// `conn` starts resyncing now; false if it already was (its timeout keeps running from
    /// the first overflow).
    pub(crate) fn start(&mut self, conn: ConnId, now: Millis) -> bool {
        if self.since.contains_key(&conn) {
            return false;
        }
        self.since.insert(conn, now);
        true
    }

    pub(crate) fn contains(&self, conn: ConnId) -> bool {
        // Asked for every delivered diff and every drained write: almost always nobody is
        // resyncing, and then no key is hashed.
        !self.since.is_empty() && self.since.contains_key(&conn)
    }

    /// `conn` drained (or closed): true if it was resyncing.
    pub(crate) fn end(&mut self, conn: ConnId) -> bool {
        !self.since.is_empty() && self.since.remove(&conn).is_some()
    }

    /// Those resyncing for `timeout` or more at `now`, in a fixed order (the table's is the
    /// hasher's).
    pub(crate) fn stuck(&self, now: Millis, timeout: Millis) -> Vec<ConnId> {
        let mut stuck: Vec<ConnId> = self
            .since
            .iter()
            .filter(|(_, since)| now.0.saturating_sub(since.0) >= timeout.0)
            .map(|(c, _)| *c)
            .collect();
        stuck.sort_unstable();
        stuck
    }

    /// When the first of them runs out of `timeout`.
    pub(crate) fn next_deadline(&self, timeout: Millis) -> Option<Millis> {
        let deadlines = self.since.values();
        deadlines
            .map(|s| Millis(s.0.saturating_add(timeout.0)))
            .min()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}
