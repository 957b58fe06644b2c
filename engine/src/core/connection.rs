//! What a shard knows about each of its own connections: who it is and which topics it joined.

use roster_proto::{PhxRef, PresenceMode};

use crate::core::ids::JoinRef;
use crate::core::rate::MessageRate;
use crate::core::{Grants, Millis, TopicName, UserKey};

/// One per connection, in a hash table: kept at 48 bytes (a test holds it there).
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) key: UserKey,
    /// At most `max_topics_per_conn` (100 by default): a linear scan beats a map here, in time and
    /// in memory per idle connection.
    pub(crate) joins: Joins,
    /// What its token allows (none in development mode); boxed, as most have none or share a
    /// handful of shapes.
    pub(crate) grants: Option<Box<Grants>>,
    /// When it last sent a text message (ms, wrapping: only differences are read).
    pub(crate) last_seen_ms: u32,
    /// What it may still send (see `rate.rs`).
    pub(crate) rate: MessageRate,
}

/// One joined topic of one connection. There is one per subscription, so it is kept small
/// (48 bytes): rarely used parts live elsewhere (the ref of a join awaiting its reply is in the
/// shard's `awaiting` map).
#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) topic: TopicName,
    join_ref: Option<JoinRef>,
    phx_ref: PhxRef,
    pub(crate) seq: u32,
    pub(crate) mode: PresenceMode,
    tracked: bool,
    /// Until the owner's reply arrives; only then does the connection get its ok, its state, and
    /// diffs.
    pub(crate) awaiting_reply: bool,
    /// Diffs for this subscription were dropped (slow consumer): a fresh state is owed once the
    /// connection drains.
    pub(crate) stale: bool,
}

impl Joined {
    pub(crate) fn new(
        topic: TopicName,
        join_ref: Option<&str>,
        seq: u32,
        mode: PresenceMode,
        tracked: Option<PhxRef>,
    ) -> Self {
        Joined {
            topic,
            join_ref: join_ref.map(JoinRef::new),
            phx_ref: tracked.unwrap_or(PhxRef(0)),
            seq,
            mode,
            tracked: tracked.is_some(),
            awaiting_reply: true,
            stale: false,
        }
    }

    pub(crate) fn join_ref(&self) -> Option<&str> {
        self.join_ref.as_ref().map(JoinRef::as_str)
    }

    /// The connection's own presence in this topic, if it asked to be tracked.
    pub(crate) fn tracked(&self) -> Option<PhxRef> {
        self.tracked.then_some(self.phx_ref)
    }

    pub(crate) fn set_tracked(&mut self, r: PhxRef) {
        self.phx_ref = r;
        self.tracked = true;
    }
}

impl Connection {
    pub(crate) fn new(key: UserKey, grants: Option<Box<Grants>>, now: Millis) -> Self {
        Connection {
            key,
            joins: Joins::default(),
            grants,
            last_seen_ms: now.0 as u32,
            rate: MessageRate::full(now.0),
        }
    }

    pub(crate) fn allowed(&self, topic: &str) -> bool {
        self.grants.as_ref().is_none_or(|g| g.allows(topic))
    }

    pub(crate) fn position(&self, topic: &str) -> Option<usize> {
        self.joins.iter().position(|j| j.topic.as_str() == topic)
    }

    /// The join this message addresses: same topic, and the same join_ref when the client gave
    /// one (a push for an earlier join of the topic is "unmatched", as in Phoenix).
    pub(crate) fn matching(&self, topic: &str, join_ref: Option<&str>) -> Option<usize> {
        let at = self.position(topic)?;
        match join_ref {
            Some(jr) if self.joins[at].join_ref() != Some(jr) => None,
            _ => Some(at),
        }
    }

    pub(crate) fn join_ref(&self, topic: &str) -> Option<&str> {
        self.position(topic)
            .and_then(|at| self.joins[at].join_ref())
    }

    pub(crate) fn push(&mut self, joined: Joined) {
        self.joins.push(joined);
    }
}

/// A connection's joins, exactly as many slots as joins (every slot is 48 bytes per
/// connection, and most join one or two topics), in a boxed slice: 16 bytes in the record
/// where a Vec takes 24. Joins and leaves are rare next to messages, so each reallocates.
#[derive(Debug, Default)]
pub(crate) struct Joins(Box<[Joined]>);

impl Joins {
    fn push(&mut self, joined: Joined) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.reserve_exact(1);
        v.push(joined);
        self.0 = v.into_boxed_slice();
    }

    pub(crate) fn swap_remove(&mut self, at: usize) -> Joined {
        let mut v = std::mem::take(&mut self.0).into_vec();
        let joined = v.swap_remove(at);
        self.0 = v.into_boxed_slice();
        joined
    }
}

impl std::ops::Deref for Joins {
    type Target = [Joined];
    fn deref(&self) -> &[Joined] {
        &self.0
    }
}

impl std::ops::DerefMut for Joins {
    fn deref_mut(&mut self) -> &mut [Joined] {
        &mut self.0
    }
}

impl IntoIterator for Joins {
    type Item = Joined;
    type IntoIter = std::vec::IntoIter<Joined>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

#[cfg(test)]
mod tests {
    /// One of these per subscription: the comments above promise its size.
    #[test]
    fn a_join_record_is_48_bytes() {
        assert_eq!(std::mem::size_of::<super::Joined>(), 48);
    }

    /// One per connection: the comment on `Connection` promises this size.
    #[test]
    fn a_connection_record_is_48_bytes() {
        assert_eq!(std::mem::size_of::<super::Connection>(), 48);
    }
}
