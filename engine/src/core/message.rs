//! What shards tell each other. Every message is `Send` (it crosses cores through a ring) and
//! carries no `Rc`. Between any two shards messages arrive in the order they were sent; the core's
//! correctness rests on that and on nothing else about timing.

use roster_proto::{PhxRef, PresenceMode};

use crate::core::{ConnAddr, ConnId, Meta, TopicName, UserKey};

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
}

/// What the owner sends back for a join, per presence mode.
#[derive(Debug)]
pub enum JoinedReply {
    /// The encoded `presence_state` payload, as of the moment the join was applied.
    State(Box<[u8]>),
    Count {
        keys: u32,
        metas: u32,
    },
    Nothing,
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
    /// The connection left the topic (phx_leave, rejoin, or close).
    Leave {
        topic: TopicName,
        from: ConnAddr,
        mode: PresenceMode,
        tracked: Option<(UserKey, PhxRef)>,
    },

    // Topic owner -> connection's shard.
    Joined {
        topic: TopicName,
        conn: ConnId,
        seq: u32,
        reply: JoinedReply,
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
}
