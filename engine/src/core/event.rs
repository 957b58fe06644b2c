//! Presence events for the application's backend (webhooks, the NATS events subject): what the
//! core reports when a presence of this node's own joins, changes or leaves, when a user gets
//! its first or loses its last presence, and, for a node that died, the leaves one surviving
//! node reports for it. The core only says what happened and why; the driver stamps the wall
//! clock, names the nodes and makes the ids (see `net::events`).
//!
//! Nothing is made unless `Config::events` is set: with no backend listening a presence change
//! costs what it did.

use crate::cluster::frame::Origin;
use crate::core::{Meta, TopicName, UserKey};

/// Why a presence left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// phx_leave, or a rejoin of the topic.
    Left,
    /// The socket closed (the client went, or the network did).
    Closed,
    /// No message for the heartbeat timeout.
    HeartbeatTimeout,
    /// Held by the leave grace (or a restart's grace) and nobody took it back.
    GraceExpired,
    /// Its node died (reported by one surviving node, see `topic_owner/cluster.rs`).
    NodeDown,
    /// `POST /api/users/KEY/disconnect`.
    Disconnected,
    /// The connection's token expired and no fresh one came.
    TokenExpired,
    /// A server-side presence removed by `DELETE /api/topics/T/presences/K`.
    Removed,
    /// A server-side presence whose TTL ran out.
    TtlExpired,
    /// The server closed the connection for breaking a limit (rate, slow consumer, a bad
    /// frame, a message not completed).
    Policy,
    /// The server is stopping.
    Shutdown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Left => "left",
            Reason::Closed => "closed",
            Reason::HeartbeatTimeout => "heartbeat_timeout",
            Reason::GraceExpired => "grace_expired",
            Reason::NodeDown => "node_down",
            Reason::Disconnected => "disconnected",
            Reason::TokenExpired => "token_expired",
            Reason::Removed => "removed",
            Reason::TtlExpired => "ttl_expired",
            Reason::Policy => "policy",
            Reason::Shutdown => "shutdown",
        }
    }

    /// Whether the leave grace may hold the presence: its connection ended, and not at the
    /// backend's say (a disconnect wants it gone).
    pub(crate) fn may_hold(self) -> bool {
        !matches!(
            self,
            Reason::Left | Reason::Removed | Reason::TtlExpired | Reason::Disconnected
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Join,
    Update,
    Leave,
    /// The key's first presence anywhere in the cluster.
    Online,
    /// The key's last presence anywhere in the cluster left.
    Offline,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Join => "presence_join",
            EventKind::Update => "presence_update",
            EventKind::Leave => "presence_leave",
            EventKind::Online => "user_online",
            EventKind::Offline => "user_offline",
        }
    }
}

/// One thing that happened. `meta` is the stored meta (it ends with the presence's `phx_ref`);
/// for an update `prev` is the meta it replaced. `origin` is the node whose presence it is when
/// it is not this node's (a dead node's leaves).
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub topic: TopicName,
    pub key: UserKey,
    pub meta: Meta,
    pub prev: Option<Meta>,
    pub reason: Option<Reason>,
    pub origin: Option<Origin>,
}
