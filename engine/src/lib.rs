//! The roster presence engine.
//!
//! What it is for: knowing which users are present in which topics, with what metadata, across
//! shards (one per core), and producing the frames that tell subscribers about it.
//!
//! - [`core`]: the sans-IO shard state machine. Inputs in (client frames, connection events, shard
//!   messages, the driver's clock before each, ticks when it asks for them with `poll_timeout`),
//!   outputs out (frames, closes, shard messages), and the policies the driver applies (slow
//!   consumers, heartbeats, message rate). No sockets, clocks or threads.
//! - [`mesh`]: which shard owns a topic or a user key.
//! - [`net`]: glommio executors, listeners, WebSocket connections, rings and timers.
//! - [`config`]: the server's options.
//! - [`identity`]: who a connection is (token verification at the handshake).
//! - [`state_file`]: what a node writes on a graceful stop and its next start reads back.
//!
//! What it must not do: let I/O, time or threads leak into `core`, or make any decision in the I/O
//! layer that the core should make (that would escape the simulation tests).

pub mod cluster;
pub mod config;
pub mod core;
pub(crate) mod identity;
pub mod mesh;
pub mod net;
pub mod state_file;
