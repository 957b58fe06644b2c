//! roster nodes sharing presence through NATS (docs/CLUSTER.md): the frame format, subjects,
//! per-origin ordering, node liveness, remote parts and the request inbox, all sans-IO. The
//! core's topic and user owners use them when `core::Config::cluster` is set
//! (`core/topic_owner/cluster.rs`, `core/user_cluster.rs`); `net/nats.rs` carries them to and
//! from NATS. Each node is the only writer of its own connections' presences, its "part" of a
//! topic; a topic is the union of the live parts of the nodes holding presences there, and a
//! node keeps only the parts of names its own clients touch. No CRDT, no consensus.
//!
//! Must not: trust bytes from NATS (every frame is validated, a bad one is an error to count);
//! block a shard on the network; turn a client's string into a subject token.

pub mod chain;
pub mod frame;
pub mod inbox;
pub mod lookup;
pub mod nodes;
pub mod parts;
pub mod reporter;
pub mod subject;
