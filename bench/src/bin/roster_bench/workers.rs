//! Running clients: executors, worker processes and their phase protocol, and the per-client
//! steps every scenario shares (connect, join, read until a view holds).

use crate::prelude::*;

/// Worker W of N when this process was started by a parent with --procs (else 0 of 1).
pub(crate) static SPLIT: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

pub(crate) fn split() -> (usize, usize) {
    *SPLIT.get().unwrap_or(&(0, 1))
}

pub(crate) fn is_worker() -> bool {
    split().1 > 1
}

/// `--phoenix-compatible`: the clients use only what an app written from the Phoenix guides
/// does (every joiner tracked, an update as a leave and a rejoin), none of roster's extensions.
pub(crate) static PHOENIX_COMPATIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

pub(crate) fn compatible() -> bool {
    *PHOENIX_COMPATIBLE.get().unwrap_or(&false)
}

/// The join payload of a client that only needs to see the topic: roster's `track: false`, or,
/// Phoenix-compatible, a member tracked with `meta` like any other.
pub(crate) fn watcher_payload(meta: Value) -> Value {
    if compatible() {
        json!({ "meta": meta })
    } else {
        json!({ "track": false })
    }
}

/// The join payload of a tracked member in roster's presence mode `mode` (full, count, none);
/// Phoenix-compatible, always full (no mode sent).
pub(crate) fn member_payload(meta: Value, mode: &str) -> Value {
    if compatible() {
        json!({ "meta": meta })
    } else {
        json!({ "meta": meta, "presence": mode })
    }
}

/// A phase boundary: every executor of this process, and with --procs every worker process,
/// gets here before any goes on. Returns true in one executor of this process.
pub(crate) fn phase(b: &Barrier) -> bool {
    let leader = b.wait().is_leader();
    if leader && is_worker() {
        use std::io::Write as _;
        println!("BARRIER");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    b.wait();
    leader
}

pub(crate) use roster_bench::stamps::mono_ns;

/// Merges scenario extras from workers: numbers add up; arrays of numbers take the larger
/// element (per-round maxima), except under keys ending in `_sum`, which add up element by
/// element (counts per second or per node).
pub(crate) fn merge_extras(into: &mut Value, from: &Value) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) else {
        return;
    };
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Array(a)), Value::Array(b)) => {
                let sum = k.ends_with("_sum");
                for (i, x) in b.iter().enumerate() {
                    let x = x.as_u64().unwrap_or(0);
                    match a.get_mut(i) {
                        Some(y) if sum => *y = json!(y.as_u64().unwrap_or(0) + x),
                        Some(y) => *y = json!(y.as_u64().unwrap_or(0).max(x)),
                        None => a.push(json!(x)),
                    }
                }
            }
            (Some(Value::Number(a)), Value::Number(b)) => {
                *into.get_mut(k).expect("present") =
                    json!(a.as_u64().unwrap_or(0) + b.as_u64().unwrap_or(0));
            }
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// Starts `--procs` copies of this program with this run's arguments, as workers W/N, with
/// stdin and stdout piped for the phase protocol.
pub(crate) fn spawn_workers(c: &Common) -> Result<Vec<std::process::Child>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    (0..c.procs)
        .map(|w| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--worker", &format!("{w}/{}", c.procs)])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("worker {w}: {e}"))
        })
        .collect()
}

/// Runs a scenario's clients here (`local`), or as --procs worker processes of this program:
/// the parent relays phase boundaries (calling `on_phase(k)` as boundary k opens) and merges
/// what the workers measured. In a worker, prints the result for the parent and returns None.
pub(crate) fn distributed(
    c: &Common,
    mut on_phase: impl FnMut(usize),
    local: impl FnOnce() -> Result<(Part, Value), String>,
) -> Result<Option<(Part, Value)>, String> {
    use std::io::{BufRead, BufReader, Write as _};
    if c.procs <= 1 || is_worker() {
        let (part, extras) = local()?;
        if is_worker() {
            println!("RESULT {}\t{}", part.to_json(), extras);
            return Ok(None);
        }
        return Ok(Some((part, extras)));
    }
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut stdins = Vec::new();
    let mut children = spawn_workers(c)?;
    for (w, child) in children.iter_mut().enumerate() {
        stdins.push(child.stdin.take().ok_or("worker stdin")?);
        let out = child.stdout.take().ok_or("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((w, line));
            }
            let _ = tx.send((w, "EXIT".into()));
        });
    }
    drop(tx);
    let (mut waiting, mut phase_k, mut done) = (0, 0, 0);
    let mut parts = Vec::new();
    let mut extras = json!({});
    let mut reported = std::collections::HashSet::new();
    for (w, line) in rx {
        if line == "BARRIER" {
            waiting += 1;
            if waiting == c.procs {
                on_phase(phase_k);
                phase_k += 1;
                waiting = 0;
                for stdin in &mut stdins {
                    let _ = writeln!(stdin, "go");
                }
            }
        } else if let Some(result) = line.strip_prefix("RESULT ") {
            let (part, extra) = result.split_once('\t').ok_or("bad worker result")?;
            parts.push(Part::from_json(part)?);
            reported.insert(w);
            merge_extras(
                &mut extras,
                &serde_json::from_str(extra).map_err(|e| e.to_string())?,
            );
        } else if line == "EXIT" {
            if !reported.contains(&w) {
                // The others may be waiting at a phase this worker will never reach.
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(format!("worker {w} ended without a result"));
            }
            done += 1;
            if done == c.procs {
                break;
            }
        } else {
            eprintln!("worker {w}: {line}");
        }
    }
    for child in &mut children {
        let _ = child.wait();
    }
    if parts.len() != c.procs {
        return Err(format!("{} of {} workers reported", parts.len(), c.procs));
    }
    Ok(Some((Part::merge(parts), extras)))
}

/// Entries of each io_uring ring of a client executor. As in the server (see its RING_DEPTH):
/// glommio cancels on these rings all the time, and a cancel walks one bucket of the armed
/// polls (one per client), which the kernel sizes by the ring: 128 entries left thousands of
/// polls per bucket.
pub(crate) const RING_DEPTH: usize = 4096;

/// Runs `work(executor index)` on `n` glommio executors and collects what each returns.
pub(crate) fn on_executors<F, Fut>(n: usize, work: F) -> Result<Vec<Part>, String>
where
    F: Fn(usize) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = Part> + 'static,
{
    let handles: Vec<_> = (0..n)
        .map(|e| {
            let work = work.clone();
            LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("bench-{e}"))
                .io_memory(64 << 10)
                .ring_depth(RING_DEPTH)
                .spawn(move || async move { work(e).await })
                .map_err(|err| format!("executor {e}: {err}"))
        })
        .collect::<Result<_, _>>()?;
    handles
        .into_iter()
        .map(|h| h.join().map_err(|e| e.to_string()))
        .collect()
}

pub(crate) async fn join_all<T>(tasks: Vec<glommio::Task<T>>) {
    for task in tasks {
        task.await;
    }
}

/// Runs `work(i)` for this executor's share of client indices (`i % executors == e`), at most
/// `conc` at a time: `conc` worker tasks pull indices from a shared counter, rather than a task
/// per client queued on a semaphore (whose waiter list made large runs quadratic).
pub(crate) async fn for_share<F, Fut>(start: usize, step: usize, n: usize, conc: usize, work: F)
where
    F: Fn(usize) -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let next = Rc::new(Cell::new(start));
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            glommio::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= n {
                        break;
                    }
                    next.set(i + step);
                    work(i).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
}

/// Connects this executor's share of clients (`i % executors == e`), at most `conc` at a time.
pub(crate) async fn connect_share(
    t: &Target,
    e: usize,
    executors: usize,
    n: usize,
    conc: usize,
    part: &Rc<RefCell<Part>>,
) -> Vec<(usize, Client)> {
    let clients = Rc::new(RefCell::new(Vec::new()));
    let work = {
        let (clients, part) = (clients.clone(), part.clone());
        let t = t.clone();
        move |i: usize| {
            let (t, clients, part) = (t.clone(), clients.clone(), part.clone());
            async move {
                match open(&t, i).await {
                    Ok(c) => clients.borrow_mut().push((i, c)),
                    Err(err) => part.borrow_mut().error(err),
                }
            }
        }
    };
    let (w, nw) = split();
    for_share(w + nw * e, nw * executors, n, conc, work).await;
    Rc::try_unwrap(clients)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

/// Connects client `i` and, if `join` is given, joins and waits for the join to complete.
pub(crate) async fn open(t: &Target, i: usize) -> Result<Client, String> {
    Box::pin(Client::connect(
        t.addr(i),
        t.source(i),
        &t.path,
        &format!("vsn=2.0.0&user_id=u{i}"),
    ))
    .await
}

/// Each client sends its join (`frame(i)`) and waits for its presence_state (or, for joins in
/// count mode, its presence_count), at most `conc` joins in flight (setup is paced as connects
/// are: a server must not be handed a join storm before the scenario starts); returns those
/// that got one, counting the others as errors or timeouts.
pub(crate) async fn join_each(
    clients: Vec<(usize, Client)>,
    part: &Rc<RefCell<Part>>,
    deadline: Instant,
    conc: usize,
    frame: impl Fn(usize) -> String + 'static,
) -> Vec<(usize, Client)> {
    let queue = Rc::new(RefCell::new(clients));
    let joined = Rc::new(RefCell::new(Vec::new()));
    let frame = Rc::new(frame);
    let workers: Vec<_> = (0..conc.max(1))
        .map(|_| {
            let (queue, joined, part, frame) =
                (queue.clone(), joined.clone(), part.clone(), frame.clone());
            glommio::spawn_local(async move {
                loop {
                    let next = queue.borrow_mut().pop();
                    let Some((i, mut client)) = next else { break };
                    if let Err(err) = client.send(frame(i)).await {
                        part.borrow_mut().error(err);
                        continue;
                    }
                    let mut view = View::default();
                    if read_until(&mut client, &mut view, deadline, |_, f| {
                        f[3] == "presence_state" || f[3] == "presence_count"
                    })
                    .await
                    {
                        joined.borrow_mut().push((i, client));
                    } else {
                        part.borrow_mut().timeouts += 1;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
    let mut joined = std::mem::take(&mut *joined.borrow_mut());
    joined.sort_by_key(|(i, _)| *i);
    joined
}

/// Reads frames until `done(view)` holds for the topic's presence view, or the deadline passes.
/// Returns false on timeout or disconnect.
pub(crate) async fn read_until(
    client: &mut Client,
    view: &mut View,
    deadline: Instant,
    mut done: impl FnMut(&View, &Value) -> bool,
) -> bool {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return false;
        }
        let next = glommio::timer::timeout(remaining, async { Ok(client.next().await) }).await;
        let Ok(Some(f)) = next else { return false };
        match f[3].as_str() {
            Some("presence_state") => view.state(&f[4]),
            Some("presence_diff") => view.diff(&f[4]),
            _ => {}
        }
        if done(view, &f) {
            return true;
        }
    }
}

/// Takes the clients' sockets for the epoll receiver (`roster_bench::receiver`), which the
/// scenarios that time deliveries to thousands of subscribers read them with; a client that
/// cannot be handed over counts as an error.
pub(crate) fn hand_over(
    clients: Vec<(usize, Client)>,
    part: &Rc<RefCell<Part>>,
) -> Vec<(std::net::TcpStream, Vec<u8>)> {
    clients
        .into_iter()
        .filter_map(|(_, c)| match c.into_socket() {
            Ok(s) => Some(s),
            Err(err) => {
                part.borrow_mut().error(err);
                None
            }
        })
        .collect()
}
