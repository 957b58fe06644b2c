//! A small run of each roster-bench scenario against a real roster, checking only that each
//! scenario completes and reports sane results (the figures themselves are not asserted).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Roster(Child, u16);

impl Drop for Roster {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The roster binary, built by `cargo test --workspace` next to roster-bench (same profile).
fn roster_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_roster-bench")).with_file_name("roster");
    assert!(
        bin.exists(),
        "{} missing: run the workspace's tests (scripts/test.sh) or build roster first",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "roster listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn roster() -> Roster {
    let port = free_port();
    let child = Command::new(roster_bin())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shards", "2"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("ROSTER_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("roster starts");
    wait_listening(port);
    Roster(child, port)
}

/// Runs roster-bench `args` against the server on `port` and returns its JSON results.
fn bench(port: u16, args: &[&str]) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "roster-bench-smoke-{}-{}-{port}.json",
        std::process::id(),
        args[0]
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_roster-bench"))
        .args(args)
        .args([
            "--url",
            &format!("ws://127.0.0.1:{port}/socket"),
            "--duration-s",
            "30",
            "--json",
        ])
        .arg(&json)
        .stdout(Stdio::null())
        .output()
        .expect("roster-bench runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("JSON written");
    let _ = std::fs::remove_file(&json);
    serde_json::from_str(&text).expect("valid JSON")
}

/// One scenario against a fresh roster.
fn run(args: &[&str]) -> serde_json::Value {
    let server = roster();
    bench(server.1, args)
}

#[test]
fn connect_scenario_runs() {
    let v = run(&[
        "connect",
        "--clients",
        "200",
        "--topics",
        "10",
        "--executors",
        "2",
    ]);
    assert_eq!(
        (v["joined"].as_u64(), v["errors"].as_u64()),
        (Some(200), Some(0)),
        "{v}"
    );
    assert!(v["join_us"]["p99"].as_u64().is_some_and(|p| p > 0), "{v}");
}

#[test]
fn join_storm_scenario_runs() {
    let v = run(&["join-storm", "--clients", "100"]);
    assert_eq!(
        (
            v["complete"].as_u64(),
            v["errors"].as_u64(),
            v["timeouts"].as_u64()
        ),
        (Some(100), Some(0), Some(0)),
        "{v}"
    );
}

#[test]
fn fanout_scenario_runs() {
    let v = run(&[
        "fanout",
        "--clients",
        "50",
        "--rounds",
        "3",
        "--interval-ms",
        "50",
    ]);
    assert_eq!(
        (v["errors"].as_u64(), v["timeouts"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(v["delivery_us"]["count"].as_u64(), Some(49 * 3), "{v}");
}

#[test]
fn phoenix_compatible_fanout_and_churn_run() {
    // Every subscriber tracked, the member leaving and rejoining: what a Phoenix app can serve.
    let v = run(&[
        "fanout",
        "--phoenix-compatible",
        "--clients",
        "50",
        "--rounds",
        "3",
        "--interval-ms",
        "50",
    ]);
    assert_eq!(v["phoenix_compatible"].as_bool(), Some(true), "{v}");
    assert_eq!(v["delivery_us"]["count"].as_u64(), Some(49 * 3), "{v}");
    let v = run(&[
        "churn",
        "--phoenix-compatible",
        "--clients",
        "50",
        "--rate",
        "50",
        "--churners",
        "5",
        "--window-s",
        "1",
    ]);
    assert_eq!(v["errors"].as_u64(), Some(0), "{v}");
    assert!(v["achieved_rate"].as_f64().is_some_and(|r| r > 25.0), "{v}");
    assert!(
        v["join_seen_us"]["count"].as_u64().is_some_and(|c| c > 0),
        "{v}"
    );
}

#[test]
fn reconnect_storm_scenario_runs() {
    let v = run(&[
        "reconnect-storm",
        "--clients",
        "100",
        "--topics",
        "5",
        "--window-s",
        "1",
    ]);
    assert_eq!(
        (
            v["reconnected"].as_u64(),
            v["dropped"].as_u64(),
            v["errors"].as_u64()
        ),
        (Some(50), Some(50), Some(0)),
        "{v}"
    );
    // Without leave grace every drop is seen: a leave and a join per reconnecting client.
    assert!(
        v["changes_seen_total"].as_u64().is_some_and(|c| c > 0),
        "{v}"
    );
}

#[test]
fn churn_scenario_runs() {
    let v = run(&[
        "churn",
        "--clients",
        "50",
        "--rate",
        "50",
        "--churners",
        "5",
        "--window-s",
        "1",
    ]);
    assert_eq!(
        (v["subscribers"].as_u64(), v["errors"].as_u64()),
        (Some(50), Some(0)),
        "{v}"
    );
    assert!(
        v["join_seen_us"]["count"].as_u64().is_some_and(|c| c > 0),
        "subscribers saw churn joins: {v}"
    );
}

#[test]
fn connect_over_worker_processes_merges_their_results() {
    let v = run(&[
        "connect",
        "--clients",
        "120",
        "--topics",
        "4",
        "--procs",
        "3",
        "--presence",
        "none",
    ]);
    assert_eq!(
        (v["joined"].as_u64(), v["errors"].as_u64()),
        (Some(120), Some(0)),
        "{v}"
    );
    assert_eq!(
        v["join_us"]["count"].as_u64(),
        Some(120),
        "histograms merged from 3 workers: {v}"
    );
}

#[test]
fn reconnect_storm_across_a_server_restart() {
    // The server runs under a pid file so the restart command can replace it on the same port.
    let port = free_port();
    let pidfile =
        std::env::temp_dir().join(format!("roster-smoke-restart-{}.pid", std::process::id()));
    let start = format!(
        "{} --listen 127.0.0.1:{port} --shards 2 --admin-listen 127.0.0.1:0 >/dev/null 2>&1 & echo $! > {}",
        roster_bin().display(),
        pidfile.display()
    );
    let stop = format!(
        "kill -TERM $(cat {p}); while kill -0 $(cat {p}) 2>/dev/null; do sleep 0.02; done",
        p = pidfile.display()
    );
    assert!(Command::new("sh")
        .args(["-c", &start])
        .status()
        .expect("sh")
        .success());
    wait_listening(port);
    let restart = format!("{stop}; {start}");
    let v = std::panic::catch_unwind(|| {
        bench(
            port,
            &[
                "reconnect-storm",
                "--clients",
                "60",
                "--topics",
                "3",
                "--window-s",
                "1",
                "--restart-cmd",
                &restart,
            ],
        )
    });
    let _ = Command::new("sh").args(["-c", &stop]).status();
    let _ = std::fs::remove_file(&pidfile);
    let v = v.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(
        (
            v["reconnected"].as_u64(),
            v["dropped"].as_u64(),
            v["errors"].as_u64()
        ),
        (Some(60), Some(60), Some(0)),
        "{v}"
    );
}

#[test]
fn scenarios_run_over_worker_processes() {
    // Phases are relayed through the parent and stamps use CLOCK_MONOTONIC across processes.
    let v = run(&["join-storm", "--clients", "60", "--procs", "2"]);
    assert_eq!(
        (v["complete"].as_u64(), v["errors"].as_u64()),
        (Some(60), Some(0)),
        "{v}"
    );
    let v = run(&[
        "fanout",
        "--clients",
        "40",
        "--rounds",
        "3",
        "--interval-ms",
        "50",
        "--procs",
        "2",
    ]);
    assert_eq!(v["delivery_us"]["count"].as_u64(), Some(39 * 3), "{v}");
    assert!(
        v["delivery_us"]["max"]
            .as_u64()
            .is_some_and(|m| m < 10_000_000),
        "sane cross-process latency: {v}"
    );
}
