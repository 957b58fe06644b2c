//! The sans-IO shard state machine.
//!
//! One [`Shard`] per core. It owns three kinds of state:
//! - the connections accepted on this shard and what each has joined ([`connection`]);
//! - the topics whose hash lands here: the authoritative presence list and, per shard, how many
//!   subscribers that shard has ([`topic`]);
//! - the user keys whose hash lands here: where each user is present and which shards watch them
//!   ([`user`]);
//!
//! plus, for every topic any local connection subscribes to, the local subscriber set that fan-out
//! writes to ([`subscribers`]), and a replica of every user a local connection watches
//! ([`watch`]). The client side is in `shard/`, the owner sides in `topic_owner.rs` and
//! `user_owner.rs`, each with its own state; liveness (heartbeat and message timeouts), the
//! outbound queue and the resync record are parts the shard decides with too.
//!
//! Everything crosses between shards as a [`MeshMsg`], even when both ends are this shard, so the
//! local fast path and the cross-core path are the same code. The driver (glommio in the server, a
//! seeded scheduler in the simulation tests) feeds inputs, calls [`Shard::flush`] at the end of a
//! batch, and carries [`Output`]s out. Nothing here reads a clock, touches a socket or spawns.

mod config;
mod connection;
pub mod event;
mod expiry;
mod grants;
mod hash;
mod ids;
mod invariants;
pub(crate) mod latency;
mod liveness;
mod message;
mod names;
pub mod outbound;
mod outbox;
mod part;
pub(crate) mod rate;
mod resync;
mod shard;
mod subscribers;
mod topic;
mod topic_owner;
mod user;
mod user_cluster;
mod user_owner;
mod watch;
mod wheel;

pub use config::{ClusterConfig, Config};
pub use grants::{Grants, TopicPattern};
pub use ids::{CloseCode, ConnAddr, ConnId, Frame, Meta, Millis, TopicName, UserKey};
pub use latency::Latency;
pub use message::{JoinMsg, JoinedReply, MeshMsg, Reforce, Track};
pub use outbox::NatsOut;
pub use shard::{Output, Refreshed, Shard, ShardStats, TOKEN_EXPIRED, TOKEN_TOPIC};
pub use topic::TopicView;
