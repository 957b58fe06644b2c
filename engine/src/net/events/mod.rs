//! Presence events to the application's backend: the shards' drivers hand each event the core
//! reports (`core::event`) to a bounded queue per sink, never waiting: a full queue drops the
//! event, counted and logged. Each sink has a thread of its own: webhooks (`webhook.rs`) and,
//! in a cluster, the NATS events subjects (`PREFIX.events.TYPE`, one message per event, through
//! the bridge). One sink that is slow does not hold the other up.
//!
//! Must not: block a shard; run on a shard's core (JSON, signatures and HTTP are done here).

mod record;
mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use record::Record;

use crate::cluster::frame::Origin;
use crate::config::EventsConfig;
use crate::core::event::Event;
use crate::core::{NatsOut, TopicPattern};
use crate::mesh::ShardId;
use crate::net::nats::ToBridge;

/// Figures of the event sinks, for /metrics.
#[derive(Default, Debug)]
pub struct EventStats {
    /// Events handed to a sink's queue (one per sink).
    pub queued: AtomicU64,
    /// Events a full queue had no room for, or shutdown left undelivered.
    pub dropped: AtomicU64,
    pub webhook_sent: AtomicU64,
    pub webhook_batches: AtomicU64,
    /// Posts that failed and were tried again.
    pub webhook_failures: AtomicU64,
    /// Events in batches the receiver refused (a 4xx other than 408 and 429).
    pub webhook_refused: AtomicU64,
    pub nats_published: AtomicU64,
    /// When an overflow was last logged (ms since the epoch), so a flood logs once in a while.
    last_overflow_log: AtomicU64,
}

/// The names of nodes: this one's, and the others' as their heartbeats say them (the bridge
/// fills the map), for the `node` of an event about another node's presence.
#[derive(Clone)]
pub struct Names {
    me: Arc<str>,
    pub others: Arc<RwLock<HashMap<u64, String>>>,
}

impl Names {
    pub fn new(me: &str) -> Names {
        Names {
            me: me.into(),
            others: Arc::default(),
        }
    }

    fn me(&self) -> &str {
        &self.me
    }

    fn of(&self, origin: Option<Origin>) -> String {
        let Some(o) = origin else {
            return self.me.to_string();
        };
        let others = self.others.read().unwrap_or_else(|e| e.into_inner());
        match others.get(&o.node) {
            Some(name) => name.clone(),
            None => format!("{:016x}", o.node),
        }
    }
}

/// Shutdown's deadline for the sinks: past it a batch that cannot be delivered is dropped.
#[derive(Clone, Default)]
struct Stopping(Arc<(AtomicBool, AtomicU64)>);

impl Stopping {
    fn past_deadline(&self) -> bool {
        self.0 .0.load(Ordering::Relaxed) && wall_ms() >= self.0 .1.load(Ordering::Relaxed)
    }

    /// The next record, waiting for one; None once the queue is empty and a stop was asked
    /// for (or every sender is gone).
    fn next(&self, rx: &flume::Receiver<Record>) -> Option<Record> {
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return Some(r),
                Err(flume::RecvTimeoutError::Disconnected) => return None,
                Err(flume::RecvTimeoutError::Timeout) if self.0 .0.load(Ordering::Relaxed) => {
                    return None
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// The shards' way to the sinks. Cloned into every shard.
#[derive(Clone)]
pub struct Events {
    sinks: Arc<[flume::Sender<Record>]>,
    topics: Arc<[TopicPattern]>,
    pub stats: Arc<EventStats>,
}

/// The sinks' threads, for a graceful stop.
pub struct Sinks {
    threads: Vec<JoinHandle<()>>,
    stopping: Stopping,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// Starts a thread per sink configured; None if there is none.
    pub fn start(
        config: &EventsConfig,
        names: Names,
        bridge: Option<(flume::Sender<ToBridge>, String)>,
    ) -> Result<Option<(Events, Sinks)>, String> {
        let stats = Arc::new(EventStats::default());
        let stopping = Stopping::default();
        let mut sinks = Vec::new();
        let mut threads = Vec::new();
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| format!("cannot start the {name} thread: {e}"))
        };
        if let Some(hook) = &config.webhook {
            let (tx, rx) = flume::bounded(config.queue);
            let sink = webhook::Webhook::new(hook.clone());
            let (names, stats, stop) = (names.clone(), stats.clone(), stopping.clone());
            threads.push(spawn(
                "roster-webhook",
                Box::new(move || sink.run(rx, names, stats, stop)),
            )?);
            sinks.push(tx);
        }
        if let (true, Some((to_bridge, prefix))) = (config.nats, bridge) {
            let (tx, rx) = flume::bounded(config.queue);
            let (names, stats) = (names.clone(), stats.clone());
            let stop = stopping.clone();
            threads.push(spawn(
                "roster-nats-events",
                Box::new(move || publish(rx, to_bridge, &prefix, names, stats, stop)),
            )?);
            sinks.push(tx);
        }
        if sinks.is_empty() {
            return Ok(None);
        }
        let topics = config.topics.iter().map(|p| TopicPattern::new(p)).collect();
        let events = Events {
            sinks: sinks.into(),
            topics,
            stats,
        };
        Ok(Some((events, Sinks { threads, stopping })))
    }

    /// Hands `event` (seen at `at_ms`) to every sink, if its topic is one the backend wants;
    /// a full queue drops it.
    pub fn push(&self, event: Box<Event>, at_ms: u64) {
        let topic = event.topic.as_str();
        if !self.topics.is_empty() && !self.topics.iter().any(|p| p.matches(topic)) {
            return;
        }
        let (last, rest) = self.sinks.split_last().expect("at least one sink");
        for sink in rest {
            let record = Record {
                event: event.clone(),
                at_ms,
            };
            self.offer(sink, record);
        }
        self.offer(last, Record { event, at_ms });
    }

    fn offer(&self, sink: &flume::Sender<Record>, record: Record) {
        let s = &self.stats;
        if sink.try_send(record).is_ok() {
            s.queued.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dropped = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = wall_ms();
        let last = s.last_overflow_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && s.last_overflow_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped,
                "event queue full: events dropped (the backend is slow or down)"
            );
        }
    }
}

impl Sinks {
    /// The shards have stopped: each sink delivers what it holds, for `within` at most.
    pub fn finish(self, within: Duration) {
        let (flag, at) = &*self.stopping.0;
        at.store(wall_ms() + within.as_millis() as u64, Ordering::Relaxed);
        flag.store(true, Ordering::Relaxed);
        let until = Instant::now() + within + Duration::from_millis(500);
        for t in self.threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// The NATS sink: each event as its own message on `PREFIX.events.TYPE`, handed to the bridge
/// in batches of what has come (never waiting on it: a full bridge queue drops them).
fn publish(
    rx: flume::Receiver<Record>,
    to_bridge: flume::Sender<ToBridge>,
    prefix: &str,
    names: Names,
    stats: Arc<EventStats>,
    stop: Stopping,
) {
    while let Some(first) = stop.next(&rx) {
        let mut outs = Vec::new();
        for r in std::iter::once(first).chain(rx.try_iter().take(1023)) {
            let mut frame = Vec::with_capacity(256);
            record::encode(&r, &names.of(r.event.origin), &mut frame);
            let subject = format!("{prefix}.events.{}", r.event.kind.as_str());
            outs.push(NatsOut::Publish { subject, frame });
        }
        let n = outs.len() as u64;
        match to_bridge.try_send(ToBridge::Batch(ShardId(0), outs)) {
            Ok(()) => stats.nats_published.fetch_add(n, Ordering::Relaxed),
            Err(_) => stats.dropped.fetch_add(n, Ordering::Relaxed),
        };
    }
}
