//! roster nodes sharing presence through NATS (in progress: the frame format, subjects,
//! per-origin ordering, node liveness and remote parts are here, and the core's topic owners use
//! them when `core::Config::cluster` is set, see `core/topic_owner/cluster.rs`; the NATS bridge,
//! the options, watch lists across nodes and the simulation are not yet). Each node is the only writer of its own connections' presences, its "part" of a
//! topic; a topic is the union of the live parts of the nodes holding presences there, and a
//! node keeps only the parts of names its own clients touch. No CRDT, no consensus.
//!
//! Must not: trust bytes from NATS (every frame is validated, a bad one is an error to count);
//! block a shard on the network; turn a client's string into a subject token.

pub mod chain;
pub mod frame;
pub mod inbox;
pub mod nodes;
pub mod parts;
pub mod subject;
