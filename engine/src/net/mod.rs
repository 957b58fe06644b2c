//! The network side: one glommio executor per shard, pinned to its core, each with its own
//! listener, connection tasks, ring tasks and timers. It only moves bytes and time in and out
//! of the core.

pub(crate) mod admin;
mod admission;
mod conn;
pub mod events;
pub(crate) mod handshake;
mod listener;
pub mod nats;
mod report;
mod restart;
mod runtime;
mod signal;
mod slot;
pub mod ws;

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::ServerConfig;
use crate::core::MeshMsg;
use crate::mesh::Router;
use crate::mesh::ShardId;
use crate::net::admin::{Admin, Board};
use crate::net::admission::Admission;
use crate::net::nats::{Bridge, ToBridge};
use crate::net::runtime::{CoreSeeds, ShardCluster, Shared};
use crate::net::signal::Signal;
use runtime::Runtime;

/// The longest a shard sleeps between ticks: heartbeat deadlines, slow consumers, shutdown
/// checks, the admin board. The core's own deadlines (windows, graces, counts) wake it sooner.
/// It also bounds glommio's park stall (STACK.md): a parked executor wakes at its next timer.
const TICK: Duration = Duration::from_millis(50);
/// Entries of each of a shard's io_uring rings (glommio's default is 128). The kernel sizes a
/// ring's table of armed polls by its completion queue (2 x this, capped at 256 buckets), and
/// glommio cancels a timer on that ring each time the executor looks for events: a cancel
/// walks one bucket, and with a connection's read poll armed per client, 128 entries left
/// ~1,250 polls per bucket at 10k connections (io_poll_find was 3.8% of the server's CPU in a
/// 10k fan-out). At 4096: 256 buckets, ~1.2 MiB of rings per shard.
const RING_DEPTH: usize = 4096;
/// How long a stopping shard waits for the others to hand their presences over (for the
/// state file) before it closes its connections anyway.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections get this long to take their 1001 close before the shard exits anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often freed heap is returned to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);
/// Most messages in one ring item.
const MAX_BATCH: usize = 4096;
/// Most inputs from the NATS bridge taken before the shard flushes.
const MAX_NATS_BATCH: usize = 1024;
/// How long a stopping node's event sinks may take to deliver what they hold.
const SINKS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a first fetch of a topic's parts waits for every holder to answer.
const FETCH_TIMEOUT_MS: u64 = 2_000;

/// Everything `run` needs that is decided before the shards start.
pub struct Launch {
    pub config: ServerConfig,
    /// CPUs to pin shard i to (`cpus[i]`), or None to leave shards unbound.
    pub cpus: Option<Vec<usize>>,
    pub stop: Arc<AtomicBool>,
}

/// Runs the server until `stop` is set and every shard has drained. Listeners are bound before
/// any shard starts, so a bad address fails at once.
pub fn run(launch: Launch) -> Result<(), String> {
    let Launch { config, cpus, stop } = launch;
    let n = config.shards as usize;
    listener::ensure_free(config.listen).map_err(|e| {
        format!(
            "cannot listen on {}: {e} (is another server running there?)",
            config.listen
        )
    })?;
    let bound: Vec<listener::Bound> = (0..n)
        .map(|_| listener::bind(config.listen))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    // In a cluster, NATS first: a node that cannot join (no NATS, a name clash) does not start.
    let names = events::Names::new(&config.node_name());
    let bridge = match &config.cluster {
        Some(node) => Some(Bridge::start(node, config.shards, names.others.clone())?),
        None => None,
    };
    let to_nats = bridge
        .as_ref()
        .zip(config.cluster.as_ref())
        .map(|(b, node)| (b.to_bridge.clone(), node.prefix.clone()));
    let (events, sinks) = events::Events::start(&config.events, names, to_nats)?.unzip();
    let fds: Vec<RawFd> = bound
        .into_iter()
        .map(|b| b.listen(config.backlog))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let mesh = MeshBuilder::<Vec<MeshMsg>, _>::full(n, config.ring_capacity);
    let board = Board::new(n);
    if let Some(b) = &bridge {
        let _ = board.cluster.set(b.stats.clone());
    }
    if let Some(e) = &events {
        let _ = board.events.set(e.stats.clone());
    }
    let admin = admin::start(
        config.admin_listen,
        Admin {
            board: board.clone(),
            router: Router::new(config.shards),
            api_key: config.api_key.as_ref().map(|k| k.0.clone()),
            bridge: bridge.as_ref().map(|b| b.to_bridge.clone()),
            node: bridge.as_ref().map_or(0, |b| b.me.node),
            max_meta_bytes: config.max_meta_bytes,
            max_topic_bytes: config.max_topic_bytes,
        },
        admin::Limits {
            max_conns: config.admin_max_conns,
            timeout: config.admin_timeout,
        },
    )?;
    tracing::info!(%admin, "admin listening");
    let admission = Admission::new(
        admission::Limits {
            max_total: config.max_connections,
            max_per_ip: config.max_conns_per_ip,
            max_handshakes: config.max_handshakes,
            max_handshakes_per_ip: config.max_handshakes_per_ip,
        },
        config.allowed_origins.clone(),
    );
    // Random per run: refs from two runs differ, and clients cannot aim hash collisions.
    let seeds = CoreSeeds {
        refs: fastrand::u64(..),
        hashing: fastrand::u64(..),
    };
    let node_name = config.cluster.as_ref().map_or("", |n| n.name.as_str());
    let restart =
        restart::Restart::load(config.state_file.clone(), config.restart_grace, node_name);
    let mut handles = Vec::new();
    for (i, fd) in fds.into_iter().enumerate() {
        let placement = match &cpus {
            Some(cpus) => Placement::Fixed(cpus[i]),
            None => Placement::Unbound,
        };
        let (config, mesh, stop) = (config.clone(), mesh.clone(), stop.clone());
        let cluster = bridge.as_ref().map(|b| ShardCluster {
            config: crate::core::ClusterConfig {
                me: b.me,
                subjects: b.subjects.clone(),
                max_payload: b.max_payload,
                fetch_timeout: crate::core::Millis(FETCH_TIMEOUT_MS),
            },
            tx: b.to_bridge.clone(),
            rx: b.from_bridge[i].clone(),
        });
        let shared = Shared {
            admission: admission.clone(),
            board: board.clone(),
            restart: restart.clone(),
            // In a cluster the refs carry the node and its incarnation (unique in the cluster
            // as long as no two nodes' hashes collide).
            seeds: match &bridge {
                Some(b) => CoreSeeds {
                    refs: xxhash_rust::xxh3::xxh3_64(
                        &[b.me.node.to_le_bytes(), b.me.incarnation.to_le_bytes()].concat(),
                    ),
                    ..seeds
                },
                None => seeds,
            },
            cluster,
            events: events.clone(),
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("roster-{i}"))
            .io_memory(64 << 10)
            .ring_depth(RING_DEPTH)
            .spawn(move || async move {
                shard_main(ShardId(i as u16), config, mesh, fd, stop, shared).await
            })
            .map_err(|e| format!("cannot start shard {i}: {e}"))?;
        handles.push(handle);
    }
    let mut result = Ok(());
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(format!("shard {i}: {e}")),
            Err(e) => result = Err(format!("shard {i} failed: {e}")),
        }
    }
    // What the shards reported last goes out (the NATS sink's through the bridge, so first).
    drop(events);
    if let Some(s) = sinks {
        s.finish(SINKS_TIMEOUT);
    }
    // Every shard has handed its presences over and stopped. In a cluster the goodbye goes
    // out after the file is written: only then may the other nodes hold this node's parts.
    let kept = restart.write();
    if let Some(b) = bridge {
        b.stop(if kept {
            config.restart_grace
        } else {
            Duration::ZERO
        });
    }
    result
}

/// A task that runs `work` each time `signal` is notified, once every task woken by the same
/// batch has had its turn (so that it takes their work too).
fn on_signal(rt: &Rc<Runtime>, signal: fn(&Runtime) -> &Signal, work: fn(&Runtime)) {
    let rt = rt.clone();
    glommio::spawn_local(async move {
        loop {
            signal(&rt).wait().await;
            futures_lite::future::yield_now().await;
            work(&rt);
        }
    })
    .detach();
}

async fn shard_main(
    id: ShardId,
    config: ServerConfig,
    mesh: MeshBuilder<Vec<MeshMsg>, glommio::channels::channel_mesh::Full>,
    fd: RawFd,
    stop: Arc<AtomicBool>,
    shared: Shared,
) -> Result<(), String> {
    let (senders, mut receivers) = mesh.join().await.map_err(|e| format!("mesh: {e}"))?;
    let rt = Runtime::new(id, config, shared);
    let senders = Rc::new(senders);

    for (peer, rx) in receivers.streams() {
        let rt = rt.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                rt.mesh_in(batch);
            }
            tracing::debug!(shard = rt.id.0, peer, "ring closed");
        })
        .detach();
    }
    for peer in 0..rt.config.shards as usize {
        if peer == id.index() {
            continue;
        }
        let (rt, senders) = (rt.clone(), senders.clone());
        glommio::spawn_local(async move {
            loop {
                rt.peer_signals[peer].wait().await;
                loop {
                    let batch = {
                        let mut q = rt.peer_queues[peer].borrow_mut();
                        // Bounded batches, so the messages counted as backlog are nearly all of
                        // those not yet on a ring.
                        if q.len() > MAX_BATCH {
                            q.drain(..MAX_BATCH).collect()
                        } else {
                            std::mem::take(&mut *q)
                        }
                    };
                    if batch.is_empty() {
                        break;
                    }
                    // Awaits while the ring is full: backpressure, never a drop.
                    if senders.send_to(peer, batch).await.is_err() {
                        tracing::debug!(shard = rt.id.0, peer, "peer ring gone");
                        return;
                    }
                    rt.ring_progress();
                }
            }
        })
        .detach();
    }
    // A fan-out's messages for the other shards go onto the rings before the writer runs (their
    // tasks were woken by the same batch), so that every shard writes at once.
    on_signal(&rt, |rt| &rt.write_signal, Runtime::write_listed);
    on_signal(&rt, |rt| &rt.flush, Runtime::flush_core);
    {
        let rt = rt.clone();
        glommio::spawn_local(async move {
            let mut last_trim = std::time::Instant::now();
            loop {
                // Until the core's next deadline (a window's end, a grace), or TICK at most.
                let now = rt.now_ms();
                let at = rt.next_wake(now, TICK.as_millis() as u64);
                let sleep = glommio::timer::sleep(Duration::from_millis(at.saturating_sub(now)));
                futures_lite::future::or(sleep, rt.rewake.wait()).await;
                if rt.now_ms() < at && !stop.load(Ordering::Relaxed) {
                    continue; // A batch made an earlier deadline: sleep until that one.
                }
                if stop.load(Ordering::Relaxed) && !rt.shutting_down.get() {
                    if rt.restart.keeps_state() {
                        // Every shard hands its presences over before any closes a connection:
                        // a close takes presences away on the shards that own their topics.
                        rt.hand_over_state();
                        let shards = rt.config.shards as usize;
                        let deadline = std::time::Instant::now() + HAND_OVER_TIMEOUT;
                        while rt.restart.shards_handed() < shards
                            && std::time::Instant::now() < deadline
                        {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                        }
                        if let Some(nats) = &rt.nats {
                            // The closes that follow must not reach the other nodes: they
                            // hold this node's parts for its next run instead.
                            let _ = nats.tx.send_async(ToBridge::Quiet).await;
                        }
                    }
                    rt.shut_down();
                }
                rt.tick();
                if id.index() == 0 && last_trim.elapsed() >= TRIM_EVERY {
                    // Bursts (a reconnect storm, a big fan-out) leave freed memory in malloc's
                    // arenas; give it back so an idle server's footprint is its real one. glibc
                    // trims every arena from one call, so shard 0 does it for all.
                    // SAFETY: malloc_trim has no preconditions.
                    unsafe { libc::malloc_trim(0) };
                    last_trim = std::time::Instant::now();
                }
            }
        })
        .detach();
    }
    if let Some(link) = &rt.nats {
        let (tx, rx) = (link.tx.clone(), link.rx.clone());
        let rt1 = rt.clone();
        glommio::spawn_local(async move {
            let link = rt1.nats.as_ref().expect("checked");
            loop {
                link.signal.wait().await;
                loop {
                    let batch = std::mem::take(&mut *link.queue.borrow_mut());
                    if batch.is_empty() {
                        break;
                    }
                    // Waits while the bridge's queue is full; the shard goes on meanwhile.
                    if tx.send_async(ToBridge::Batch(rt1.id, batch)).await.is_err() {
                        return;
                    }
                }
            }
        })
        .detach();
        let rt2 = rt.clone();
        glommio::spawn_local(async move {
            while let Ok(first) = rx.recv_async().await {
                let more = rx.try_iter().take(MAX_NATS_BATCH);
                rt2.nats_in(std::iter::once(first).chain(more));
            }
        })
        .detach();
    }
    // The previous run's presences are back before the first connection is accepted (those
    // that came meanwhile wait in the backlog).
    rt.restore_previous();
    let shards = rt.config.shards as usize;
    rt.restart.restored(shards);
    if rt.restart.had_previous {
        // Bounded: a shard that failed to start never gets here (and the process exits).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rt.restart.shards_restored() < shards && std::time::Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
    glommio::spawn_local(listener::accept_loop(rt.clone(), fd)).detach();
    tracing::info!(shard = id.0, "shard ready");

    // Wait for shutdown, then for the connections to take their 1001 (bounded).
    while !rt.shutting_down.get() {
        glommio::timer::sleep(TICK).await;
    }
    let _ = glommio::timer::timeout(DRAIN_TIMEOUT, async {
        if !rt.conns.borrow().is_empty() {
            rt.drained.wait().await;
        }
        Ok(())
    })
    .await;
    // Give peers' last messages a moment; nothing depends on them once everyone is closed.
    glommio::timer::sleep(Duration::from_millis(100)).await;
    senders.close();
    tracing::info!(
        shard = id.0,
        accepted = rt.stats.accepted.get(),
        "shard stopped"
    );
    Ok(())
}
