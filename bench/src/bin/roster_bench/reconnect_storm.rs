//! Scenario `reconnect-storm`: a fraction of clients drop and come back (or the server restarts).

use crate::prelude::*;

/// Runs --restart-cmd on its own thread, so the clients keep running meanwhile.
pub(crate) fn run_restart(cmd: String) {
    std::thread::spawn(move || {
        match std::process::Command::new("sh").args(["-c", &cmd]).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("roster-bench: --restart-cmd: {other:?}"),
        }
    });
}

/// What the storm is: a restart (or a kill) by command, where the clients come back to, and
/// who watches from elsewhere.
pub(crate) struct Storm {
    pub(crate) restart_cmd: Option<String>,
    pub(crate) reconnect_url: Option<String>,
    pub(crate) observers: usize,
    pub(crate) observer_url: Option<String>,
}

pub(crate) fn reconnect_storm(
    c: Common,
    topics: usize,
    fraction: f64,
    window_s: u64,
    storm: Storm,
) -> Result<(), String> {
    let restart_cmd = storm.restart_cmd;
    let restarting = restart_cmd.is_some();
    let fraction = if restarting { 1.0 } else { fraction };
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    // Clients 0..n are the storm's; n.. are the observers, on their own URLs.
    let observers = storm.observers;
    let base = Target::parse(&c)?;
    let t = match &storm.observer_url {
        Some(urls) => base.others_to(n, urls)?,
        None => base.clone(),
    };
    let rt = match &storm.reconnect_url {
        Some(urls) => base.to(urls)?,
        None => base,
    };
    let total = n + observers;
    // Every k-th member of each topic reconnects, so each topic has some of both. (Client i is
    // member i / topics of topic i % topics: choosing by i itself would, with an even topic
    // count, put all reconnecting clients in the even topics, and the stayers would see none
    // of the storm.)
    let every = (1.0 / fraction.clamp(0.01, 1.0)).round().max(1.0) as usize;
    let reconnects = move |i: usize| i < n && (i / topics.max(1)).is_multiple_of(every);
    let ready = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let parent_restart = restart_cmd.clone();
    let local = move || {
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watched = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (seen2, watched2) = (seen.clone(), watched.clone());
        let parts = on_executors(e_count, move |e| {
            let (t, rt, ready, restart_cmd) =
                (t.clone(), rt.clone(), ready.clone(), restart_cmd.clone());
            let (seen, watched) = (seen2.clone(), watched2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, total, conc, &part).await;
                let members = join_each(clients, &part, deadline, conc, move |i| {
                    json!(["1", "1", format!("room:{}", i % topics), "phx_join", {"meta": {"i": i}}]).to_string()
                })
                .await;
                // Everyone has joined. Each client reads (and drops) the joins' own diffs until a
                // second passes without any, so that what the stayers count is the storm's doing
                // only (at 19k, the load generator takes seconds to get through them).
                phase(&ready);
                let draining: Vec<_> = members
                    .into_iter()
                    .map(|(i, mut client)| {
                        glommio::spawn_local(async move {
                            while Instant::now() < deadline {
                                let next = glommio::timer::timeout(Duration::from_secs(1), async {
                                    Ok(client.next().await)
                                })
                                .await;
                                if !matches!(next, Ok(Some(_))) {
                                    break;
                                }
                            }
                            (i, client)
                        })
                    })
                    .collect();
                let mut members = Vec::with_capacity(draining.len());
                for d in draining {
                    members.push(d.await);
                }
                // With --procs the parent restarts the server, once, as this phase opens.
                if phase(&ready) && !is_worker() {
                    if let Some(cmd) = restart_cmd.clone() {
                        run_restart(cmd);
                    }
                }
                let storm = Instant::now();
                let window_end = storm + Duration::from_secs(window_s);
                let tasks: Vec<_> = members
                .into_iter()
                .map(|(i, mut client)| {
                    let (t, part, seen, watched) = (rt.clone(), part.clone(), seen.clone(), watched.clone());
                    glommio::spawn_local(async move {
                        if reconnects(i) {
                            if restarting {
                                // Wait for the restart to end this connection.
                                while Instant::now() < deadline && client.next().await.is_some() {}
                            }
                            drop(client); // abrupt: no close handshake, as when a network drops
                            let attempt = || async {
                                let mut c = open(&t, i).await?;
                                let join = json!(["1", "1", format!("room:{}", i % topics), "phx_join", {"meta": {"i": i}}]).to_string();
                                c.send(join).await?;
                                let mut view = View::default();
                                if read_until(&mut c, &mut view, deadline, |_, f| f[3] == "presence_state").await {
                                    Ok(c)
                                } else {
                                    Err("no presence_state after reconnecting".to_string())
                                }
                            };
                            let again = async {
                                // Across a restart, connecting fails while the server is down, and a
                                // connection can land on the old server's closing listener: retry,
                                // as phoenix.js does.
                                loop {
                                    match attempt().await {
                                        Ok(c) => return Ok(c),
                                        Err(e) if !restarting || Instant::now() > deadline => return Err(e),
                                        Err(_) => glommio::timer::sleep(Duration::from_millis(50)).await,
                                    }
                                }
                            };
                            match again.await {
                                Ok(mut c) => {
                                    {
                                        let mut p = part.borrow_mut();
                                        p.a.record(storm.elapsed().as_micros() as u64).ok();
                                        p.ok += 1;
                                    }
                                    // Stay until the window ends (leaving now would be counted as
                                    // a storm change by the others), counting the changes seen
                                    // after its own rejoin: across a restart everyone reconnects,
                                    // and these are what the storm shows its members.
                                    let changes = count_changes(&mut c, window_end).await;
                                    if restarting {
                                        seen.fetch_add(changes, std::sync::atomic::Ordering::Relaxed);
                                        part.borrow_mut().b.record(changes).ok();
                                    }
                                    drop(c);
                                }
                                Err(err) => part.borrow_mut().error(err),
                            }
                        } else {
                            let changes = count_changes(&mut client, window_end).await;
                            seen.fetch_add(changes, std::sync::atomic::Ordering::Relaxed);
                            if i >= n {
                                watched.fetch_add(changes, std::sync::atomic::Ordering::Relaxed);
                            }
                            part.borrow_mut().b.record(changes).ok();
                        }
                    })
                })
                .collect();
                join_all(tasks).await;
                into_part(part)
            }
        })?;
        let total = seen.load(std::sync::atomic::Ordering::Relaxed);
        let watched = watched.load(std::sync::atomic::Ordering::Relaxed);
        Ok((
            Part::merge(parts),
            json!({"seen": total, "watched": watched}),
        ))
    };
    let on_phase = |k: usize| {
        if k == 1 {
            if let Some(cmd) = parent_restart.clone() {
                run_restart(cmd);
            }
        }
    };
    let Some((p, extras)) = distributed(&c, on_phase, local)? else {
        return Ok(());
    };
    let total = extras["seen"].as_u64().unwrap_or(0);
    let watched = extras["watched"].as_u64().unwrap_or(0);
    let reconnecting = (0..n).filter(|&i| reconnects(i)).count();
    let how = if restarting {
        "lost their connection to a server restart"
    } else {
        "dropped at once"
    };
    println!("reconnect-storm: {n} clients in {topics} topics; {reconnecting} {how}, {} back and rejoined", p.ok);
    p.print_errors();
    println!("  drop -> rejoined us: {}", percentiles(&p.a));
    println!("  all back after: {:.3} s", p.a.max() as f64 / 1e6);
    // Across a restart the first one back is about when the new process accepts.
    let (first, last) = (p.a.min() as f64 / 1e6, p.a.max() as f64 / 1e6);
    let spread = last - first;
    let rate = if spread > 0.0 {
        p.ok as f64 / spread
    } else {
        0.0
    };
    println!(
        "  first back after: {first:.3} s; all back {spread:.3} s after it ({rate:.0} rejoins/s)"
    );
    if observers > 0 {
        println!("  presence changes seen by the {observers} observers: {watched}");
    }
    let who = if restarting {
        "by every client once back"
    } else {
        "by the clients that stayed"
    };
    println!(
        "  presence changes seen {who} ({}), in {window_s} s: {total} in all; per client {}",
        p.b.len(),
        percentiles(&p.b)
    );
    write_json(
        &c,
        json!({"scenario": "reconnect-storm", "clients": n, "topics": topics, "reconnected": p.ok, "dropped": reconnecting,
        "errors": p.errors, "rejoin_us": json_percentiles(&p.a), "first_back_s": first, "all_back_after_first_s": spread,
        "changes_seen_total": total, "changes_seen_per_stayer": json_percentiles(&p.b), "observers": observers, "changes_seen_by_observers": watched}),
    )
}

/// Presence changes (metas joining or leaving) in the diffs `client` gets until `until`.
async fn count_changes(client: &mut Client, until: Instant) -> u64 {
    let mut view = View::default();
    let mut changes = 0u64;
    read_until(client, &mut view, until, |_, f| {
        if f[3] == "presence_diff" {
            for side in ["joins", "leaves"] {
                for (_, p) in f[4][side].as_object().into_iter().flatten() {
                    changes += p["metas"].as_array().map_or(0, |m| m.len() as u64);
                }
            }
        }
        false
    })
    .await;
    changes
}
