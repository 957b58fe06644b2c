//! What a shard knows about each of its own connections: who it is and which topics it joined.

use roster_proto::{PhxRef, PresenceMode};

use crate::core::{TopicName, UserKey};

#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) key: UserKey,
    /// At most `max_topics_per_conn` (100 by default): a linear scan beats a map here, in time and
    /// in memory per idle connection.
    pub(crate) joins: Vec<Joined>,
    next_seq: u32,
}

#[derive(Debug)]
pub(crate) struct Joined {
    pub(crate) topic: TopicName,
    pub(crate) join_ref: Option<Box<str>>,
    pub(crate) seq: u32,
    pub(crate) mode: PresenceMode,
    /// The connection's own presence in this topic, if it asked to be tracked.
    pub(crate) tracked: Option<PhxRef>,
    /// `Some(ref of the phx_join)` until the owner's reply arrives; only then does the connection
    /// get its ok, its state, and diffs.
    pub(crate) awaiting_reply: Option<Option<Box<str>>>,
}

impl Connection {
    pub(crate) fn new(key: UserKey) -> Self {
        Connection {
            key,
            joins: Vec::new(),
            next_seq: 0,
        }
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    pub(crate) fn position(&self, topic: &str) -> Option<usize> {
        self.joins.iter().position(|j| &*j.topic.0 == topic)
    }

    /// The join this message addresses: same topic, and the same join_ref when the client gave
    /// one (a push for an earlier join of the topic is "unmatched", as in Phoenix).
    pub(crate) fn matching(&self, topic: &str, join_ref: Option<&str>) -> Option<usize> {
        let at = self.position(topic)?;
        match join_ref {
            Some(jr) if self.joins[at].join_ref.as_deref() != Some(jr) => None,
            _ => Some(at),
        }
    }

    pub(crate) fn join_ref(&self, topic: &str) -> Option<&str> {
        self.position(topic)
            .and_then(|at| self.joins[at].join_ref.as_deref())
    }
}
