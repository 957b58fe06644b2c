//! What shards tell each other. Every message is `Send` (it crosses cores through a ring) and
//! carries no `Rc`. Between any two shards messages arrive in the order they were sent; the core's
//! correctness rests on that and on nothing else about timing.

use std::sync::Arc;

use roster_proto::{PhxRef, PresenceMode};

use crate::cluster::frame::Origin;
use crate::core::event::Reason;
use crate::core::{ConnAddr, ConnId, Meta, TopicName, UserKey};
use crate::mesh::ShardId;

/// A presence to track: who, under which ref, with which stored meta.
#[derive(Clone, Debug)]
pub struct Track {
    pub key: UserKey,
    pub phx_ref: PhxRef,
    pub meta: Meta,
}

/// A connection joins a topic (connection's shard -> topic owner).
#[derive(Debug)]
pub struct JoinMsg {
    pub topic: TopicName,
    pub from: ConnAddr,
    /// Echoed in [`MeshMsg::Joined`] so a reply to an earlier join of the same topic (left and
    /// rejoined while the reply was in flight) is recognised as stale.
    pub seq: u32,
    pub mode: PresenceMode,
    pub track: Option<Track>,
    /// A subscriber that lost diffs (slow consumer) asks for a fresh state: it is already
    /// subscribed and tracked, so the owner only answers.
    pub resync: bool,
}

/// What the owner sends back for a join, per presence mode.
#[derive(Debug)]
pub enum JoinedReply {
    /// The encoded `presence_state` payload, as of the moment the join was applied. Shared: every
    /// joiner of one coalescing window gets the same bytes.
    State(Arc<[u8]>),
    Count {
        keys: u32,
        metas: u32,
    },
    Nothing,
}

/// See [`MeshMsg::UserCheck`]: the key, the dead node, and the presence of it that left.
#[derive(Debug)]
pub struct UserCheck {
    pub key: UserKey,
    pub dead: Origin,
    pub topic: TopicName,
    pub meta: Meta,
}

/// See [`MeshMsg::Reforce`].
#[derive(Debug)]
pub struct Reforce {
    pub topic: TopicName,
    pub key: UserKey,
    pub old: PhxRef,
    pub new: PhxRef,
    /// The token's meta claims the presence was made with, and the fresh token's.
    pub was: Option<Box<str>>,
    pub forced: Option<Box<str>>,
}

#[derive(Debug)]
pub enum MeshMsg {
    // Connection's shard -> topic owner.
    Join(Box<JoinMsg>),
    /// The connection's tracked presence `old` is replaced by `new` (presence_update).
    Update {
        topic: TopicName,
        from: ConnAddr,
        old: PhxRef,
        new: Track,
    },
    /// The connection's token was refreshed with other meta claims: its presence `old` is
    /// made anew as `new` with them, the client's fields kept (presence_update). The shard does
    /// not keep the client's fields, the owner does. Boxed: rare.
    Reforce(Box<Reforce>),
    /// The connection left the topic (phx_leave, rejoin, or close).
    Leave {
        topic: TopicName,
        from: ConnAddr,
        mode: PresenceMode,
        tracked: Option<(UserKey, PhxRef)>,
        /// Why: a connection that ended (rather than left the topic) has its presence held for
        /// the leave grace (see [`Reason::may_hold`]).
        why: Reason,
    },
    /// The connection's presence `alias` was a twin of `adopted` (same key and meta), whose
    /// connection has now closed: the connection's presence is `adopted` from now on
    /// (topic owner -> connection's shard).
    Adopt {
        topic: TopicName,
        conn: ConnId,
        alias: PhxRef,
        adopted: PhxRef,
    },
    /// The connection's shard has applied an adopted ref (see [`MeshMsg::Joined`]): no message
    /// naming `alias` follows, so the owner may forget it.
    Adopted {
        topic: TopicName,
        alias: PhxRef,
    },

    // Topic owner -> connection's shard.
    Joined {
        topic: TopicName,
        conn: ConnId,
        seq: u32,
        reply: JoinedReply,
        /// The join took over a presence held by the leave grace with an equal meta:
        /// `(the ref the connection made, the held ref it is now)`. Boxed: rare, and every
        /// message is as big as the biggest variant.
        adopted: Option<Box<(PhxRef, PhxRef)>>,
    },
    /// One encoded `presence_diff` frame for every full-mode subscriber on the receiving shard.
    Diff {
        topic: TopicName,
        frame: Box<[u8]>,
    },
    Count {
        topic: TopicName,
        keys: u32,
        metas: u32,
    },

    // Topic owner -> user owner.
    UserTracked {
        topic: TopicName,
        track: Track,
    },
    UserUntracked {
        topic: TopicName,
        key: UserKey,
        phx_ref: PhxRef,
    },
    /// presence_update (or a leave-grace takeover with a new meta): watchers see one diff.
    UserUpdated {
        topic: TopicName,
        old: PhxRef,
        track: Track,
    },

    /// A dead node's presence of the key left (reported by this node, see
    /// `cluster::reporter`): if the key has no presence left anywhere, it is offline. Boxed:
    /// rare.
    UserCheck(Box<UserCheck>),

    // Watching shard -> user owner.
    /// Shard `from` has connections watching `key`: send its presences, then every change.
    Watch {
        key: UserKey,
        from: ShardId,
        seq: u32,
    },
    Unwatch {
        key: UserKey,
        from: ShardId,
    },

    // User owner -> watching shard.
    /// Where `key` is present, as of the [`MeshMsg::Watch`] with this `seq`.
    UserState {
        key: UserKey,
        seq: u32,
        presences: Vec<(TopicName, Meta)>,
    },
    UserChanged {
        key: UserKey,
        joins: Vec<(TopicName, Meta)>,
        leaves: Vec<(TopicName, Meta)>,
    },
}

#[cfg(test)]
mod tests {
    /// Every message moves through the rings by value, as big as the biggest variant.
    #[test]
    fn a_message_is_64_bytes() {
        assert_eq!(std::mem::size_of::<super::MeshMsg>(), 64);
    }
}
