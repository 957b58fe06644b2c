//! Scenario `connect`: connects and joins per second, and memory per connection.

use crate::prelude::*;

pub(crate) fn connect(c: Common, topics: usize, mode: String, settle_s: u64) -> Result<(), String> {
    if !["full", "count", "none"].contains(&mode.as_str()) {
        return Err(format!(
            "--presence must be full, count or none, not {mode}"
        ));
    }
    if compatible() && mode != "full" {
        return Err("--phoenix-compatible joins in full presence only".into());
    }
    let worker = match &c.worker {
        Some(w) => {
            let (a, b) = w.split_once('/').ok_or("--worker W/N")?;
            Some((
                a.parse::<usize>().map_err(|e| e.to_string())?,
                b.parse::<usize>().map_err(|e| e.to_string())?,
            ))
        }
        None if c.procs > 1 => return connect_parent(&c, topics, &mode, settle_s),
        None => None,
    };
    let (w, nw) = worker.unwrap_or((0, 1));
    let t = Target::parse(&c)?;
    let before = c.server_pid.and_then(rss_of);
    let kernel_before = kernel_bytes();
    let self_before = rss_of(std::process::id()).unwrap_or(0);
    let release = Arc::new(Barrier::new(c.executors + 1));
    // Set once the connections have been held long enough (and measured): the executors keep
    // reading meanwhile, so that their clients send heartbeats and closes are counted.
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (lost_tx, lost_rx) = std::sync::mpsc::channel::<usize>();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(c.duration_s);
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let mode_name = mode.clone();
    let (tx, rx) = std::sync::mpsc::channel::<Part>();
    let (r2, released2) = (release.clone(), released.clone());
    let waiter = std::thread::spawn(move || -> Result<_, String> {
        let parts: Vec<Part> = rx.iter().take(e_count).collect();
        let took = started.elapsed();
        let mut part = Part::merge(parts);
        part.client_bytes = rss_of(std::process::id())
            .unwrap_or(0)
            .saturating_sub(self_before);
        let measured = if worker.is_some() {
            // Tell the parent, then hold the connections until it has measured.
            println!("READY {}", part.to_json());
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            (None, None)
        } else {
            std::thread::sleep(Duration::from_secs(settle_s));
            (c.server_pid.and_then(rss_of), kernel_bytes())
        };
        released2.store(true, std::sync::atomic::Ordering::Relaxed);
        part.lost = lost_rx.iter().take(e_count).sum();
        if worker.is_some() {
            println!("HELD {}", part.lost);
        }
        r2.wait();
        Ok((took, part, measured))
    });
    let parts = on_executors(e_count, move |e| {
        let (t, mode, release, tx) = (t.clone(), mode.clone(), release.clone(), tx.clone());
        let (released, lost_tx) = (released.clone(), lost_tx.clone());
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = Rc::new(RefCell::new(Vec::new()));
            let work = {
                let (part, clients) = (part.clone(), clients.clone());
                move |i: usize| {
                    let (t, mode, part, clients) =
                        (t.clone(), mode.clone(), part.clone(), clients.clone());
                    async move {
                        if Instant::now() > deadline {
                            part.borrow_mut().timeouts += 1;
                            return;
                        }
                        let t0 = Instant::now();
                        let mut client = match open(&t, i).await {
                            Ok(c) => c,
                            Err(err) => return part.borrow_mut().error(err),
                        };
                        let t1 = Instant::now();
                        let topic = format!("room:{}", i % topics);
                        let frame = json!([
                            "1",
                            "1",
                            topic,
                            "phx_join",
                            member_payload(json!({"i": i}), &mode)
                        ])
                        .to_string();
                        if let Err(err) = client.send(frame).await {
                            return part.borrow_mut().error(err);
                        }
                        let want = match mode.as_str() {
                            "full" => "presence_state",
                            "count" => "presence_count",
                            _ => "phx_reply",
                        };
                        loop {
                            let Some(f) = client.next().await else {
                                return part.borrow_mut().error("closed while joining".into());
                            };
                            if f[3] == "phx_reply" && f[4]["status"] != "ok" {
                                return part.borrow_mut().error(format!("join refused: {f}"));
                            }
                            if f[3] == want {
                                break;
                            }
                        }
                        let mut p = part.borrow_mut();
                        p.a.record(t1.duration_since(t0).as_micros() as u64).ok();
                        p.b.record(t1.elapsed().as_micros() as u64).ok();
                        p.ok += 1;
                        clients.borrow_mut().push(client);
                    }
                }
            };
            for_share(w + nw * e, nw * e_count, n, conc, work).await;
            // Everyone holds their connections, reading and sending heartbeats, while the
            // server's memory is read.
            let _ = tx.send(std::mem::replace(&mut *part.borrow_mut(), Part::new()));
            let held: Vec<_> = std::mem::take(&mut *clients.borrow_mut())
                .into_iter()
                .map(|mut client: Client| {
                    let released = released.clone();
                    glommio::spawn_local(async move {
                        while !released.load(std::sync::atomic::Ordering::Relaxed) {
                            let tick = Instant::now() + Duration::from_millis(200);
                            if !client.hold(tick).await {
                                return (client, 1);
                            }
                        }
                        (client, 0)
                    })
                })
                .collect();
            let mut kept = Vec::new();
            let mut lost = 0;
            for task in held {
                let (client, l) = task.await;
                kept.push(client);
                lost += l;
            }
            let _ = lost_tx.send(lost);
            release.wait();
            drop(kept);
            into_part(part)
        }
    })?;
    drop(parts);
    let (took, p, (after, kernel_after)) = waiter.join().map_err(|_| "waiter thread failed")??;
    if worker.is_some() {
        return Ok(());
    }
    report_connect(
        &c,
        topics,
        &mode_name,
        took,
        p,
        (before, after),
        kernel_before.zip(kernel_after),
    )
}

/// Runs `connect` as `procs` worker processes of this program, each holding its share of the
/// clients, and merges what they measured.
pub(crate) fn connect_parent(
    c: &Common,
    topics: usize,
    mode: &str,
    settle_s: u64,
) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write as _};
    let before = c.server_pid.and_then(rss_of);
    let kernel_before = kernel_bytes();
    let started = Instant::now();
    let mut children = spawn_workers(c)?;
    let mut parts = Vec::new();
    let mut outputs = Vec::new();
    for (w, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take().ok_or("worker stdout")?;
        let mut lines = BufReader::new(out).lines();
        let line = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("READY ").map(str::to_owned))
            .ok_or(format!("worker {w} ended without a result"))?;
        parts.push(Part::from_json(&line)?);
        outputs.push(lines);
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(settle_s));
    let after = c.server_pid.and_then(rss_of);
    let kernel_after = kernel_bytes();
    for child in &mut children {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = writeln!(stdin, "release");
        }
    }
    let mut all = Part::merge(parts);
    for lines in outputs {
        let held = lines
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("HELD ")?.parse::<usize>().ok());
        all.lost += held.unwrap_or(0);
    }
    for child in &mut children {
        let _ = child.wait();
    }
    report_connect(
        c,
        topics,
        mode,
        took,
        all,
        (before, after),
        kernel_before.zip(kernel_after),
    )
}

/// Prints and writes the results of a connect run (local or merged from workers).
pub(crate) fn report_connect(
    c: &Common,
    topics: usize,
    mode_name: &str,
    took: Duration,
    p: Part,
    rss: (Option<usize>, Option<usize>),
    kernel: Option<((usize, usize), (usize, usize))>,
) -> Result<(), String> {
    let n = c.clients;
    let (before, after) = rss;
    let kernel_pair = kernel;
    let rate = p.ok as f64 / took.as_secs_f64();
    println!(
        "connect: {} of {} clients joined one of {topics} topics (presence {mode_name}) in {:.2} s",
        p.ok,
        n,
        took.as_secs_f64()
    );
    println!("  connects+joins per second: {rate:.0}");
    p.print_errors();
    println!(
        "  connections lost while held ({}): {}",
        heartbeat_text(),
        p.lost
    );
    println!("  handshake us: {}", percentiles(&p.a));
    println!("  join complete us: {}", percentiles(&p.b));
    let client_per_conn = p.client_bytes as f64 / p.ok.max(1) as f64;
    println!("  load generator RSS per client connection: {client_per_conn:.0} bytes");
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => {
            let v = a.saturating_sub(b) as f64 / p.ok.max(1) as f64;
            println!(
                "  server RSS {:.1} MiB -> {:.1} MiB: {v:.0} bytes per connection (user space)",
                b as f64 / 1048576.0,
                a as f64 / 1048576.0
            );
            Some(v)
        }
        _ => None,
    };
    let kernel = kernel_pair.map(|((s0, t0), (s1, t1))| {
        let per = |b: usize, a: usize| a.saturating_sub(b) as f64 / p.ok.max(1) as f64;
        let (slab, tcp) = (per(s0, s1), per(t0, t1));
        println!("  kernel, both loopback ends: slab {slab:.0} + TCP buffers {tcp:.0} bytes per connection (system-wide, so noisy)");
        json!({"slab_bytes_per_connection": slab, "tcp_buffer_bytes_per_connection": tcp})
    });
    write_json(
        c,
        json!({"scenario": "connect", "presence": mode_name, "clients": n, "joined": p.ok, "topics": topics, "seconds": took.as_secs_f64(),
        "connects_joins_per_s": rate, "errors": p.errors, "timeouts": p.timeouts, "lost_while_held": p.lost, "handshake_us": json_percentiles(&p.a),
        "join_us": json_percentiles(&p.b), "server_bytes_per_connection": per_conn, "client_bytes_per_connection": client_per_conn, "kernel": kernel}),
    )
}
