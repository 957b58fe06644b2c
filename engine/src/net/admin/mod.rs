//! The admin listener: `/healthz`, `/metrics` (OpenMetrics text, prometheus-client), and the
//! read API `/api/topics/TOPIC` and `/api/users/KEY`. It runs on a thread of its own, off the
//! shards: shards publish their figures to a [`Board`] once a second and answer API queries from
//! their board inbox on the next tick (so an API answer takes up to one tick). Nothing here
//! touches a shard's state directly, and nothing here is on the presence path.

mod actions;
mod api;
mod board;
pub mod metrics;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;

pub use board::{Board, Figure, LatencyOf, Query, Shown, ERRORS, REFUSALS};
pub use server::Limits;

use crate::mesh::Router;
use crate::net::nats::ToBridge;

/// What the admin thread needs.
pub struct Admin {
    pub board: Arc<Board>,
    pub router: Router,
    pub api_key: Option<Vec<u8>>,
    /// In a cluster: the NATS bridge, which looks up the other nodes' presences of a name this
    /// node holds nothing of, and carries the API's actions to every node.
    pub bridge: Option<flume::Sender<ToBridge>>,
    /// This node's id in the cluster (0 alone): a server-side presence put here is its own.
    pub node: u64,
    /// The shards' limits, which the API's actions are checked against before they go out.
    pub max_meta_bytes: usize,
    pub max_topic_bytes: usize,
}

/// Binds the admin listener (so a bad address fails at start-up) and serves it on its own
/// thread until the process ends.
pub fn start(addr: SocketAddr, admin: Admin, limits: Limits) -> Result<SocketAddr, String> {
    let server = server::Server::bind(addr, admin, limits)
        .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
    let bound = server.local_addr().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("roster-admin".into())
        .spawn(move || server.run())
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(bound)
}
