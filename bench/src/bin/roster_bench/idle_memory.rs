//! Scenario `idle-memory`: bytes per idle connection, before and after a burst of large frames.

use crate::prelude::*;

pub(crate) fn idle_memory(c: Common, frame_bytes: usize, settle_s: u64) -> Result<(), String> {
    let pid = c.server_pid.ok_or("idle-memory needs --server-pid")?;
    let t = Target::parse(&c)?;
    let base = rss_of(pid).ok_or("cannot read the server's memory")?;
    let (n, conc) = (c.clients, c.concurrency.max(1));
    let deadline = Instant::now() + Duration::from_secs(c.duration_s);
    let parts = on_executors(1, move |_| {
        let t = t.clone();
        async move {
            let part = Rc::new(RefCell::new(Part::new()));
            let clients = Rc::new(RefCell::new(Vec::new()));
            let (p2, c2) = (part.clone(), clients.clone());
            for_share(0, 1, n, conc, move |i| {
                let (t, part, clients) = (t.clone(), p2.clone(), c2.clone());
                async move {
                    match open(&t, i).await {
                        Ok(client) => clients.borrow_mut().push(client),
                        Err(e) => part.borrow_mut().error(e),
                    }
                }
            })
            .await;
            let connected = clients.borrow().len();
            glommio::timer::sleep(Duration::from_secs(settle_s)).await;
            let idle = rss_of(pid);
            let pad = "x".repeat(frame_bytes.saturating_sub(64));
            let mut all: Vec<Client> = std::mem::take(&mut *clients.borrow_mut());
            for client in all.iter_mut() {
                let frame = json!([null, "1", "phoenix", "heartbeat", {"pad": pad}]).to_string();
                if let Err(e) = client.send(frame).await {
                    part.borrow_mut().error(e);
                }
            }
            for client in all.iter_mut() {
                while Instant::now() < deadline {
                    match client.next().await {
                        Some(f) if f[3] == "phx_reply" => break,
                        Some(_) => continue,
                        None => {
                            part.borrow_mut()
                                .error("closed after the large frame".into());
                            break;
                        }
                    }
                }
            }
            glommio::timer::sleep(Duration::from_secs(settle_s)).await;
            let after = rss_of(pid);
            let mut p = into_part(part);
            p.ok = connected;
            println!("idle-memory: {connected} of {n} clients connected; one {frame_bytes}-byte frame each");
            p.print_errors();
            let per = |rss: Option<usize>| {
                rss.map_or(-1.0, |r| {
                    r.saturating_sub(base) as f64 / connected.max(1) as f64
                })
            };
            println!(
                "  server RSS per connection: idle {:.0} bytes, idle after the burst {:.0} bytes",
                per(idle),
                per(after)
            );
            drop(all);
            p
        }
    })?;
    drop(parts);
    Ok(())
}
