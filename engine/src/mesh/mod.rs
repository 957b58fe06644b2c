//! Routing between shards: which shard owns a topic or a user key, the same answer on every shard
//! (fixed hash seeds). No I/O: the rings that carry [`crate::core::MeshMsg`] between cores are
//! glommio channels, set up and drained in `net/` (`net/mod.rs`, one sender task per peer).

mod route;

pub use route::{Router, ShardId};
