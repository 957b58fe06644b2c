//! Scenario `join-storm`: N clients join one topic at once.

use crate::prelude::*;

pub(crate) fn join_storm(c: Common) -> Result<(), String> {
    let t = Target::parse(&c)?;
    let (n, e_count, conc) = (c.clients, c.executors, c.concurrency.max(1));
    let connected = Arc::new(Barrier::new(e_count));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let cpu = CpuWindow::new(c.server_pid);
    let local = move || {
        let cpu2 = cpu.clone();
        let parts = on_executors(e_count, move |e| {
            let (t, connected, cpu) = (t.clone(), connected.clone(), cpu2.clone());
            async move {
                let part = Rc::new(RefCell::new(Part::new()));
                let clients = connect_share(&t, e, e_count, n, conc, &part).await;
                // Everyone, in every worker process, is connected: now all join at once.
                phase(&connected);
                if e == 0 {
                    cpu.start();
                }
                let tasks: Vec<_> = clients
                    .into_iter()
                    .map(|(i, mut client)| {
                        let part = part.clone();
                        glommio::spawn_local(async move {
                            let sent = Instant::now();
                            let join =
                                json!(["1", "1", "room:storm", "phx_join", {"meta": {"i": i}}])
                                    .to_string();
                            if let Err(err) = client.send(join).await {
                                return part.borrow_mut().error(err);
                            }
                            let mut view = View::default();
                            let mut frames = 0u64;
                            let complete = read_until(&mut client, &mut view, deadline, |v, f| {
                                if f[3] == "phx_reply" && f[4]["status"] != "ok" {
                                    return true;
                                }
                                frames +=
                                    u64::from(f[3] == "presence_diff" || f[3] == "presence_state");
                                v.keys() >= n
                            })
                            .await;
                            {
                                let mut p = part.borrow_mut();
                                if complete && view.keys() >= n {
                                    p.a.record(sent.elapsed().as_micros() as u64).ok();
                                    p.b.record(frames).ok();
                                    p.ok += 1;
                                } else if complete {
                                    p.error("join refused".into());
                                } else {
                                    p.timeouts += 1;
                                }
                            }
                            client.close().await;
                        })
                    })
                    .collect();
                join_all(tasks).await;
                into_part(part)
            }
        })?;
        let cpu = cpu.finish().map(|(cpu, _)| cpu);
        Ok((Part::merge(parts), json!({ "server_cpu_s": cpu })))
    };
    let Some((p, extras)) = distributed(&c, |_| {}, local)? else {
        return Ok(());
    };
    println!(
        "join-storm: {n} clients joined one topic at once; {} saw the complete membership of {n}",
        p.ok
    );
    p.print_errors();
    println!("  join -> complete view us: {}", percentiles(&p.a));
    println!(
        "  every view complete after: {:.3} s",
        p.a.max() as f64 / 1e6
    );
    println!(
        "  presence frames (state + diffs) until complete, per client: {}",
        percentiles(&p.b)
    );
    let cpu = extras["server_cpu_s"].as_f64();
    if let Some(cpu) = cpu {
        println!("  server CPU from the first join until every view was complete: {cpu:.2} s");
    }
    write_json(
        &c,
        json!({"scenario": "join-storm", "clients": n, "complete": p.ok, "errors": p.errors, "timeouts": p.timeouts,
        "complete_view_us": json_percentiles(&p.a), "frames_per_client": json_percentiles(&p.b), "server_cpu_s": cpu}),
    )
}
