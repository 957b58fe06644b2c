//! Whether each connection is alive: the heartbeat timeout and the message timeout. Only text
//! messages are activity: phoenix.js sends a `heartbeat` message every 30 s, and a client that
//! only pings, or dribbles one message forever, is not alive as far as presence goes. A message
//! begun (the driver saw its first bytes) must be complete within the message timeout.
//!
//! The deadlines live in one hashed timer wheel per shard instead of one reactor timer per
//! connection (a million heartbeat deadlines would be a million BTreeMap entries); when each
//! connection last sent a text message is kept in its record, so the wheel only says when to
//! look. Every open connection has exactly one entry in the wheel; a closed one's entry stays
//! until it comes up, counted in `stale` by id, so that an id the driver reuses meanwhile is
//! not given two (which would never go away).

use crate::core::hash::{Map, Seeds, Set};
use crate::core::wheel::Wheel;
use crate::core::{ConnId, Millis};

/// A wheel slot: heartbeat deadlines are this coarse (a connection is closed up to this late).
pub(crate) const WHEEL_GRANULARITY_MS: u64 = 250;

/// What to do with a connection whose heartbeat deadline came up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Heartbeat {
    /// Silent for the whole timeout: close it (1000 "heartbeat timeout").
    Expired,
    /// Look again at this time (ms).
    CheckAt(u64),
}

/// `last_seen_ms` is when the client last sent a text message, in ms wrapped to 32 bits (only
/// the difference to `now_ms` is read). `paused`: the driver stopped reading the connection
/// (its own backpressure), so a heartbeat may be waiting unread: it is not held against the
/// client.
pub(crate) fn heartbeat(
    last_seen_ms: u32,
    now_ms: u64,
    timeout_ms: u64,
    paused: bool,
) -> Heartbeat {
    let silent = (now_ms as u32).wrapping_sub(last_seen_ms) as u64;
    if silent >= timeout_ms && !paused {
        Heartbeat::Expired
    } else {
        Heartbeat::CheckAt(now_ms + timeout_ms.saturating_sub(silent))
    }
}

/// Why [`Liveness::due`] gives a connection up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dead {
    Heartbeat,
    MessageTimeout,
}

pub(crate) struct Liveness {
    heartbeat_timeout: Millis,
    message_timeout: Millis,
    /// Heartbeat deadlines.
    wheel: Wheel<ConnId>,
    /// Entries in the wheel left by closed connections, by id.
    stale: Map<ConnId, u32>,
    /// Connections the driver stopped reading (its rings are backed up).
    paused: Set<ConnId>,
    /// Connections with a message partly received, since when.
    partial: Map<ConnId, Millis>,
}

impl Liveness {
    pub(crate) fn new(heartbeat_timeout: Millis, message_timeout: Millis, seeds: Seeds) -> Self {
        let slots = heartbeat_timeout.0 / WHEEL_GRANULARITY_MS + 2;
        Liveness {
            heartbeat_timeout,
            message_timeout,
            wheel: Wheel::new(slots.min(4096) as usize, WHEEL_GRANULARITY_MS, 0),
            stale: seeds.map(),
            paused: seeds.set(),
            partial: seeds.map(),
        }
    }

    /// A connection opened (or sent its last text message) at `now`: its deadline.
    pub(crate) fn opened(&mut self, conn: ConnId, now: Millis) {
        let deadline = now.0.saturating_add(self.heartbeat_timeout.0);
        self.wheel.insert(conn, deadline);
    }

    pub(crate) fn closed(&mut self, conn: ConnId) {
        *self.stale.entry(conn).or_default() += 1;
        if !self.paused.is_empty() {
            self.paused.remove(&conn);
        }
        if !self.partial.is_empty() {
            self.partial.remove(&conn);
        }
    }

    pub(crate) fn pause(&mut self, conn: ConnId) {
        self.paused.insert(conn);
    }

    /// Every connection paused so far, no longer paused.
    pub(crate) fn resume_all(&mut self) -> Vec<ConnId> {
        self.paused.drain().collect()
    }

    pub(crate) fn message_started(&mut self, conn: ConnId, now: Millis) {
        self.partial.entry(conn).or_insert(now);
    }

    pub(crate) fn message_done(&mut self, conn: ConnId) {
        if !self.partial.is_empty() {
            self.partial.remove(&conn);
        }
    }

    /// The connections given up at `now`, in a fixed order. `seen` says when a connection the
    /// wheel brings up last sent a text message.
    pub(crate) fn due(
        &mut self,
        now: Millis,
        seen: impl Fn(ConnId) -> Option<u32>,
    ) -> Vec<(ConnId, Dead)> {
        let mut dead = Vec::new();
        let mut up = Vec::new();
        self.wheel.advance(now.0, &mut up);
        for conn in up {
            // If the id has a closed connection's entry in the wheel, this is one of them: the
            // other is the open connection's. (Whichever is dropped, the one kept is checked
            // against the open connection's record.)
            if let Some(n) = self.stale.get_mut(&conn) {
                *n -= 1;
                if *n == 0 {
                    self.stale.remove(&conn);
                }
                continue;
            }
            let Some(last_seen) = seen(conn) else {
                debug_assert!(
                    false,
                    "{conn:?} has an entry but no record and no stale count"
                );
                continue;
            };
            let paused = self.paused.contains(&conn);
            let verdict = heartbeat(last_seen, now.0, self.heartbeat_timeout.0, paused);
            let at = match verdict {
                Heartbeat::Expired => {
                    dead.push((conn, Dead::Heartbeat));
                    // Its close counts this entry as stale, like any other close's.
                    now.0 + self.heartbeat_timeout.0
                }
                Heartbeat::CheckAt(at) => at.max(now.0 + WHEEL_GRANULARITY_MS),
            };
            self.wheel.insert(conn, at);
        }
        let timeout = self.message_timeout.0;
        let mut unfinished: Vec<ConnId> = self
            .partial
            .iter()
            .filter(|(_, since)| now.0.saturating_sub(since.0) >= timeout)
            .map(|(c, _)| *c)
            .collect();
        unfinished.sort_unstable();
        for conn in unfinished {
            self.partial.remove(&conn);
            if !dead.iter().any(|(c, _)| *c == conn) {
                dead.push((conn, Dead::MessageTimeout));
            }
        }
        dead
    }

    /// When [`Liveness::due`] next has something to look at.
    pub(crate) fn next_deadline(&self) -> Option<Millis> {
        let timeout = self.message_timeout.0;
        let partial = self.partial.values().map(|s| s.0.saturating_add(timeout));
        partial.chain(self.wheel.next_due()).min().map(Millis)
    }

    /// Nothing waits but the entries of closed connections.
    pub(crate) fn is_empty(&self) -> bool {
        self.paused.is_empty() && self.partial.is_empty()
    }

    /// One entry per open connection, plus the closed ones' (see the top of this file).
    pub(crate) fn check(&self, open: usize) -> Result<(), String> {
        let stale: usize = self.stale.values().map(|&n| n as usize).sum();
        if self.wheel.len() != open + stale {
            return Err(format!(
                "{} wheel entries for {open} connections and {stale} closed ones",
                self.wheel.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_for_the_timeout_expires_unless_paused() {
        assert_eq!(heartbeat(1_000, 61_000, 60_000, false), Heartbeat::Expired);
        assert_eq!(
            heartbeat(1_000, 61_000, 60_000, true),
            Heartbeat::CheckAt(61_000)
        );
        assert_eq!(
            heartbeat(31_000, 61_000, 60_000, false),
            Heartbeat::CheckAt(91_000)
        );
        // The clock wraps at 32 bits (49 days): differences still read right.
        let now = (u32::MAX as u64) + 10;
        assert_eq!(
            heartbeat(u32::MAX - 5, now, 60_000, false),
            Heartbeat::CheckAt(now + 60_000 - 15)
        );
    }

    #[test]
    fn a_silent_connection_is_given_up_within_a_slot_of_its_deadline() {
        let mut l = Liveness::new(Millis(1_000), Millis(500), Seeds::new(0));
        let (a, b) = (ConnId(1), ConnId(2));
        l.opened(a, Millis(0));
        l.opened(b, Millis(0));
        // b sent a message at 600; a never did.
        let seen = |c: ConnId| Some(if c == a { 0 } else { 600 });
        assert_eq!(l.next_deadline(), Some(Millis(1_000)));
        assert!(l.due(Millis(999), seen).is_empty());
        assert_eq!(l.due(Millis(1_000), seen), [(a, Dead::Heartbeat)]);
        l.closed(a);
        assert!(
            l.due(Millis(1_500), seen).is_empty(),
            "b is seen until 1600"
        );
        assert_eq!(l.due(Millis(1_850), seen), [(b, Dead::Heartbeat)]);
        l.closed(b);
        assert_eq!(l.check(0), Ok(()));
        // a's id is reused before its old entries come up: the new connection keeps one.
        l.opened(a, Millis(2_000));
        assert_eq!(l.check(1), Ok(()));
        assert!(l.due(Millis(2_500), |_| Some(2_000)).is_empty());
        assert_eq!(
            l.due(Millis(3_000), |_| Some(2_000)),
            [(a, Dead::Heartbeat)]
        );
        l.closed(a);
        assert_eq!(l.check(0), Ok(()));
        // A message begun must end within its timeout.
        let mut m = Liveness::new(Millis(60_000), Millis(500), Seeds::new(0));
        m.opened(b, Millis(4_000));
        m.message_started(b, Millis(4_000));
        m.message_started(b, Millis(4_200));
        assert_eq!(m.next_deadline(), Some(Millis(4_500)));
        assert_eq!(
            m.due(Millis(4_500), |_| Some(4_000)),
            [(b, Dead::MessageTimeout)]
        );
        m.closed(b);
        assert!(m.is_empty());
        assert_eq!(m.check(0), Ok(()));
    }
}
