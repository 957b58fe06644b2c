//! Scenario `cluster`: roster nodes sharing presence through NATS, one `--url` per node.
//!
//! - Remote join latency: one prober per node joins and leaves a topic in turn, with its send
//!   time in the meta; one watcher per node records when it sees each join, remote (the prober
//!   on another node) and local apart. First idle, then while churners on every node join and
//!   leave other topics (which also have members on every node) at `--rate` on an executor of
//!   their own.
//! - NATS traffic per presence change: the nodes' own counters (`--admin-urls`, in node order),
//!   over the churn, less the heartbeats' share measured while quiet.
//! - Memory with and without interest: the last node's heap (its `roster_heap_bytes`) while
//!   `--big` members join a topic on the other nodes, then once one client of its own joins it.
//! - With `--kill-cmd` (which must kill -9 the last node): time from the kill to a watcher on
//!   the first node seeing all of the last node's presences leave.
//!
//! Needs roster's cluster metrics for the traffic and memory figures; the latencies need
//! nothing engine-specific.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::prelude::*;

#[derive(clap::Args, Clone)]
pub(crate) struct Options {
    /// Probe joins per phase (each node's prober in turn).
    #[arg(long, default_value_t = 300)]
    pub(crate) rounds: usize,
    /// Between a probe's join and its leave, and between probes.
    #[arg(long, default_value_t = 10)]
    pub(crate) interval_ms: u64,
    /// Churners' joins plus leaves per second in the churn phase.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
    /// Clients taking turns joining and leaving (spread over the nodes).
    #[arg(long, default_value_t = 300)]
    pub(crate) churners: usize,
    /// The nodes' admin listeners, http://HOST:PORT, in the order of --url.
    #[arg(long)]
    pub(crate) admin_urls: Option<String>,
    /// Members of a large topic on every node but the last (0: skip the memory figure).
    #[arg(long, default_value_t = 0)]
    pub(crate) big: usize,
    /// A shell command that kills -9 the last node (timed until its presences left).
    #[arg(long)]
    pub(crate) kill_cmd: Option<String>,
}

/// Topics the churners share (each has members on every node).
const CHURN_TOPICS: usize = 50;
/// Presences on the last node whose leaves a kill is timed by.
const VICTIMS: usize = 50;

/// Latencies of one phase: joins seen on another node, and on the prober's own.
struct Seen {
    remote: Histogram<u64>,
    local: Histogram<u64>,
}

pub(crate) fn cluster(c: Common, o: Options) -> Result<(), String> {
    if compatible() {
        return Err(
            "the cluster scenario reads roster's metrics: not with --phoenix-compatible".into(),
        );
    }
    let t = Target::parse(&c)?;
    let nodes = t.addrs.len();
    if nodes < 2 {
        return Err("the cluster scenario needs one --url per node, at least two".into());
    }
    let admins: Vec<String> = o
        .admin_urls
        .as_deref()
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if !admins.is_empty() && admins.len() != nodes {
        return Err(format!(
            "--admin-urls names {} nodes, --url {nodes}",
            admins.len()
        ));
    }
    for a in &admins {
        http_addr(a)?;
    }
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let churn_on = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let (churn_flag, stop_flag, op_count) = (churn_on.clone(), stop.clone(), ops.clone());
    let churn_t = t.clone();
    let (rate, churners, conc) = (o.rate, o.churners, c.concurrency.max(1));
    // Churners on an executor of their own, so that the watchers' parsing does not slow them.
    let churn = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-churn")
        .io_memory(64 << 10)
        .spawn(move || async move {
            churn_loop(
                &churn_t,
                churners,
                conc,
                rate,
                &churn_flag,
                &stop_flag,
                &op_count,
            )
            .await
        })
        .map_err(|e| format!("churn executor: {e}"))?;
    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-cluster")
        .io_memory(64 << 10)
        .spawn(move || async move {
            let r = measure(&t, &o, &admins, deadline, &churn_on, &ops).await;
            stop.store(true, Ordering::Relaxed);
            r
        })
        .map_err(|e| format!("executor: {e}"))?
        .join()
        .map_err(|e| e.to_string())?;
    let churn_errors = churn.join().map_err(|e| e.to_string())?;
    let (report, json) = result?;
    println!("{report}");
    if churn_errors > 0 {
        println!("  churner errors: {churn_errors}");
    }
    write_json(&c, json)
}

/// Client `i` of node `node` (clients go to URL i mod N).
fn on_node(nodes: usize, node: usize, k: usize) -> usize {
    k * nodes + node
}

async fn churn_loop(
    t: &Target,
    churners: usize,
    conc: usize,
    rate: u64,
    on: &AtomicBool,
    stop: &AtomicBool,
    ops: &AtomicU64,
) -> usize {
    let base = 1_000_000 * t.addrs.len();
    let part = Rc::new(RefCell::new(Part::new()));
    let mut clients = Vec::new();
    // Connected at once, before the run measures anything; churner j is on node j mod N.
    let opened = Rc::new(RefCell::new(Vec::new()));
    let work = {
        let (t, opened, part) = (t.clone(), opened.clone(), part.clone());
        move |j: usize| {
            let (t, opened, part) = (t.clone(), opened.clone(), part.clone());
            async move {
                match open(&t, base + j).await {
                    Ok(client) => opened.borrow_mut().push((j, client)),
                    Err(e) => part.borrow_mut().error(e),
                }
            }
        }
    };
    for_share(0, 1, churners, conc, work).await;
    clients.extend(opened.borrow_mut().drain(..));
    clients.sort_by_key(|(j, _)| *j);
    let gap = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut joined = vec![false; clients.len()];
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if !on.load(Ordering::Relaxed) || clients.is_empty() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let idx = k % clients.len();
        let (j, client) = &mut clients[idx];
        let topic = format!("room:churn:{}", *j % CHURN_TOPICS);
        let frame = if joined[idx] {
            json!([format!("{j}"), format!("l{k}"), topic, "phx_leave", {}])
        } else {
            json!([format!("{j}"), format!("j{k}"), topic, "phx_join", {"meta": {"k": k}, "presence": "none"}])
        };
        joined[idx] = !joined[idx];
        if client.send(frame.to_string()).await.is_err() {
            part.borrow_mut()
                .error("a churner's connection closed".into());
        }
        // Replies are not read: the socket's buffers hold far more than a run sends.
        k += 1;
        ops.fetch_add(1, Ordering::Relaxed);
        glommio::timer::sleep(gap).await;
    }
    let errors = part.borrow().errors;
    errors
}

/// Joins `topic` (not tracked) and returns the client once its state came.
async fn subscriber(
    t: &Target,
    i: usize,
    topic: &str,
    deadline: Instant,
) -> Result<Client, String> {
    let mut client = open(t, i).await?;
    let join = json!(["1", "1", topic, "phx_join", {"track": false}]).to_string();
    client.send(join).await?;
    let mut view = View::default();
    if read_until(&mut client, &mut view, deadline, |_, f| {
        f[3] == "presence_state"
    })
    .await
    {
        Ok(client)
    } else {
        Err(format!("no presence_state for {topic}"))
    }
}

/// Joins `topic` tracked with `meta` (receiving nothing) and returns the client once joined.
async fn member(
    t: &Target,
    i: usize,
    topic: &str,
    meta: Value,
    deadline: Instant,
) -> Result<Client, String> {
    let mut client = open(t, i).await?;
    let join = json!(["1", "1", topic, "phx_join", {"meta": meta, "presence": "none"}]);
    client.send(join.to_string()).await?;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let f = glommio::timer::timeout(remaining, async { Ok(client.next().await) }).await;
        match f {
            Ok(Some(f)) if f[3] == "phx_reply" && f[1] == "1" => {
                return if f[4]["status"] == "ok" {
                    Ok(client)
                } else {
                    Err(format!("join {topic} refused: {}", f[4]))
                };
            }
            Ok(Some(_)) => {}
            _ => return Err(format!("no reply to the join of {topic}")),
        }
    }
}

async fn measure(
    t: &Target,
    o: &Options,
    admins: &[String],
    deadline: Instant,
    churn_on: &AtomicBool,
    ops: &AtomicU64,
) -> Result<(String, Value), String> {
    let n = t.addrs.len();
    let mut out = String::new();
    let mut json = json!({"scenario": "cluster", "nodes": n});
    // Memory of the last node with and without interest in a large topic.
    let last = n - 1;
    let heap = |k: usize| admins.get(k).and_then(|a| metric(a, "roster_heap_bytes"));
    let mut big_clients = Vec::new();
    if o.big > 0 {
        // A node just started publishes its figures within a second.
        for _ in 0..30 {
            if heap(last).is_some() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
        let before = heap(last);
        for b in 0..o.big {
            let node = b % last; // never the last node
            let i = on_node(n, node, 2_000_000 + b / last);
            big_clients.push(member(t, i, "room:big", json!({"b": b}), deadline).await?);
        }
        glommio::timer::sleep(Duration::from_millis(1500)).await; // figures published once a second
        let without = heap(last);
        let sub = subscriber(t, on_node(n, last, 3_000_000 / n), "room:big", deadline).await?;
        glommio::timer::sleep(Duration::from_millis(1500)).await;
        let with = heap(last);
        let held = admins
            .get(last)
            .and_then(|a| metric(a, "roster_cluster_remote_presences"));
        if let (Some(b0), Some(b1), Some(b2)) = (before, without, with) {
            let per = (b2 - b1) / o.big as f64;
            out += &format!(
                "memory of the last node while {} members join a topic on the others: +{:.0} KB without interest; +{:.0} KB once a client of its own joins it ({per:.0} B per remote presence held; remote presences gauge {})\n",
                o.big,
                (b1 - b0) / 1024.0,
                (b2 - b1) / 1024.0,
                held.unwrap_or(f64::NAN)
            );
            json["big"] = json!({"members": o.big, "heap_without_interest_bytes": b1 - b0,
                "heap_with_interest_bytes": b2 - b1, "bytes_per_remote_presence": per, "remote_presences": held});
        } else {
            out += "memory of the last node: no roster_heap_bytes from its admin listener (--admin-urls)\n";
        }
        drop(sub);
        drop(big_clients);
    }
    // One watcher and one prober per node.
    let mut watchers = Vec::new();
    for node in 0..n {
        watchers.push((
            node,
            subscriber(t, on_node(n, node, 1), "room:probe", deadline).await?,
        ));
    }
    let mut probers = Vec::new();
    for node in 0..n {
        probers.push(open(t, on_node(n, node, 2)).await?);
    }
    let seen = Rc::new(RefCell::new(vec![
        Seen {
            remote: hist(),
            local: hist(),
        },
        Seen {
            remote: hist(),
            local: hist(),
        },
    ]));
    let phase = Rc::new(Cell::new(0usize));
    let reading = Rc::new(Cell::new(true));
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|(node, mut client)| {
            let (seen, phase, reading) = (seen.clone(), phase.clone(), reading.clone());
            glommio::spawn_local(async move {
                while reading.get() && Instant::now() < deadline {
                    let f = glommio::timer::timeout(Duration::from_millis(200), async {
                        Ok(client.next().await)
                    })
                    .await;
                    let f = match f {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(_) => continue,
                    };
                    if f[3] != "presence_diff" {
                        continue;
                    }
                    for (_, p) in f[4]["joins"].as_object().into_iter().flatten() {
                        for m in p["metas"].as_array().into_iter().flatten() {
                            let (Some(sent), Some(from)) =
                                (m["sent_ns"].as_u64(), m["node"].as_u64())
                            else {
                                continue;
                            };
                            let us = mono_ns().saturating_sub(sent) / 1000;
                            let mut s = seen.borrow_mut();
                            let s = &mut s[phase.get()];
                            let h = if from as usize == node {
                                &mut s.local
                            } else {
                                &mut s.remote
                            };
                            h.record(us).ok();
                        }
                    }
                }
            })
        })
        .collect();
    let interval = Duration::from_millis(o.interval_ms.max(1));
    let admin_sum =
        |name: &str| -> Option<f64> { admins.iter().map(|a| metric(a, name)).sum::<Option<f64>>() };
    // The heartbeats' share of the traffic: messages while nothing changes.
    let quiet = Duration::from_secs(2);
    let q0 = admin_sum("roster_cluster_messages_out_total");
    glommio::timer::sleep(quiet).await;
    let q1 = admin_sum("roster_cluster_messages_out_total");
    let quiet_rate = q0.zip(q1).map(|(a, b)| (b - a) / quiet.as_secs_f64());
    let mut traffic = None;
    for p in 0..2 {
        phase.set(p);
        let started = Instant::now();
        let before = (
            admin_sum("roster_cluster_messages_out_total"),
            admin_sum("roster_cluster_bytes_out_total"),
            admin_sum("roster_cluster_messages_in_total"),
            ops.load(Ordering::Relaxed),
        );
        if p == 1 {
            churn_on.store(true, Ordering::Relaxed);
        }
        for r in 0..o.rounds {
            if Instant::now() >= deadline {
                break;
            }
            let node = r % n;
            let prober = &mut probers[node];
            let topic = "room:probe";
            let meta = json!({"sent_ns": mono_ns(), "node": node, "r": r});
            let join = json!(["1", format!("j{r}"), topic, "phx_join", {"meta": meta, "presence": "none"}]);
            prober.send(join.to_string()).await?;
            glommio::timer::sleep(interval).await;
            let leave = json!(["1", format!("l{r}"), topic, "phx_leave", {}]);
            prober.send(leave.to_string()).await?;
            glommio::timer::sleep(interval).await;
        }
        churn_on.store(false, Ordering::Relaxed);
        glommio::timer::sleep(Duration::from_millis(300)).await; // the last ones arrive
        if p == 1 {
            let secs = started.elapsed().as_secs_f64();
            let changes = (ops.load(Ordering::Relaxed) - before.3) as f64;
            let after = (
                admin_sum("roster_cluster_messages_out_total"),
                admin_sum("roster_cluster_bytes_out_total"),
                admin_sum("roster_cluster_messages_in_total"),
            );
            if let (Some(m0), Some(m1), Some(b0), Some(b1), Some(i0), Some(i1), Some(q)) = (
                before.0, after.0, before.1, after.1, before.2, after.2, quiet_rate,
            ) {
                let beats = q * secs;
                let probes = 2.0 * o.rounds as f64;
                let per = (m1 - m0 - beats) / (changes + probes);
                let bytes = (b1 - b0) / (changes + probes);
                let fanned = (i1 - i0) / (changes + probes);
                traffic = Some(
                    json!({"changes_per_s": changes / secs, "messages_out_per_change": per,
                    "bytes_out_per_change": bytes, "messages_in_per_change": fanned, "heartbeat_messages_per_s": q}),
                );
                out += &format!(
                    "NATS traffic per presence change under churn ({:.0} changes/s): {per:.2} messages and {bytes:.0} bytes published, {fanned:.2} messages delivered (heartbeats, {q:.1}/s in all, taken out of the count)\n",
                    changes / secs
                );
            }
        }
    }
    reading.set(false);
    join_all(tasks).await;
    let seen = std::mem::take(&mut *seen.borrow_mut());
    for (p, name) in [(0, "idle"), (1, "under churn")] {
        let s = &seen[p];
        out += &format!(
            "join -> seen, {name}: remote (another node) us: {}\n                    local (the same node) us: {}\n",
            percentiles(&s.remote),
            percentiles(&s.local)
        );
    }
    json["idle"] = json!({"remote_us": json_percentiles(&seen[0].remote), "local_us": json_percentiles(&seen[0].local)});
    json["churn"] = json!({"rate": o.rate, "churners": o.churners,
        "remote_us": json_percentiles(&seen[1].remote), "local_us": json_percentiles(&seen[1].local)});
    if let Some(tr) = traffic {
        json["traffic"] = tr;
    }
    if let Some(cmd) = &o.kill_cmd {
        let left = kill_and_time(t, cmd, deadline).await?;
        out += &format!("kill -9 of the last node: its {VICTIMS} presences left on the first node after {left} ms\n");
        json["kill_leave_ms"] = json!(left);
    }
    Ok((out, json))
}

/// Victims on the last node, a watcher on the first; runs `cmd` and times the leaves.
async fn kill_and_time(t: &Target, cmd: &str, deadline: Instant) -> Result<u128, String> {
    let n = t.addrs.len();
    let mut watcher = subscriber(t, on_node(n, 0, 4_000_000 / n), "room:victims", deadline).await?;
    let mut victims = Vec::new();
    for v in 0..VICTIMS {
        let i = on_node(n, n - 1, 4_100_000 / n + v);
        victims.push(member(t, i, "room:victims", json!({"v": v}), deadline).await?);
    }
    let mut view = View::default();
    if !read_until(&mut watcher, &mut view, deadline, |v, _| {
        v.keys() >= VICTIMS
    })
    .await
    {
        return Err("the watcher never saw every victim".into());
    }
    let killed = Instant::now();
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| format!("--kill-cmd: {e}"))?;
    if !status.success() {
        return Err(format!("--kill-cmd exited with {status}"));
    }
    if !read_until(&mut watcher, &mut view, deadline, |v, _| v.keys() == 0).await {
        return Err("the victims' presences never left".into());
    }
    drop(victims);
    Ok(killed.elapsed().as_millis())
}

/// The sum over series of metric `name` on an admin listener (a blocking read: the admin
/// listener answers at once, and the measurements around it wait anyway).
pub(crate) fn metric(url: &str, name: &str) -> Option<f64> {
    let body = http_get(url, "/metrics")?;
    let series = body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
    let values: Vec<f64> = series
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
