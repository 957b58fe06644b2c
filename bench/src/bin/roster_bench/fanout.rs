//! Scenario `fanout`: one member updates, everyone else sees it (diffs or counts).

use roster_bench::client::heartbeat;
use roster_bench::receiver::{receive_rounds, Ended};

use crate::prelude::*;

pub(crate) fn fanout(c: Common, rounds: usize, interval_ms: u64) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    if n < 2 {
        return Err("fanout needs at least 2 clients".into());
    }
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = CpuWindow::new(c.server_pid);
    let local = move || {
        let round_max = Arc::new(Mutex::new(vec![0u64; rounds]));
        let (rm, cpu2) = (round_max.clone(), cpu.clone());
        let parts = on_executors(e_count, move |e| {
            let (t, ready, round_max, cpu) = (t.clone(), ready.clone(), rm.clone(), cpu2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                // Everyone joins and waits for the complete membership before the rounds start.
                // Only the updater is tracked: the others subscribe without being tracked, so
                // setting up M members is not itself a join storm of M (see join-storm).
                let ready_members = join_each(clients, &part, deadline, conc, move |i| {
                    let payload = if i == 0 {
                        json!({"meta": {"round": -1}})
                    } else {
                        watcher_payload(json!({ "i": i }))
                    };
                    json!(["1", "1", "room:fanout", "phx_join", payload]).to_string()
                })
                .await;
                phase(&ready);
                // The updater stays a client task; the subscribers' sockets go to the epoll
                // receiver, which `floor` reads with too (see roster_bench::receiver).
                let (updater, subscribers): (Vec<_>, Vec<_>) =
                    ready_members.into_iter().partition(|(i, _)| *i == 0);
                let updater = updater.into_iter().next().map(|(_, c)| c);
                let sockets = hand_over(subscribers, &part);
                let receiving = glommio::executor()
                    .spawn_blocking(move || receive_rounds(sockets, rounds, deadline, heartbeat()));
                // Handing over cancels each client's pending read in this executor's rings:
                // let that work end before anything is timed (it took the first rounds' CPU).
                glommio::timer::sleep(Duration::from_millis(500)).await;
                phase(&ready);
                if e == 0 {
                    cpu.start();
                }
                let updating = updater.map(|mut client| {
                    glommio::spawn_local(async move {
                        let mut view = View::default();
                        // One meta change per interval, stamped with its send time.
                        for r in 0..rounds {
                            let meta = json!({"round": r, "sent_ns": mono_ns()});
                            let frames = if compatible() {
                                // A Phoenix app changes a meta by untracking and tracking.
                                let leave = json!(["1", format!("l{r}"), "room:fanout", "phx_leave", {}]);
                                let join = json!([format!("j{r}"), format!("j{r}"), "room:fanout", "phx_join", {"meta": meta}]);
                                vec![leave, join]
                            } else {
                                vec![json!(["1", format!("u{r}"), "room:fanout", "presence_update", {"meta": meta}])]
                            };
                            let mut sent = true;
                            for f in frames {
                                sent &= client.send(f.to_string()).await.is_ok();
                            }
                            if !sent {
                                break;
                            }
                            glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                        }
                        // It reads its own diffs too, like every member.
                        let _ = read_until(&mut client, &mut view, Instant::now() + Duration::from_millis(200), |_, _| false).await;
                    })
                });
                let received = receiving.await;
                if let Some(u) = updating {
                    u.await;
                }
                match received {
                    Ok(d) => {
                        let mut p = part.borrow_mut();
                        p.a.add(&d.one).ok();
                        for ended in d.ended {
                            p.finished(ended == Ended::Done);
                        }
                        if let Ok(mut rm) = round_max.lock() {
                            for (slot, m) in rm.iter_mut().zip(d.round_max) {
                                *slot = (*slot).max(m);
                            }
                        }
                    }
                    Err(err) => part.borrow_mut().error(err),
                }
                into_part(part)
            }
        })?;
        let maxima = round_max.lock().map_err(|_| "lock")?.clone();
        Ok((
            Part::merge(parts),
            json!({"round_max": maxima, "server_cpu": cpu.finish()}),
        ))
    };
    let Some((p, extras)) = distributed(&c, |_| {}, local)? else {
        return Ok(());
    };
    let mut all_saw = hist();
    for m in extras["round_max"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .filter(|&m| m > 0)
    {
        all_saw.record(m).ok();
    }
    if compatible() {
        println!("fanout (Phoenix-compatible): {n} tracked members, one leaving and rejoining with a new meta {rounds} times {interval_ms} ms apart; {} clients saw every change", p.ok);
    } else {
        println!("fanout: 1 tracked member + {} subscribers, {rounds} updates {interval_ms} ms apart; {} clients saw every update", n - 1, p.ok);
    }
    p.print_errors();
    println!("  update -> seen by one member us: {}", percentiles(&p.a));
    println!(
        "  update -> seen by all members us: {}",
        percentiles(&all_saw)
    );
    let cpu = print_cpu(
        &extras["server_cpu"],
        "the first update until all saw the last",
    );
    write_json(
        &c,
        json!({"scenario": "fanout", "phoenix_compatible": compatible(), "members": n, "rounds": rounds, "errors": p.errors, "timeouts": p.timeouts,
        "delivery_us": json_percentiles(&p.a), "all_members_us": json_percentiles(&all_saw), "round_max_us": extras["round_max"], "server_cpu_pct": cpu}),
    )
}

/// Fanout in count mode: the member leaves (count 0) and rejoins (count 1) in turns; each
/// subscriber times every count change it sees from the latest round that produced that count.
pub(crate) fn fanout_count(c: Common, rounds: usize, interval_ms: u64) -> Result<(), String> {
    if compatible() {
        return Err("--presence count is a roster extension: not with --phoenix-compatible".into());
    }
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    if n < 2 {
        return Err("fanout needs at least 2 clients".into());
    }
    if c.procs > 1 {
        return Err("fanout --presence count runs in one process (--procs 1)".into());
    }
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    // Round r leaves the member's count at r % 2 (0 after a leave, 1 after a rejoin); its send
    // time, once sent.
    let sent = Arc::new(Mutex::new(vec![0u64; rounds]));
    let final_keys = ((rounds - 1) % 2) as u64;
    let count_of = |r: usize| (r % 2) as u64;
    let cpu = CpuWindow::new(c.server_pid);
    let cpu2 = cpu.clone();
    // Subscribers done (or given up): the member leaves only after all of them.
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let parts = on_executors(e_count, move |e| {
        let (t, ready, sent, cpu) = (t.clone(), ready.clone(), sent.clone(), cpu2.clone());
        let finished = finished.clone();
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = connect_share(&t, e, e_count, n, conc, &part).await;
            let ready_members = join_each(clients, &part, deadline, conc, move |i| {
                let payload = if i == 0 {
                    json!({"meta": {}, "presence": "count"})
                } else {
                    json!({"track": false, "presence": "count"})
                };
                json!(["1", "1", "room:fanout", "phx_join", payload]).to_string()
            })
            .await;
            phase(&ready);
            if e == 0 {
                cpu.start();
            }
            let tasks: Vec<_> = ready_members
                .into_iter()
                .map(|(i, mut client)| {
                    let (part, sent, finished) = (part.clone(), sent.clone(), finished.clone());
                    glommio::spawn_local(async move {
                        if i == 0 {
                            for r in 0..rounds {
                                let (jr, event, payload) = if r % 2 == 0 {
                                    ("1", "phx_leave", json!({}))
                                } else {
                                    ("1", "phx_join", json!({"meta": {}, "presence": "count"}))
                                };
                                if let Ok(mut s) = sent.lock() {
                                    s[r] = mono_ns();
                                }
                                let f = json!([jr, format!("u{r}"), "room:fanout", event, payload]);
                                if client.send(f.to_string()).await.is_err() {
                                    break;
                                }
                                glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
                            }
                            // Stay until every subscriber is done: leaving would change the
                            // count they wait for.
                            while finished.load(std::sync::atomic::Ordering::Relaxed) < n - 1
                                && Instant::now() < deadline
                            {
                                glommio::timer::sleep(Duration::from_millis(50)).await;
                            }
                            drop(client);
                            return;
                        }
                        let mut view = View::default();
                        let mut last = 1u64;
                        let done = read_until(&mut client, &mut view, deadline, |_, f| {
                            if f[3] != "presence_count" {
                                return false;
                            }
                            let keys = f[4]["keys"].as_u64().unwrap_or(u64::MAX);
                            let now = mono_ns();
                            let times = sent.lock().map(|s| s.clone()).unwrap_or_default();
                            if keys != last {
                                last = keys;
                                let from = (0..rounds).rev().find(|&r| {
                                    times[r] != 0 && times[r] <= now && count_of(r) == keys
                                });
                                if let Some(r) = from {
                                    part.borrow_mut()
                                        .a
                                        .record(now.saturating_sub(times[r]) / 1000)
                                        .ok();
                                }
                            }
                            // Done once a count pushed after the last change shows it (a change
                            // that undoes one not yet pushed may push an unchanged count).
                            let last_sent = times[rounds - 1];
                            last_sent != 0 && last_sent <= now && keys == final_keys
                        })
                        .await;
                        finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        part.borrow_mut().finished(done);
                    })
                })
                .collect();
            join_all(tasks).await;
            into_part(part)
        }
    })?;
    let p = Part::merge(parts);
    println!("fanout (count): 1 member leaving and rejoining + {} count subscribers, {rounds} changes {interval_ms} ms apart; {} saw the last count", n - 1, p.ok);
    p.print_errors();
    println!(
        "  change -> count seen by one member us: {}",
        percentiles(&p.a)
    );
    let cpu = print_cpu(
        &json!(cpu.finish()),
        "the first change until all saw the last count",
    );
    write_json(
        &c,
        json!({"scenario": "fanout-count", "members": n, "rounds": rounds, "errors": p.errors, "timeouts": p.timeouts,
        "delivery_us": json_percentiles(&p.a), "server_cpu_pct": cpu}),
    )
}
