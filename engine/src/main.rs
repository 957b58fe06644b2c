//! `roster`: starts the presence server. Reads the configuration, raises the process limits a
//! server with many connections needs, starts one pinned shard per core, and exits 0 after a
//! SIGTERM/SIGINT once the connections have been closed with 1001.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use roster_engine::config::{Cli, ServerConfig};
use roster_engine::net::{self, Launch};
use tracing_subscriber::EnvFilter;

/// glommio refuses to start below this locked-memory limit (STACK.md).
const MIN_MEMLOCK: u64 = 512 << 10;
/// Descriptors kept for listeners, rings, io_uring and the like.
const RESERVED_FDS: u64 = 64;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("ROSTER_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = start() {
        // Once: the log goes to stderr already.
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

fn start() -> Result<(), String> {
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let config = ServerConfig::resolve(Cli::parse(), allowed.len().max(1) as u16)?;
    let open_files = raise_limits()?;
    // Pin only when every shard gets a core of its own (tests run more shards than cores).
    let cpus = (config.shards as usize <= allowed.len())
        .then(|| allowed[..config.shards as usize].to_vec());
    let by_fds = open_files.saturating_sub(RESERVED_FDS);
    let capacity = match config.max_connections as u64 {
        0 => by_fds,
        n => n.min(by_fds),
    };
    let mode = if config.secret.is_some() {
        "tokens (HS256)"
    } else {
        "development (identities not verified)"
    };
    tracing::info!(
        url = %format!("ws://{}/socket", config.listen),
        mode,
        connection_capacity = capacity,
        shards = config.shards,
        pinned = cpus.is_some(),
        backlog = config.backlog,
        "roster {} starting", env!("CARGO_PKG_VERSION")
    );
    if config.secret.is_none() {
        tracing::warn!("no secret configured: identities are not verified (development mode; user_id comes from the query)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot handle signal {sig}: {e}"))?;
    }
    net::run(Launch { config, cpus, stop })?;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft open-files and locked-memory limits to the hard ones and says what follows.
/// Returns the open-files limit in force.
fn raise_limits() -> Result<u64, String> {
    let (before, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n > before => {
            tracing::info!(
                open_files = n,
                from = before,
                "open-files limit raised to the hard limit"
            );
            n
        }
        Ok(n) => {
            tracing::info!(open_files = n, hard, "open-files limit already at the hard limit; raise the hard limit (LimitNOFILE, fs.nr_open) for more connections");
            n
        }
        Err(e) => {
            tracing::warn!(
                open_files = before,
                "cannot raise the open-files limit: {e}"
            );
            before
        }
    };
    let (soft, hard) = rlimit::Resource::MEMLOCK
        .get()
        .map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    if soft < hard {
        let _ = rlimit::Resource::MEMLOCK.set(hard, hard);
    }
    let (soft, _) = rlimit::Resource::MEMLOCK
        .get()
        .map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    if soft < MIN_MEMLOCK {
        return Err(format!(
            "locked-memory limit is {soft} bytes; io_uring needs at least {MIN_MEMLOCK}. Raise it (ulimit -l, LimitMEMLOCK=) and start again"
        ));
    }
    Ok(open_files)
}
