//! Routing between shards. Today: which shard owns a topic or a user key. The rings that carry
//! [`crate::core::MeshMsg`] between cores live here too once the server exists.

mod route;

pub use route::{Router, ShardId};
