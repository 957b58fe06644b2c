//! `/metrics`: every shard's published figures, the process's own figures and the build, in the
//! OpenMetrics text format (prometheus-client), each series typed as what it is: counters as
//! counters (`_total`), latencies as histograms.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::core::latency::BOUNDS_US;
use crate::core::Latency;
use crate::net::admin::board::{Board, FIGURES, LATENCIES, REASON_HELP};

type Labels = Vec<(String, String)>;

fn shard_label(s: usize) -> Labels {
    vec![("shard".to_owned(), s.to_string())]
}

/// A label value in the text format: backslash, quote and newline escaped (reasons are
/// PROTOCOL.md's texts, some of which quote).
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One latency histogram per shard, as the shards published them.
#[derive(Debug)]
struct Histograms(Vec<(Labels, Latency)>);

impl EncodeMetric for Histograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, l) in &self.0 {
            // Counts per bucket, not cumulative: the encoder accumulates them.
            let buckets: Vec<(f64, u64)> = l
                .counts
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    // prometheus-client writes `le="+Inf"` for f64::MAX.
                    let bound = BOUNDS_US.get(i).map_or(f64::MAX, |us| *us as f64 / 1e6);
                    (bound, *n)
                })
                .collect();
            encoder.encode_family(labels)?.encode_histogram::<Labels>(
                l.sum_us as f64 / 1e6,
                l.count(),
                &buckets,
                None,
            )?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The whole exposition, built afresh for each scrape.
pub fn render(board: &Board) -> String {
    let mut registry = Registry::default();
    for (i, (name, help, counter)) in FIGURES.iter().enumerate() {
        if *counter {
            let family = Family::<Labels, Counter>::default();
            for (s, shard) in board.shards.iter().enumerate() {
                family.get_or_create(&shard_label(s)).inc_by(shard.get(i));
            }
            // The encoder adds `_total`.
            registry.register(*name, *help, family);
        } else {
            let family = Family::<Labels, Gauge>::default();
            for (s, shard) in board.shards.iter().enumerate() {
                family
                    .get_or_create(&shard_label(s))
                    .set(shard.get(i) as i64);
            }
            registry.register(*name, *help, family);
        }
    }
    for (metric, help) in REASON_HELP {
        let family = Family::<Labels, Counter>::default();
        for (s, shard) in board.shards.iter().enumerate() {
            let reasons = shard.reasons.lock().unwrap_or_else(|e| e.into_inner());
            for (_, reason, n) in reasons.iter().filter(|(m, _, _)| *m == metric) {
                let mut labels = shard_label(s);
                labels.push(("reason".to_owned(), label_value(reason)));
                family.get_or_create(&labels).inc_by(*n);
            }
        }
        registry.register(format!("roster_{metric}"), help, family);
    }
    for (i, (name, help)) in LATENCIES.iter().enumerate() {
        let per_shard = board
            .shards
            .iter()
            .enumerate()
            .map(|(s, shard)| {
                let l = shard.latencies.lock().unwrap_or_else(|e| e.into_inner())[i];
                (shard_label(s), l)
            })
            .collect();
        let name = name.trim_end_matches("_seconds");
        registry.register_with_unit(name, *help, Unit::Seconds, Histograms(per_shard));
    }
    if let Some(c) = board.cluster.get() {
        cluster(&mut registry, c);
    }
    if let Some(e) = board.events.get() {
        events(&mut registry, e);
    }
    registry.register(
        "roster_build",
        "The running build",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    process(&mut registry);
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out
}

/// The node's figures as one of a cluster (the NATS bridge's).
fn cluster(registry: &mut Registry, c: &crate::net::nats::ClusterStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let nodes = Gauge::<i64>::default();
    nodes.set(c.nodes_up.load(Relaxed) as i64);
    registry.register(
        "roster_cluster_nodes_up",
        "Other nodes of the cluster heard from within the node timeout",
        nodes,
    );
    let read = |f: fn(&crate::net::nats::Counters) -> u64| f(&c.nats);
    let counters: [(&str, &str, u64); 10] = [
        ("roster_cluster_messages_in", "NATS messages received", read(|s| s.in_messages.load(Relaxed))),
        ("roster_cluster_messages_out", "NATS messages sent", read(|s| s.out_messages.load(Relaxed))),
        ("roster_cluster_bytes_in", "NATS payload bytes received", read(|s| s.in_bytes.load(Relaxed))),
        ("roster_cluster_bytes_out", "NATS payload bytes sent", read(|s| s.out_bytes.load(Relaxed))),
        (
            "roster_cluster_nats_reconnects",
            "Times the NATS connection was established again after the first",
            read(|s| s.connects.load(Relaxed)).saturating_sub(1),
        ),
        (
            "roster_cluster_part_requests",
            "Requests for other nodes' parts (first fetches and re-fetches)",
            c.part_requests.load(Relaxed),
        ),
        (
            "roster_cluster_gaps",
            "Gaps in another node's frames (heartbeats, reconnects, slow consumer): its parts fetched again",
            c.gaps.load(Relaxed),
        ),
        (
            "roster_cluster_nodes_down",
            "Nodes declared down (silent, said goodbye, restarted, or this node isolated too long)",
            c.nodes_down.load(Relaxed),
        ),
        (
            "roster_cluster_bad_frames",
            "Messages from NATS that were not a valid frame for this node",
            c.bad_frames.load(Relaxed),
        ),
        (
            "roster_cluster_dropped",
            "Frames dropped: a shard's queue full (in) or the NATS connection down (out)",
            c.dropped_in.load(Relaxed) + c.dropped_out.load(Relaxed),
        ),
    ];
    register_counters(registry, counters);
}

/// Registers each (name, help, value) as a counter.
fn register_counters<const N: usize>(registry: &mut Registry, counters: [(&str, &str, u64); N]) {
    for (name, help, n) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(n);
        registry.register(name, help, counter);
    }
}

/// The event sinks' figures.
fn events(registry: &mut Registry, e: &crate::net::events::EventStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let counters: [(&str, &str, u64); 7] = [
        (
            "roster_events_queued",
            "Presence events handed to a sink's queue (one per sink)",
            e.queued.load(Relaxed),
        ),
        (
            "roster_events_dropped",
            "Presence events dropped: a sink's queue was full, or a stop's deadline passed",
            e.dropped.load(Relaxed),
        ),
        (
            "roster_webhook_events_sent",
            "Events in webhook batches the receiver took",
            e.webhook_sent.load(Relaxed),
        ),
        (
            "roster_webhook_batches",
            "Webhook batches the receiver took",
            e.webhook_batches.load(Relaxed),
        ),
        (
            "roster_webhook_failures",
            "Webhook posts that failed (no answer, 5xx, 408, 429) and were tried again",
            e.webhook_failures.load(Relaxed),
        ),
        (
            "roster_webhook_events_refused",
            "Events in batches the receiver refused (another 4xx): dropped",
            e.webhook_refused.load(Relaxed),
        ),
        (
            "roster_events_nats_published",
            "Events published on NATS",
            e.nats_published.load(Relaxed),
        ),
    ];
    register_counters(registry, counters);
}

/// The process's own figures, under the names Prometheus's client libraries use, read from
/// /proc (Linux only, as roster is).
fn process(registry: &mut Registry) {
    let figures = ProcessFigures::read();
    if let Some(cpu) = figures.cpu_seconds {
        let c = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        c.inc_by(cpu);
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            c,
        );
    }
    let gauges = [
        (
            "process_resident_memory",
            "Resident memory size",
            Some(Unit::Bytes),
            figures.resident_bytes,
        ),
        (
            "process_virtual_memory",
            "Virtual memory size",
            Some(Unit::Bytes),
            figures.virtual_bytes,
        ),
        (
            "process_open_fds",
            "Open file descriptors",
            None,
            figures.open_fds,
        ),
        (
            "process_max_fds",
            "Limit on open file descriptors",
            None,
            figures.max_fds,
        ),
        (
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Some(Unit::Seconds),
            figures.start_time,
        ),
        (
            "roster_heap",
            "Heap bytes in use (glibc mallinfo2: allocated chunks, mmapped ones included)",
            Some(Unit::Bytes),
            Some(heap_bytes() as i64),
        ),
    ];
    // A figure /proc would not give is left out rather than reported as 0.
    for (name, help, unit, value) in gauges {
        let Some(v) = value else { continue };
        let g = Gauge::<i64>::default();
        g.set(v);
        match unit {
            Some(u) => registry.register_with_unit(name, help, u, g),
            None => registry.register(name, help, g),
        }
    }
}

/// Bytes the allocator has handed out and not had back, over all arenas. Unlike the resident
/// size, it drops as soon as memory is freed, whether or not malloc gave it back to the system.
fn heap_bytes() -> usize {
    // SAFETY: mallinfo2 has no preconditions; it only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

#[derive(Default)]
struct ProcessFigures {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time: Option<i64>,
}

impl ProcessFigures {
    fn read() -> ProcessFigures {
        // SAFETY: sysconf has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let mut f = ProcessFigures::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // The command name (field 2) may hold spaces; fields after it are plain numbers.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            // Fields 14, 15 (utime, stime) and 22 (starttime), counted from 1 with the pid and
            // the name as fields 1 and 2: here indices 11, 12 and 19.
            let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
            if let (Some(u), Some(s)) = (num(11), num(12)) {
                f.cpu_seconds = Some((u + s) as f64 / tick.max(1) as f64);
            }
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            if let (Some(start), Some(boot)) = (num(19), boot) {
                f.start_time = Some((boot + start / tick.max(1) as u64) as i64);
            }
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let mut pages = statm.split_whitespace().map(|v| v.parse::<i64>().ok());
            f.virtual_bytes = pages.next().flatten().map(|p| p * page);
            f.resident_bytes = pages.next().flatten().map(|p| p * page);
        }
        f.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64);
        f.max_fds = rlimit::Resource::NOFILE
            .get()
            .ok()
            .map(|(soft, _)| soft.min(i64::MAX as u64) as i64);
        f
    }
}
