//! Scenario `churn`: members join and leave at a steady rate under N subscribers.

use roster_bench::client::heartbeat;
use roster_bench::receiver::{receive_joins, Ended};

use crate::prelude::*;

pub(crate) fn churn(c: Common, rate: u64, churners: usize, window_s: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    // The churners live on an executor of their own in the first process, so that the
    // subscribers' parsing does not hold back their rate.
    let churning = split().0 == 0;
    let ready = Arc::new(Barrier::new(e_count + usize::from(churning)));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = Arc::new(Mutex::new((None::<f64>, None::<f64>)));
    let (cpu2, pid) = (cpu.clone(), c.server_pid);
    let local = move || {
        let total_ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let churner = churning
            .then(|| {
                let (t, ready, ops) = (t.clone(), ready.clone(), total_ops.clone());
                LocalExecutorBuilder::new(Placement::Unbound)
                    .name("bench-churn")
                    .io_memory(64 << 10)
                    .ring_depth(RING_DEPTH)
                    .spawn(move || async move {
                        churn_loop(&t, n, churners, rate, window_s, &ready, &ops).await
                    })
                    .map_err(|e| format!("churn executor: {e}"))
            })
            .transpose()?;
        let parts = on_executors(e_count, move |e| {
            let (t, ready, cpu) = (t.clone(), ready.clone(), cpu2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                let subscribers = join_each(clients, &part, deadline, conc, |i| {
                    let payload = watcher_payload(json!({ "i": i }));
                    json!(["1", "1", "room:churn", "phx_join", payload]).to_string()
                })
                .await;
                if phase(&ready) && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.0 = pid.and_then(cpu_seconds);
                    }
                }
                let window_end = Instant::now() + Duration::from_secs(window_s);
                // Read by the epoll receiver, as fanout's subscribers are.
                let sockets = hand_over(subscribers, &part);
                let received = glommio::executor()
                    .spawn_blocking(move || receive_joins(sockets, window_end, heartbeat()))
                    .await;
                match received {
                    Ok((seen, ended)) => {
                        let mut p = part.borrow_mut();
                        p.a.add(&seen).ok();
                        for e in ended {
                            // Held to the window's end: a socket the server closed failed.
                            p.finished(e == Ended::TimedOut);
                        }
                    }
                    Err(err) => part.borrow_mut().error(err),
                }
                if e == 0 && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.1 = pid.and_then(cpu_seconds);
                    }
                }
                into_part(part)
            }
        })?;
        let mut parts = parts;
        if let Some(churner) = churner {
            parts.push(churner.join().map_err(|e| e.to_string())?);
        }
        let ops = total_ops.load(std::sync::atomic::Ordering::Relaxed);
        Ok((Part::merge(parts), json!({"ops": ops})))
    };
    let parent_cpu = cpu.clone();
    let on_phase = move |_k: usize| {
        if let Ok(mut g) = parent_cpu.lock() {
            g.0 = pid.and_then(cpu_seconds);
        }
    };
    let Some((p, extras)) = distributed(&c, on_phase, local)? else {
        return Ok(());
    };
    if c.procs > 1 {
        if let Ok(mut g) = cpu.lock() {
            g.1 = pid.and_then(cpu_seconds);
        }
    }
    let (before, after) = *cpu.lock().map_err(|_| "lock")?;
    let cpu_share = before.zip(after).map(|(b, a)| (a - b) / window_s as f64);
    let achieved = extras["ops"].as_u64().unwrap_or(0) as f64 / window_s as f64;
    let mode = if compatible() {
        " (Phoenix-compatible: subscribers and churners all tracked, in full)"
    } else {
        ""
    };
    println!("churn{mode}: {} subscribers of one topic; {churners} churners joining/leaving at {achieved:.0}/s (asked {rate}/s) for {window_s} s", p.ok);
    p.print_errors();
    println!("  join -> seen by a subscriber us: {}", percentiles(&p.a));
    if let Some(share) = cpu_share {
        println!(
            "  server CPU during the churn: {:.1}% of one core",
            share * 100.0
        );
    }
    write_json(
        &c,
        json!({"scenario": "churn", "phoenix_compatible": compatible(), "subscribers": p.ok, "churners": churners, "rate": rate, "achieved_rate": achieved, "window_s": window_s,
        "errors": p.errors, "join_seen_us": json_percentiles(&p.a), "server_cpu_cores": cpu_share}),
    )
}

/// The churners: each in turn joins (meta stamped with its send time, presence none) or leaves
/// the topic, `rate` operations a second for `window_s` once every subscriber is ready.
async fn churn_loop(
    t: &Target,
    first: usize,
    churners: usize,
    rate: u64,
    window_s: u64,
    ready: &Barrier,
    ops: &std::sync::atomic::AtomicU64,
) -> Part {
    let mut part = Part::new();
    let mut clients = Vec::new();
    for k in 0..churners {
        match open(t, first + k).await {
            Ok(c) => clients.push(c),
            Err(err) => part.error(err),
        }
    }
    phase(ready);
    let window_end = Instant::now() + Duration::from_secs(window_s);
    let gap = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut joined = vec![false; clients.len()];
    let mut k = 0;
    let mut next = Instant::now();
    while !clients.is_empty() && Instant::now() < window_end {
        let idx = k % clients.len();
        let frame = if joined[idx] {
            json!(["1", format!("l{k}"), "room:churn", "phx_leave", {}])
        } else {
            let payload = member_payload(json!({ "sent_ns": mono_ns() }), "none");
            json!(["1", format!("j{k}"), "room:churn", "phx_join", payload])
        };
        joined[idx] = !joined[idx];
        if let Err(err) = clients[idx].send(frame.to_string()).await {
            part.error(err);
        }
        k += 1;
        ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Paced against the clock, not by sleeping a gap after each send (timers are coarse).
        next += gap;
        let wait = next.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            glommio::timer::sleep(wait).await;
        }
    }
    part
}
