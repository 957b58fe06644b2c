//! A restart that keeps presence, on the server's side (`--state-file`): the previous run's
//! state file is read before the shards start and each shard takes back the presences of the
//! topics it owns before it accepts; on SIGTERM every shard hands over what it holds before any
//! connection is closed (a close would take presences away on other shards), and the file is
//! written once every shard has stopped. The format is `state_file.rs`; taking presences back
//! is the core's (`Shard::restore`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::state_file::{self, HeldConn, HeldPresence, HeldServerPresence, Refused, State};

/// What one shard hands over on a graceful stop.
#[derive(Default)]
struct Handed {
    /// Each connection's key and tracked (topic, ref).
    conns: Vec<(String, Vec<(String, u64)>)>,
    /// The presences of the topics it owns: (topic, key, ref, stored meta).
    presences: Vec<(String, String, u64, Vec<u8>)>,
    /// The server-side presences of the topics it owns.
    server: Vec<HeldServerPresence>,
}

/// Shared by the shards and the thread that started them.
pub struct Restart {
    path: Option<PathBuf>,
    /// The node's name in a cluster ("" on a single node): a file of another node is refused.
    node: String,
    grace: Duration,
    /// The previous run's presences, and until when (ms since the epoch) they are held; freed
    /// once every shard has taken its own back (a million presences are ~130 MB).
    previous: RwLock<Option<(State, u64)>>,
    /// Whether there was one: the shards wait for each other only then.
    pub(super) had_previous: bool,
    handed: Mutex<Handed>,
    shards_handed: AtomicUsize,
    /// Shards that have taken the previous run's presences back: none accepts before all have,
    /// or a join could reach a topic's owner before its held presences.
    shards_restored: AtomicUsize,
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Restart {
    /// Reads the previous run's state file, if one is set: a refused file is logged with its
    /// reason and the node starts empty. A file taken is removed: its presences are this run's
    /// now.
    pub fn load(path: Option<PathBuf>, grace: Duration, node: &str) -> Arc<Restart> {
        let previous = path.as_ref().and_then(|p| {
            let started = std::time::Instant::now();
            match state_file::read(p, node, unix_ms(), grace.as_millis() as u64) {
                Ok(state) => {
                    let until = state.written_at_ms + grace.as_millis() as u64;
                    tracing::info!(
                        path = %p.display(),
                        presences = state.presences(),
                        connections = state.conns.len(),
                        load_ms = started.elapsed().as_millis() as u64,
                        "state file taken back: its presences are held for their clients"
                    );
                    if let Err(e) = std::fs::remove_file(p) {
                        tracing::warn!(path = %p.display(), "cannot remove the state file: {e}");
                    }
                    Some((state, until))
                }
                Err(Refused::Missing) => {
                    tracing::info!(path = %p.display(), "no state file: starting empty");
                    None
                }
                Err(why) => {
                    tracing::warn!(path = %p.display(), "state file ignored, starting empty: {why}");
                    None
                }
            }
        });
        Arc::new(Restart {
            path,
            node: node.to_owned(),
            grace,
            had_previous: previous.is_some(),
            previous: RwLock::new(previous),
            handed: Mutex::new(Handed::default()),
            shards_handed: AtomicUsize::new(0),
            shards_restored: AtomicUsize::new(0),
        })
    }

    /// Whether a graceful stop writes a state file.
    pub fn keeps_state(&self) -> bool {
        self.path.is_some()
    }

    /// A shard's presences, as it stops.
    pub(super) fn hand_over(
        &self,
        conns: Vec<(String, Vec<(String, u64)>)>,
        presences: Vec<(String, String, u64, Vec<u8>)>,
        server: Vec<HeldServerPresence>,
    ) {
        if let Ok(mut h) = self.handed.lock() {
            h.conns.extend(conns);
            h.presences.extend(presences);
            h.server.extend(server);
        }
        self.shards_handed.fetch_add(1, Ordering::AcqRel);
    }

    /// Calls `take(state, until)` with the previous run's presences, if there are any.
    pub(super) fn with_previous(&self, take: impl FnOnce(&State, u64)) {
        if let Ok(guard) = self.previous.read() {
            if let Some((state, until)) = guard.as_ref() {
                take(state, *until);
            }
        }
    }

    /// One more shard of `shards` has taken its presences back; the last frees them.
    pub(super) fn restored(&self, shards: usize) {
        if self.shards_restored.fetch_add(1, Ordering::AcqRel) + 1 == shards {
            if let Ok(mut guard) = self.previous.write() {
                *guard = None;
            }
        }
    }

    /// How many shards have taken theirs back.
    pub(super) fn shards_restored(&self) -> usize {
        self.shards_restored.load(Ordering::Acquire)
    }

    /// How many shards have handed theirs over.
    pub(super) fn shards_handed(&self) -> usize {
        self.shards_handed.load(Ordering::Acquire)
    }

    /// Writes what the shards handed over, once they have all stopped: each connection's
    /// presences with their metas, and each presence no connection holds (held by the leave
    /// grace, or taken back and not claimed yet) on its own. True if the file is written.
    pub fn write(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        if self.shards_handed() == 0 {
            // Not a graceful stop (a shard failed to start): nothing was handed over, and an
            // empty file would say there was nobody.
            return false;
        }
        let Ok(mut handed) = self.handed.lock() else {
            return false;
        };
        let started = std::time::Instant::now();
        // Moved, not copied, and joined by ref (unique per presence on a node): at a million
        // presences every copy or string-keyed table costs a second.
        let Handed {
            conns,
            presences,
            server,
        } = std::mem::take(&mut *handed);
        let mut conn_of: std::collections::HashMap<u64, usize> = Default::default();
        let mut held: Vec<HeldConn> = Vec::with_capacity(conns.len());
        for (i, (key, tracked)) in conns.into_iter().enumerate() {
            conn_of.extend(tracked.into_iter().map(|(_, r)| (r, i)));
            held.push(HeldConn {
                key,
                presences: Vec::new(),
            });
        }
        for (topic, key, phx_ref, meta) in presences {
            let p = HeldPresence {
                topic,
                phx_ref,
                meta,
            };
            match conn_of.get(&phx_ref) {
                Some(&i) => held[i].presences.push(p),
                // Held with no connection (leave grace, or a restart's not taken back yet).
                None => held.push(HeldConn {
                    key,
                    presences: vec![p],
                }),
            }
        }
        held.retain(|c| !c.presences.is_empty());
        let state = State {
            written_at_ms: unix_ms(),
            node: self.node.clone(),
            conns: held,
            server,
        };
        match state_file::write(path, &state) {
            Ok(()) => {
                tracing::info!(
                    path = %path.display(),
                    presences = state.presences(),
                    connections = state.conns.len(),
                    write_ms = started.elapsed().as_millis() as u64,
                    grace_ms = self.grace.as_millis() as u64,
                    "state file written"
                );
                true
            }
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot write the state file: {e}");
                false
            }
        }
    }
}
