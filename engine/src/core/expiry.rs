//! When each connection's token expires (on the driver's clock): only connections whose token
//! has an `exp` are here, so development mode and long-lived tokens cost nothing.

use std::collections::BTreeSet;

use crate::core::hash::{Map, Seeds};
use crate::core::{ConnId, Millis};

pub(crate) struct Expiries {
    at: Map<ConnId, Millis>,
    due: BTreeSet<(Millis, ConnId)>,
}

impl Expiries {
    pub(crate) fn new(seeds: Seeds) -> Self {
        Expiries {
            at: seeds.map(),
            due: BTreeSet::new(),
        }
    }

    /// `conn`'s token expires at `at` (None: never), in place of what it had.
    pub(crate) fn set(&mut self, conn: ConnId, at: Option<Millis>) {
        self.remove(conn);
        if let Some(at) = at {
            self.at.insert(conn, at);
            self.due.insert((at, conn));
        }
    }

    pub(crate) fn remove(&mut self, conn: ConnId) {
        if let Some(at) = self.at.remove(&conn) {
            self.due.remove(&(at, conn));
        }
    }

    /// Connections whose token has expired by `now`, taken out.
    pub(crate) fn expired(&mut self, now: Millis) -> Vec<ConnId> {
        let mut out = Vec::new();
        while let Some(&(at, conn)) = self.due.first() {
            if at > now {
                break;
            }
            self.due.pop_first();
            self.at.remove(&conn);
            out.push(conn);
        }
        out
    }

    pub(crate) fn next(&self) -> Option<Millis> {
        self.due.first().map(|d| d.0)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at.is_empty() && self.due.is_empty()
    }
}
