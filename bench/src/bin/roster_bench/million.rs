//! Scenario `million`: one large run against the nodes of a cluster, in four phases on the same
//! clients, each a glommio task for its whole life:
//!
//! 1. ramp: every client connects (client i to node i mod N, without regard to topics, as a load
//!    balancer would), joins its topic tracked (most topics small, in full presence; a few large,
//!    in count presence) and watches a few other users;
//! 2. hold: idle, heartbeats only, while the parent reads memory, CPU and NATS's counters;
//! 3. churn: some clients leave and rejoin their topic at `--churn-rate`; the others time each
//!    join they see from a node other than their own (members of the topic and watchers);
//! 4. failover: `--kill-cmd` ends one node; its clients reconnect to the others and rejoin, and
//!    everyone else counts the presence changes they see in `--window-s`.
//!
//! Needs `--procs` (the workers are where the clients live; the parent measures the machine at
//! the phase boundaries). With ROSTER_BENCH_SHOW_CHANGES set, the workers print each change a
//! client sees in the failover and each watch view that lacks a user.

use crate::prelude::*;
use roster_bench::stamps::{joined_stamps_with, mono_ns};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Clone)]
pub(crate) struct Options {
    /// Members of each small topic (presence full).
    #[arg(long, default_value_t = 10)]
    small: usize,
    /// Large topics (presence count)...
    #[arg(long, default_value_t = 10)]
    large_topics: usize,
    /// ... and the members of each.
    #[arg(long, default_value_t = 5000)]
    large_size: usize,
    /// Other users on each client's watch list (0: none).
    #[arg(long, default_value_t = 3)]
    watch: usize,
    /// Seconds the clients are held idle before the machine is read.
    #[arg(long, default_value_t = 30)]
    hold_s: u64,
    /// Joins plus leaves per second across the cluster during the churn (0: no churn).
    #[arg(long, default_value_t = 10_000)]
    churn_rate: u64,
    #[arg(long, default_value_t = 60)]
    churn_s: u64,
    /// Shell command ending one node as the failover begins (e.g. "kill -9 PID"); without it
    /// there is no failover phase.
    #[arg(long)]
    kill_cmd: Option<String>,
    /// The node (index in --url) the kill ends: its clients reconnect to the others.
    #[arg(long, default_value_t = 0)]
    killed_node: usize,
    /// How long everyone counts presence changes after the kill.
    #[arg(long, default_value_t = 40)]
    window_s: u64,
    /// Seconds a client may take to connect, join and get its views during the ramp.
    #[arg(long, default_value_t = 60)]
    join_timeout_s: u64,
    /// The nodes' pids, comma-separated, in --url order (memory and CPU per node).
    #[arg(long)]
    server_pids: Option<String>,
    /// The nodes' admin listeners, http://HOST:PORT, comma-separated (remote presences held).
    #[arg(long)]
    admin_urls: Option<String>,
    #[arg(long)]
    nats_pid: Option<u32>,
    /// nats-server's monitoring listener, http://HOST:PORT (its /varz: messages, bytes and
    /// subscriptions).
    #[arg(long)]
    nats_monitor: Option<String>,
}

/// Where each client is: its node, its topic, whom it watches. Topics are filled through a
/// fixed permutation of the client indices (i * P mod N, P a prime above N), so that a topic's
/// members are spread over the nodes as a load balancer would spread them.
#[derive(Clone, Copy)]
struct Layout {
    clients: usize,
    nodes: usize,
    small: usize,
    large_topics: usize,
    large_size: usize,
    watch: usize,
}

const SPREAD: u128 = 2_147_483_647;

impl Layout {
    fn slot(&self, i: usize) -> usize {
        (i as u128 * SPREAD % self.clients as u128) as usize
    }

    fn large_members(&self) -> usize {
        self.large_topics * self.large_size
    }

    /// The client's topic, and whether it is a large one (presence count).
    fn topic(&self, i: usize) -> (String, bool) {
        let s = self.slot(i);
        if s < self.large_members() {
            (format!("big:{}", s / self.large_size.max(1)), true)
        } else {
            (
                format!("room:{}", (s - self.large_members()) / self.small.max(1)),
                false,
            )
        }
    }

    fn small_topics(&self) -> usize {
        (self.clients - self.large_members()).div_ceil(self.small.max(1))
    }

    fn node(&self, i: usize) -> usize {
        i % self.nodes
    }

    /// The users client i watches: spread over everyone (friends are not on one's node).
    fn watched(&self, i: usize) -> Vec<String> {
        (1..=self.watch)
            .map(|k| {
                let h = (i as u64 ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                format!("u{}", (h >> 11) as usize % self.clients)
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "{} clients over {} nodes (client i on node i mod {}); {} topics of {} in presence full, \
             {} topics of {} in presence count; each client watches {} other users",
            self.clients,
            self.nodes,
            self.nodes,
            self.small_topics(),
            self.small,
            self.large_topics,
            self.large_size,
            self.watch
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stage {
    Ramp,
    Hold,
    Churn,
    /// Churn over: what it sent is still arriving, not counted.
    Drain,
    /// Presence changes count from here (the kill comes as the parent opens the next phase).
    Watch,
    Failover,
    Done,
}

/// What one worker's clients share.
struct Ctx {
    layout: Layout,
    target: Target,
    /// Where the killed node's clients come back to.
    back_to: Option<Target>,
    killed: Option<usize>,
    stage: Cell<Stage>,
    /// Clients waiting for the stage to move on, by client index.
    wakers: RefCell<std::collections::HashMap<usize, std::task::Waker>>,
    /// When the churn and the failover began here.
    churn_at: Cell<Option<Instant>>,
    failover_at: Cell<Option<Instant>>,
    /// Clients that churn, and the seconds between one's rejoins.
    churn_every: usize,
    cycle: Duration,
    join_timeout: Duration,
    /// a: ramp connect -> joined and watching; b: a rejoin seen by a member on another node;
    /// c: by a watcher on another node; d: a killed node's client back and rejoined after the
    /// kill. `lost`: connections that ended when nothing ended them.
    part: RefCell<Part>,
    ramp_start: Instant,
    joined_per_s: RefCell<Vec<u64>>,
    joined_per_node: RefCell<Vec<u64>>,
    churn_ops: Cell<u64>,
    /// Clients whose watch view lacked a watched user once the churn was over.
    incomplete: Cell<u64>,
    /// Presence changes seen in the failover: counts, topic diffs' metas, watch lists' metas.
    changes: Cell<[u64; 3]>,
    change_samples: Cell<u64>,
}

impl Ctx {
    fn stage(&self) -> Stage {
        self.stage.get()
    }

    fn set_stage(&self, stage: Stage) {
        self.stage.set(stage);
        for (_, w) in self.wakers.borrow_mut().drain() {
            w.wake();
        }
    }

    fn joined(&self, i: usize, took: Duration) {
        let mut p = self.part.borrow_mut();
        p.a.record(took.as_micros() as u64).ok();
        p.ok += 1;
        let s = self.ramp_start.elapsed().as_secs() as usize;
        let mut per_s = self.joined_per_s.borrow_mut();
        if per_s.len() <= s {
            per_s.resize(s + 1, 0);
        }
        per_s[s] += 1;
        self.joined_per_node.borrow_mut()[self.layout.node(i)] += 1;
    }

    fn churns(&self, i: usize) -> bool {
        self.churn_every > 0 && i.is_multiple_of(self.churn_every) && !self.layout.topic(i).1
    }
}

fn join_frame(ctx: &Ctx, i: usize, join_ref: u64, sent_ns: Option<u64>) -> String {
    let (topic, large) = ctx.layout.topic(i);
    let mut meta = json!({"i": i, "node": ctx.layout.node(i)});
    if let Some(ns) = sent_ns {
        meta["sent_ns"] = json!(ns);
    }
    let mode = if large { "count" } else { "full" };
    json!([
        join_ref.to_string(),
        join_ref.to_string(),
        topic,
        "phx_join",
        member_payload(meta, mode)
    ])
    .to_string()
}

/// Connects client i to `t`, joins its topic (with the meta it last joined with: `stamp`, as
/// phoenix.js rejoins with a channel's params) and its watch list, and waits for both views.
async fn setup(
    ctx: &Ctx,
    i: usize,
    t: &Target,
    stamp: Option<u64>,
) -> Result<(Client, View), String> {
    let until = Instant::now() + ctx.join_timeout;
    let mut client = open(t, i).await?;
    let (topic, large) = ctx.layout.topic(i);
    client.send(join_frame(ctx, i, 1, stamp)).await?;
    let want = if large {
        "presence_count"
    } else {
        "presence_state"
    };
    wait_for(&mut client, &topic, want, until).await?;
    let mut watching = View::default();
    if ctx.layout.watch > 0 {
        let frame = json!(["2", "2", "watch:w", "phx_join", {"users": ctx.layout.watched(i)}]);
        client.send(frame.to_string()).await?;
        let state = wait_for(&mut client, "watch:w", "presence_state", until).await?;
        watching.state(&state[4]);
    }
    Ok((client, watching))
}

/// Keeps the watch list's view (phoenix.js Presence's way) from a frame read.
fn watch_frame(view: &mut View, text: &str) {
    if text.contains("\"watch:w\"") && text.contains("\"presence_diff\"") {
        if let Ok(f) = serde_json::from_str::<Value>(text) {
            view.diff(&f[4]);
        }
    }
}

async fn wait_for(
    client: &mut Client,
    topic: &str,
    event: &str,
    until: Instant,
) -> Result<Value, String> {
    loop {
        let wait = until.saturating_duration_since(Instant::now());
        let next = glommio::timer::timeout(wait, async { Ok(client.next().await) }).await;
        let f = match next {
            Ok(Some(f)) => f,
            Ok(None) => return Err(format!("closed while joining {topic}")),
            Err(_) => return Err(format!("timeout: no {event} on {topic}")),
        };
        if f[2] != topic {
            continue;
        }
        if f[3] == "phx_reply" && f[4]["status"] != "ok" {
            return Err(format!("join refused: {f}"));
        }
        if f[3] == event {
            return Ok(f);
        }
    }
}

/// What happened to a client while it waited for a stage.
enum Held {
    Reached,
    Ended,
}

/// Ready once the stage is at least `stage`: woken by [`Ctx::set_stage`], so that a million
/// idle clients cost nothing until then (no polling).
struct StageReached<'a> {
    ctx: &'a Ctx,
    stage: Stage,
    who: usize,
}

impl std::future::Future for StageReached<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.ctx.stage() >= self.stage {
            return std::task::Poll::Ready(());
        }
        self.ctx
            .wakers
            .borrow_mut()
            .insert(self.who, cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// A client's next frame, or None when `stage` comes first (Some(None): the connection ended).
async fn next_before(
    ctx: &Ctx,
    i: usize,
    client: &mut Client,
    stage: Stage,
) -> Option<Option<String>> {
    futures_lite::future::or(async { Some(client.next_text().await) }, async {
        StageReached { ctx, stage, who: i }.await;
        None
    })
    .await
}

/// Reads frames (keeping the watch list's view), heartbeats going, until the stage is at least
/// `stage`.
async fn hold_until(
    ctx: &Ctx,
    i: usize,
    client: &mut Client,
    view: &mut View,
    stage: Stage,
) -> Held {
    loop {
        match next_before(ctx, i, client, stage).await {
            Some(Some(text)) => watch_frame(view, &text),
            Some(None) => return Held::Ended,
            None => return Held::Reached,
        }
    }
}

/// The churn, for one client: a churner leaves and rejoins its topic every cycle (its join
/// stamped; the last stamp kept in `stamp`); everyone times the stamped joins it sees from
/// other nodes.
async fn churn(
    ctx: &Ctx,
    i: usize,
    client: &mut Client,
    view: &mut View,
    stamp: &mut Option<u64>,
) -> Held {
    let me = ctx.layout.node(i) as u64;
    let churner = ctx.churns(i);
    let start = ctx.churn_at.get().unwrap_or_else(Instant::now);
    // Spread the churners' first rejoins over a cycle.
    let offset = ctx
        .cycle
        .mul_f64((i as u128 * SPREAD % 1000) as f64 / 1000.0);
    let mut next = start + offset;
    let mut join_ref = 2u64;
    while ctx.stage() < Stage::Watch {
        let churning = churner && ctx.stage() == Stage::Churn;
        if churning && Instant::now() >= next {
            next += ctx.cycle;
            join_ref += 1;
            let (topic, _) = ctx.layout.topic(i);
            let leave = json!([join_ref.to_string(), "L", topic, "phx_leave", {}]).to_string();
            join_ref += 1;
            *stamp = Some(mono_ns());
            let join = join_frame(ctx, i, join_ref, *stamp);
            if client.send(leave).await.is_err() || client.send(join).await.is_err() {
                return Held::Ended;
            }
            ctx.churn_ops.set(ctx.churn_ops.get() + 2);
            continue;
        }
        // The next frame, or the stage moving on, or (a churner) its next rejoin.
        let stage = if churning { Stage::Drain } else { Stage::Watch };
        let read = futures_lite::future::or(next_before(ctx, i, client, stage), async {
            if churning {
                glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
            } else {
                std::future::pending::<()>().await;
            }
            None
        })
        .await;
        match read {
            Some(Some(text)) if text.contains("\"presence_diff\"") => {
                watch_frame(view, &text);
                let now_ns = mono_ns();
                let watcher = text.contains("\"watch:w\"");
                let mut p = ctx.part.borrow_mut();
                joined_stamps_with(&text, "\"node\":", |ns, node| {
                    if node != Some(me) {
                        let us = now_ns.saturating_sub(ns) / 1000;
                        let h = if watcher { &mut p.c } else { &mut p.b };
                        h.record(us).ok();
                    }
                });
            }
            Some(None) => return Held::Ended,
            Some(Some(_)) | None => {}
        }
    }
    Held::Reached
}

/// Counts the presence changes client i sees until the stage is Done: metas joining or leaving
/// in diffs (its topic's and its watch list's), and counts (sent only when they changed).
async fn count_changes(ctx: &Ctx, i: usize, client: &mut Client) -> Held {
    // Counts, topic diffs, watch-list diffs.
    let mut seen = [0u64; 3];
    let held = loop {
        match next_before(ctx, i, client, Stage::Done).await {
            Some(Some(text)) if text.contains("\"presence_count\"") => seen[0] += 1,
            Some(Some(text)) if text.contains("\"presence_diff\"") => {
                let Ok(f) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let k = if f[2] == "watch:w" { 2 } else { 1 };
                if std::env::var_os("ROSTER_BENCH_SHOW_CHANGES").is_some() {
                    eprintln!("client {i} saw: {text}");
                }
                for side in ["joins", "leaves"] {
                    for (_, p) in f[4][side].as_object().into_iter().flatten() {
                        seen[k] += p["metas"].as_array().map_or(0, |m| m.len() as u64);
                    }
                }
            }
            Some(Some(_)) => {}
            Some(None) => break Held::Ended,
            None => break Held::Reached,
        }
    };
    let mut all = ctx.changes.get();
    for (a, s) in all.iter_mut().zip(seen) {
        *a += s;
    }
    ctx.changes.set(all);
    ctx.change_samples.set(ctx.change_samples.get() + 1);
    held
}

/// A killed node's client: once the failover is on, back on another node, rejoined.
async fn come_back(ctx: &Ctx, i: usize, stamp: Option<u64>) {
    StageReached {
        ctx,
        stage: Stage::Failover,
        who: i,
    }
    .await;
    let (Some(t), Some(at)) = (ctx.back_to.as_ref(), ctx.failover_at.get()) else {
        return;
    };
    loop {
        // Not back by the end: the failover table's dropped minus back (not a ramp timeout).
        if ctx.stage() >= Stage::Done {
            return;
        }
        // Bounded: a node busy taking the others back may accept and not answer for a while.
        let attempt = glommio::timer::timeout(ctx.join_timeout, async {
            Ok(setup(ctx, i, t, stamp).await)
        });
        match attempt.await.unwrap_or_else(|_| Err("timeout".into())) {
            Ok((mut client, mut view)) => {
                let back = at.elapsed().as_micros() as u64;
                ctx.part.borrow_mut().d.record(back).ok();
                // Stay until the end: leaving now would be a change the others see.
                let _ = hold_until(ctx, i, &mut client, &mut view, Stage::Done).await;
                return;
            }
            // A refused or failed attempt: again, as phoenix.js would (its first retry is
            // sooner; the nodes are busy taking the others back).
            Err(_) => glommio::timer::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The rest of a client's life after the ramp.
async fn life(ctx: Rc<Ctx>, i: usize, mut client: Client, mut view: View) {
    let mut stamp = None;
    let ended = match hold_until(&ctx, i, &mut client, &mut view, Stage::Churn).await {
        Held::Ended => true,
        Held::Reached => {
            let churned = churn(&ctx, i, &mut client, &mut view, &mut stamp).await;
            matches!(churned, Held::Ended)
        }
    };
    // Everyone is connected and the churn is over: a watch list shows every user on it.
    if !ended {
        let missing: Vec<String> = ctx
            .layout
            .watched(i)
            .into_iter()
            .filter(|k| !view.has(k))
            .collect();
        if !missing.is_empty() {
            ctx.incomplete.set(ctx.incomplete.get() + 1);
            if std::env::var_os("ROSTER_BENCH_SHOW_CHANGES").is_some() {
                eprintln!("client {i} watch view lacks {missing:?}");
            }
        }
    }
    let killed = ctx.killed == Some(ctx.layout.node(i));
    if ended {
        if killed && ctx.stage() >= Stage::Watch {
            return come_back(&ctx, i, stamp).await;
        }
        ctx.part.borrow_mut().lost += 1;
        return;
    }
    if killed {
        // Until the kill ends this connection (read and dropped meanwhile).
        if let Held::Reached = hold_until(&ctx, i, &mut client, &mut view, Stage::Done).await {
            return;
        }
        drop(client); // abrupt, as the dead node left it
        return come_back(&ctx, i, stamp).await;
    }
    if let Held::Ended = count_changes(&ctx, i, &mut client).await {
        ctx.part.borrow_mut().lost += 1;
    }
}

/// A phase boundary for this worker (one executor): the parent's BARRIER/go exchange, on a
/// thread of its own so that the clients keep reading and beating meanwhile.
async fn boundary() {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        use std::io::Write as _;
        println!("BARRIER");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        flag.store(true, Ordering::Release);
    });
    while !done.load(Ordering::Acquire) {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// The machine, as the parent reads it at a phase boundary.
#[derive(Clone, Default)]
struct Reading {
    at: Option<Instant>,
    node_rss: Vec<usize>,
    node_cpu: Vec<f64>,
    nats_rss: usize,
    nats_cpu: f64,
    workers_rss: usize,
    workers_cpu: f64,
    kernel: Option<(usize, usize)>,
    varz: Value,
    remote_presences: Option<f64>,
    /// Over all nodes: gaps seen in other nodes' frames, and part requests sent.
    gaps: Option<f64>,
    part_requests: Option<f64>,
}

/// The sum of a metric over the nodes' admin listeners.
fn over_nodes(o: &Options, metric: &str) -> Option<f64> {
    o.admin_urls
        .as_deref()?
        .split(',')
        .map(|u| crate::cluster::metric(u, metric))
        .sum()
}

fn read_machine(o: &Options, pids: &[u32], remote: bool) -> Reading {
    let workers = children_of(std::process::id());
    Reading {
        at: Some(Instant::now()),
        node_rss: pids.iter().map(|&p| rss_of(p).unwrap_or(0)).collect(),
        node_cpu: pids
            .iter()
            .map(|&p| cpu_seconds(p).unwrap_or(0.0))
            .collect(),
        nats_rss: o.nats_pid.and_then(rss_of).unwrap_or(0),
        nats_cpu: o.nats_pid.and_then(cpu_seconds).unwrap_or(0.0),
        workers_rss: workers.iter().filter_map(|&p| rss_of(p)).sum(),
        workers_cpu: workers.iter().filter_map(|&p| cpu_seconds(p)).sum(),
        kernel: kernel_bytes(),
        varz: o
            .nats_monitor
            .as_deref()
            .and_then(|m| http_get(m, "/varz"))
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null),
        remote_presences: remote
            .then(|| over_nodes(o, "roster_cluster_remote_presences"))
            .flatten(),
        gaps: over_nodes(o, "roster_cluster_gaps_total"),
        part_requests: over_nodes(o, "roster_cluster_part_requests_total"),
    }
}

/// What happened between two readings: CPU shares and NATS rates.
fn window(a: &Reading, b: &Reading) -> Value {
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64().max(1e-3),
        _ => return Value::Null,
    };
    let share = |x: f64, y: f64| 100.0 * (y - x) / secs;
    let grew = |x: Option<f64>, y: Option<f64>| Some(y? - x?);
    let nodes: Vec<f64> = a
        .node_cpu
        .iter()
        .zip(&b.node_cpu)
        .map(|(x, y)| share(*x, *y))
        .collect();
    let rate = |k: &str| {
        let (x, y) = (a.varz[k].as_f64()?, b.varz[k].as_f64()?);
        Some((y - x) / secs)
    };
    json!({
        "seconds": secs,
        "node_cpu_pct": nodes,
        "nodes_cpu_pct_total": nodes.iter().sum::<f64>(),
        "nats_cpu_pct": share(a.nats_cpu, b.nats_cpu),
        "workers_cpu_pct": share(a.workers_cpu, b.workers_cpu),
        "nats_in_msgs_per_s": rate("in_msgs"),
        "nats_out_msgs_per_s": rate("out_msgs"),
        "nats_in_bytes_per_s": rate("in_bytes"),
        "nats_out_bytes_per_s": rate("out_bytes"),
        "gaps": grew(a.gaps, b.gaps),
        "part_requests": grew(a.part_requests, b.part_requests),
    })
}

pub(crate) fn million(c: Common, o: Options) -> Result<(), String> {
    if c.procs < 2 {
        return Err("million runs its clients in worker processes: --procs 2 or more".into());
    }
    if c.executors != 1 {
        return Err("million: one executor per worker process (--executors 1); use --procs".into());
    }
    if compatible() {
        return Err(
            "million uses roster's presence modes and watch lists: not with --phoenix-compatible"
                .into(),
        );
    }
    let target = Target::parse(&c)?;
    let nodes = target.addrs.len();
    let layout = Layout {
        clients: c.clients,
        nodes,
        small: o.small.max(1),
        large_topics: o.large_topics,
        // Large topics hold at most a tenth of the clients: most topics are small.
        large_size: o
            .large_size
            .min(c.clients / (10 * o.large_topics.max(1)))
            .max(1),
        watch: o.watch,
    };
    let killed = o.kill_cmd.as_ref().map(|_| o.killed_node);
    if killed.is_some_and(|k| k >= nodes) || (killed.is_some() && nodes < 2) {
        return Err("--killed-node must be one of the --url nodes, and others must remain".into());
    }
    // Churners rejoin every cycle (two operations each): enough of them for the rate.
    let cycle = Duration::from_secs(2);
    let small_members = c.clients - layout.large_members();
    let churners = ((o.churn_rate as f64 / 2.0 * cycle.as_secs_f64()) as usize).min(small_members);
    let churn_every = c.clients.checked_div(churners).map_or(0, |e| e.max(1));
    if is_worker() {
        return worker(c, o, layout, target, killed, churn_every, cycle);
    }
    let pids: Vec<u32> = match &o.server_pids {
        Some(s) => s
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u32>()
                    .map_err(|e| format!("--server-pids {p}: {e}"))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    println!("million: {}", layout.describe());
    let idle = read_machine(&o, &pids, false);
    let started = Instant::now();
    let mut readings: Vec<Reading> = Vec::new();
    let kill_cmd = o.kill_cmd.clone();
    let on_phase = |k: usize| {
        let remote = k == 1;
        readings.push(read_machine(&o, &pids, remote));
        eprintln!(
            "million: phase {k} at {:.1} s",
            started.elapsed().as_secs_f64()
        );
        if k == 2 {
            if let Some(cmd) = kill_cmd.clone() {
                crate::reconnect_storm::run_restart(cmd);
            }
        }
    };
    let (p, extras) = distributed(&c, on_phase, || Err("no local run".into()))?
        .ok_or("the parent has no result")?;
    report(
        &c, &o, layout, churners, killed, &idle, &readings, started, p, extras,
    )
}

fn worker(
    c: Common,
    o: Options,
    layout: Layout,
    target: Target,
    killed: Option<usize>,
    churn_every: usize,
    cycle: Duration,
) -> Result<(), String> {
    let back_to = match killed {
        Some(k) => {
            let others: Vec<String> = c
                .url
                .split(',')
                .enumerate()
                .filter(|(n, _)| *n != k)
                .map(|(_, u)| u.to_owned())
                .collect();
            Some(target.to(&others.join(","))?)
        }
        None => None,
    };
    let (w, nw) = split();
    let n = c.clients;
    let conc = c.concurrency.max(1);
    let extras_out = Arc::new(Mutex::new(Value::Null));
    let extras_in = extras_out.clone();
    let local = move || {
        let parts = on_executors(1, move |_| {
            let (target, back_to, o) = (target.clone(), back_to.clone(), o.clone());
            let extras_out = extras_in.clone();
            async move {
                let ctx = Rc::new(Ctx {
                    layout,
                    target,
                    back_to,
                    killed,
                    stage: Cell::new(Stage::Ramp),
                    wakers: RefCell::new(std::collections::HashMap::new()),
                    churn_at: Cell::new(None),
                    failover_at: Cell::new(None),
                    churn_every: if o.churn_rate > 0 { churn_every } else { 0 },
                    cycle,
                    join_timeout: Duration::from_secs(o.join_timeout_s),
                    part: RefCell::new(Part::new()),
                    ramp_start: Instant::now(),
                    joined_per_s: RefCell::new(Vec::new()),
                    joined_per_node: RefCell::new(vec![0; layout.nodes]),
                    churn_ops: Cell::new(0),
                    incomplete: Cell::new(0),
                    changes: Cell::new([0; 3]),
                    change_samples: Cell::new(0),
                });
                let lives = Rc::new(RefCell::new(Vec::new()));
                let work = {
                    let (ctx, lives) = (ctx.clone(), lives.clone());
                    move |i: usize| {
                        let (ctx, lives) = (ctx.clone(), lives.clone());
                        async move {
                            let t0 = Instant::now();
                            let attempt = glommio::timer::timeout(ctx.join_timeout, async {
                                Ok(setup(&ctx, i, &ctx.target, None).await)
                            });
                            match attempt.await.unwrap_or_else(|_| Err("timeout".into())) {
                                Ok((client, view)) => {
                                    ctx.joined(i, t0.elapsed());
                                    let life = life(ctx.clone(), i, client, view);
                                    let task = glommio::spawn_local(life);
                                    lives.borrow_mut().push(task);
                                }
                                Err(e) if e.starts_with("timeout") => {
                                    ctx.part.borrow_mut().timeouts += 1
                                }
                                Err(e) => ctx.part.borrow_mut().error(e),
                            }
                        }
                    }
                };
                for_share(w, nw, n, conc, work).await;
                boundary().await; // 0: everyone is in
                ctx.set_stage(Stage::Hold);
                glommio::timer::sleep(Duration::from_secs(o.hold_s)).await;
                boundary().await; // 1: the parent has read the machine, held
                ctx.churn_at.set(Some(Instant::now()));
                ctx.set_stage(Stage::Churn);
                glommio::timer::sleep(Duration::from_secs(o.churn_s)).await;
                ctx.set_stage(Stage::Drain);
                glommio::timer::sleep(Duration::from_secs(2)).await;
                ctx.set_stage(Stage::Watch);
                boundary().await; // 2: the parent reads the machine and kills a node
                ctx.failover_at.set(Some(Instant::now()));
                ctx.set_stage(Stage::Failover);
                if killed.is_some() {
                    glommio::timer::sleep(Duration::from_secs(o.window_s)).await;
                }
                ctx.set_stage(Stage::Done);
                let tasks = std::mem::take(&mut *lives.borrow_mut());
                join_all(tasks).await;
                let part = std::mem::replace(&mut *ctx.part.borrow_mut(), Part::new());
                let extras = json!({
                    "joined_per_s_sum": *ctx.joined_per_s.borrow(),
                    "joined_per_node_sum": *ctx.joined_per_node.borrow(),
                    "churn_ops": ctx.churn_ops.get(),
                    "incomplete_views": ctx.incomplete.get(),
                    "changes_sum": ctx.changes.get(),
                    "change_samples": ctx.change_samples.get(),
                });
                if let Ok(mut out) = extras_out.lock() {
                    *out = extras;
                }
                part
            }
        })?;
        let extras = extras_out.lock().map(|e| e.clone()).unwrap_or(Value::Null);
        Ok((Part::merge(parts), extras))
    };
    distributed(&c, |_| {}, local)?;
    Ok(())
}

fn mib(b: f64) -> String {
    format!("{:.0} MiB", b / 1048576.0)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
fn report(
    c: &Common,
    o: &Options,
    layout: Layout,
    churners: usize,
    killed: Option<usize>,
    idle: &Reading,
    readings: &[Reading],
    started: Instant,
    p: Part,
    extras: Value,
) -> Result<(), String> {
    let empty = Reading::default();
    let (ramped, held, churned) = (
        readings.first().unwrap_or(&empty),
        readings.get(1).unwrap_or(&empty),
        readings.get(2).unwrap_or(&empty),
    );
    let n = p.ok.max(1) as f64;
    let ramp_s = ramped
        .at
        .map_or(0.0, |at| at.duration_since(started).as_secs_f64());
    let rate = p.ok as f64 / ramp_s.max(1e-3);
    let per_node: Vec<u64> = extras["joined_per_node_sum"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let per_s: Vec<u64> = extras["joined_per_s_sum"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let node_rates: Vec<f64> = per_node
        .iter()
        .map(|&k| k as f64 / ramp_s.max(1e-3))
        .collect();
    let (min_rate, max_rate) = node_rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));

    println!("\n## 1. Ramp\n");
    println!("| joined | errors | timeouts | seconds | connects+joins/s | per node (min-max) | join p50 | p99 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} of {} | {} | {} | {ramp_s:.1} | {rate:.0} | {:.0}-{max_rate:.0} | {:.1} ms | {:.1} ms | {:.1} ms |",
        p.ok,
        c.clients,
        p.errors,
        p.timeouts,
        if node_rates.is_empty() { 0.0 } else { min_rate },
        ms(&p.a, 0.5),
        ms(&p.a, 0.99),
        p.a.max() as f64 / 1000.0
    );
    if let Some(e) = &p.first_error {
        println!("\nfirst error: {e}");
    }
    let ramp_window = window(idle, ramped);
    println!(
        "\nover the ramp: {} part requests, {} gaps (all nodes); NATS {:.0} messages/s in, {:.0} out",
        ramp_window["part_requests"],
        ramp_window["gaps"],
        ramp_window["nats_in_msgs_per_s"].as_f64().unwrap_or(0.0),
        ramp_window["nats_out_msgs_per_s"].as_f64().unwrap_or(0.0)
    );

    let sum = |v: &[usize]| v.iter().sum::<usize>() as f64;
    let servers = sum(&held.node_rss);
    let servers_idle = sum(&idle.node_rss);
    let kernel = match (idle.kernel, held.kernel) {
        (Some((s0, t0)), Some((s1, t1))) => Some(((s1 + t1) as f64 - (s0 + t0) as f64).max(0.0)),
        _ => None,
    };
    let hold = window(ramped, held);
    let subs = held.varz["subscriptions"].as_f64();
    let remote = held.remote_presences;
    println!("\n## 2. Hold ({} s idle, {})\n", o.hold_s, heartbeat_text());
    println!("| | total | per connection |");
    println!("| --- | --- | --- |");
    println!(
        "| servers, user space ({} nodes; idle before: {}) | {} | {:.0} B ({:.0} B above idle) |",
        held.node_rss.len(),
        mib(servers_idle),
        mib(servers),
        servers / n,
        (servers - servers_idle) / n
    );
    println!(
        "| load generator, user space ({} workers) | {} | {:.0} B |",
        c.procs,
        mib(held.workers_rss as f64),
        held.workers_rss as f64 / n
    );
    if let Some(k) = kernel {
        println!(
            "| kernel (slab + TCP buffers, both loopback ends, system-wide) | {} | {:.0} B |",
            mib(k),
            k / n
        );
    }
    println!(
        "| nats-server (idle before: {}) | {} | {:.0} B |",
        mib(idle.nats_rss as f64),
        mib(held.nats_rss as f64),
        held.nats_rss as f64 / n
    );
    let total = servers + held.workers_rss as f64 + kernel.unwrap_or(0.0) + held.nats_rss as f64;
    println!("| all of it | {} | {:.0} B |", mib(total), total / n);
    println!();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let node_cpu: Vec<f64> = hold["node_cpu_pct"]
        .as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default();
    let max_cpu = node_cpu.iter().cloned().fold(0.0, f64::max);
    println!(
        "CPU while held: nodes {:.1}% of one core in all (max {:.1}% on one), nats-server {:.1}%, load generator {:.1}%",
        f(&hold["nodes_cpu_pct_total"]),
        max_cpu,
        f(&hold["nats_cpu_pct"]),
        f(&hold["workers_cpu_pct"])
    );
    println!(
        "NATS while held: {:.0} messages/s in, {:.0} out; {} subscriptions",
        f(&hold["nats_in_msgs_per_s"]),
        f(&hold["nats_out_msgs_per_s"]),
        subs.map_or("?".into(), |s| format!("{s:.0}"))
    );
    if let Some(r) = remote {
        let nodes = layout.nodes as f64;
        println!(
            "Presences held, all nodes: {} own + {r:.0} of other nodes (for their clients' topics) = {:.0}; \
             every node holding every presence (Phoenix's design) would be {:.0} ({:.1}x)",
            p.ok,
            p.ok as f64 + r,
            n * nodes,
            n * nodes / (n + r)
        );
    }

    let churn = window(held, churned);
    let ops = extras["churn_ops"].as_u64().unwrap_or(0);
    println!(
        "\n## 3. Churn ({churners} clients leaving and rejoining every 2 s for {} s)\n",
        o.churn_s
    );
    println!("| asked ops/s | achieved | seen by | count | p50 | p90 | p99 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (who, h) in [
        ("members on other nodes", &p.b),
        ("watchers on other nodes", &p.c),
    ] {
        println!(
            "| {} | {:.0} | {who} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} ms |",
            o.churn_rate,
            ops as f64 / o.churn_s.max(1) as f64,
            h.len(),
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "\nCPU during churn: nodes {:.1}% of one core in all, nats-server {:.1}%, load generator {:.1}%; \
         NATS {:.0} messages/s in, {:.0} out, {:.1} MB/s out; {} part requests, {} gaps",
        f(&churn["nodes_cpu_pct_total"]),
        f(&churn["nats_cpu_pct"]),
        f(&churn["workers_cpu_pct"]),
        f(&churn["nats_in_msgs_per_s"]),
        f(&churn["nats_out_msgs_per_s"]),
        f(&churn["nats_out_bytes_per_s"]) / 1e6,
        churn["part_requests"],
        churn["gaps"]
    );

    let kinds: Vec<u64> = (0..3)
        .map(|k| extras["changes_sum"][k].as_u64().unwrap_or(0))
        .collect();
    let changes: u64 = kinds.iter().sum();
    let incomplete = extras["incomplete_views"].as_u64().unwrap_or(0);
    println!(
        "\nwatch lists lacking a watched user (all are online) once the churn was over: {incomplete} of {}",
        p.ok
    );
    let watchers = extras["change_samples"].as_u64().unwrap_or(0);
    let dropped = killed.map_or(0, |k| per_node.get(k).copied().unwrap_or(0));
    if let Some(k) = killed {
        println!("\n## 4. Failover (node {k} killed; its clients reconnect to the others)\n");
        println!("| clients dropped | back | first back | all back | presence changes seen by the other {watchers} clients in {} s | lost | errors |", o.window_s);
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        println!(
            "| {dropped} | {} | {:.2} s | {:.2} s | {changes} | {} | {} |",
            p.d.len(),
            p.d.min() as f64 / 1e6,
            p.d.max() as f64 / 1e6,
            p.lost,
            p.errors
        );
        println!(
            "\nof which counts changed (large topics): {}, metas in topic diffs: {}, in watch-list diffs: {}",
            kinds[0], kinds[1], kinds[2]
        );
    } else {
        println!("\nconnections lost: {}", p.lost);
    }
    let pct = |h: &Histogram<u64>| json_percentiles(h);
    write_json(
        c,
        json!({
            "scenario": "million",
            "layout": layout.describe(),
            "clients": c.clients, "nodes": layout.nodes, "workers": c.procs,
            "ramp": {"joined": p.ok, "errors": p.errors, "timeouts": p.timeouts, "first_error": p.first_error,
                     "seconds": ramp_s, "connects_joins_per_s": rate, "per_node_joined": per_node,
                     "per_node_per_s": node_rates, "joined_per_s": per_s, "join_us": pct(&p.a),
                     "window": ramp_window},
            "hold": {"seconds": o.hold_s, "servers_bytes": servers, "servers_idle_bytes": servers_idle,
                     "server_bytes_per_connection": servers / n,
                     "server_bytes_per_connection_above_idle": (servers - servers_idle) / n,
                     "node_rss": held.node_rss,
                     "load_generator_bytes": held.workers_rss, "client_bytes_per_connection": held.workers_rss as f64 / n,
                     "kernel_bytes": kernel, "kernel_bytes_per_connection": kernel.map(|k| k / n),
                     "nats_bytes": held.nats_rss, "nats_idle_bytes": idle.nats_rss, "nats_subscriptions": subs,
                     "total_bytes": total, "total_bytes_per_connection": total / n,
                     "remote_presences": remote, "window": hold},
            "churn": {"churners": churners, "asked_ops_per_s": o.churn_rate, "ops": ops,
                      "achieved_ops_per_s": ops as f64 / o.churn_s.max(1) as f64,
                      "member_seen_us": pct(&p.b), "watcher_seen_us": pct(&p.c), "window": churn},
            "failover": {"killed_node": killed, "dropped": dropped, "back": p.d.len(),
                         "first_back_s": p.d.min() as f64 / 1e6, "all_back_s": p.d.max() as f64 / 1e6,
                         "back_us": pct(&p.d), "changes_seen": changes, "counts_changed": kinds[0],
                         "topic_diff_metas": kinds[1], "watch_diff_metas": kinds[2], "observers": watchers},
            "lost": p.lost,
            "incomplete_watch_views": incomplete,
        }),
    )
}
