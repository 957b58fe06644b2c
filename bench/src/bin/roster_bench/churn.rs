//! Scenario `churn`: members join and leave at a steady rate under N subscribers.

use crate::prelude::*;

pub(crate) fn churn(c: Common, rate: u64, churners: usize, window_s: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = Arc::new(Mutex::new((None::<f64>, None::<f64>)));
    let (cpu2, pid) = (cpu.clone(), c.server_pid);
    let local = move || {
        let total_ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ops2 = total_ops.clone();
        let parts = on_executors(e_count, move |e| {
            let (t, ready, cpu, all_ops) = (t.clone(), ready.clone(), cpu2.clone(), ops2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                let mut subscribers = Vec::new();
                for (i, mut client) in clients {
                    let join =
                        json!(["1", "1", "room:churn", "phx_join", {"track": false}]).to_string();
                    if client.send(join).await.is_err() {
                        continue;
                    }
                    let mut view = View::default();
                    if read_until(&mut client, &mut view, deadline, |_, f| {
                        f[3] == "presence_state"
                    })
                    .await
                    {
                        subscribers.push((i, client));
                    }
                }
                let mut churn_clients = Vec::new();
                // The churners live in the first executor of the first process.
                let churning = e == 0 && split().0 == 0;
                if churning {
                    for k in 0..churners {
                        match open(&t, n + k).await {
                            Ok(c) => churn_clients.push(c),
                            Err(err) => part.borrow_mut().error(err),
                        }
                    }
                }
                if phase(&ready) && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.0 = pid.and_then(cpu_seconds);
                    }
                }
                let window_end = Instant::now() + Duration::from_secs(window_s);
                let ops = Rc::new(Cell::new(0u64));
                if churning && !churn_clients.is_empty() {
                    let sent_ops = ops.clone();
                    glommio::spawn_local(async move {
                    let gap = Duration::from_nanos(1_000_000_000 / rate.max(1));
                    let mut joined = vec![false; churn_clients.len()];
                    let mut k = 0;
                    while Instant::now() < window_end {
                        let idx = k % churn_clients.len();
                        let frame = if joined[idx] {
                            json!(["1", format!("l{k}"), "room:churn", "phx_leave", {}])
                        } else {
                            json!(["1", format!("j{k}"), "room:churn", "phx_join", {"meta": {"sent_ns": mono_ns()}, "presence": "none"}])
                        };
                        joined[idx] = !joined[idx];
                        let _ = churn_clients[idx].send(frame.to_string()).await;
                        k += 1;
                        sent_ops.set(k as u64);
                        glommio::timer::sleep(gap).await;
                    }
                    drop(churn_clients);
                })
                .detach();
                }
                let tasks: Vec<_> = subscribers
                    .into_iter()
                    .map(|(_, mut client)| {
                        let part = part.clone();
                        glommio::spawn_local(async move {
                            let mut view = View::default();
                            read_until(&mut client, &mut view, window_end, |_, f| {
                                if f[3] == "presence_diff" {
                                    for (_, p) in f[4]["joins"].as_object().into_iter().flatten() {
                                        for m in p["metas"].as_array().into_iter().flatten() {
                                            if let Some(sent) = m["sent_ns"].as_u64() {
                                                let lat = mono_ns().saturating_sub(sent) / 1000;
                                                part.borrow_mut().a.record(lat).ok();
                                            }
                                        }
                                    }
                                }
                                false
                            })
                            .await;
                            part.borrow_mut().ok += 1;
                        })
                    })
                    .collect();
                join_all(tasks).await;
                if e == 0 && !is_worker() {
                    if let Ok(mut g) = cpu.lock() {
                        g.1 = pid.and_then(cpu_seconds);
                    }
                }
                all_ops.fetch_add(ops.get(), std::sync::atomic::Ordering::Relaxed);
                into_part(part)
            }
        })?;
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
    println!("churn: {} subscribers of one topic; {churners} churners joining/leaving at {achieved:.0}/s (asked {rate}/s) for {window_s} s", p.ok);
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
        json!({"scenario": "churn", "subscribers": p.ok, "churners": churners, "rate": rate, "achieved_rate": achieved, "window_s": window_s,
        "errors": p.errors, "join_seen_us": json_percentiles(&p.a), "server_cpu_cores": cpu_share}),
    )
}
