//! What a new operator meets: `--version` and `--help`, the start-up log, fatal errors, the
//! metrics as a strict OpenMetrics parser reads them, the shipped systemd unit, the host tuning
//! script, and docs that agree with all of these.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::http::{free_port, get};
use common::server::{Client, Server};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_roster");

fn repo_file(path: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    std::fs::read_to_string(format!("{root}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn help() -> String {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `--flag` names in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '-')
            .collect();
        if name.len() > 1 && !name.ends_with('-') {
            found.insert(name);
        }
    }
    found
}

#[test]
fn version_names_roster() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("roster {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn every_option_is_in_help_and_documented() {
    let help = help();
    let options: BTreeSet<String> = flags(&help)
        .into_iter()
        .filter(|f| f != "help" && f != "version")
        .collect();
    // The limits the hardening issue named, each an option with its default in --help.
    for limit in [
        "max-request-bytes",
        "handshake-timeout-ms",
        "max-handshakes",
        "max-handshakes-per-ip",
        "admin-max-conns",
        "admin-timeout-ms",
        "message-timeout-ms",
        "max-frame-bytes",
        "max-connections",
        "max-conns-per-ip",
    ] {
        assert!(options.contains(limit), "--{limit} missing from --help");
    }
    assert!(help.contains("16 KiB"), "the admin request size is stated");
    let ops = repo_file("docs/OPERATIONS.md");
    let documented = flags(&ops);
    let missing: Vec<_> = options.difference(&documented).collect();
    assert!(missing.is_empty(), "not in OPERATIONS.md: {missing:?}");
    // The options table names no option the binary lacks.
    let table: BTreeSet<String> = ops
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .flat_map(|l| flags(l.split('|').nth(1).unwrap_or("")))
        .collect();
    let unknown: Vec<_> = table.difference(&options).collect();
    assert!(
        unknown.is_empty(),
        "documented but not options: {unknown:?}"
    );
}

#[test]
fn the_start_up_log_says_where_how_and_how_many() {
    let s = Server::start(&[]);
    assert!(s.logged(&format!("url=ws://{}/socket", s.addr)));
    assert!(s.logged("mode=\"development (identities not verified)\""));
    assert!(s.logged("connection_capacity="));
    // This sandbox's soft and hard limits are equal: nothing was raised, and it is not said to be.
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if soft == hard {
        assert!(!s.logged("limit raised"));
        assert!(s.logged("already at the hard limit"));
    }
}

#[test]
fn a_fatal_error_is_printed_once() {
    let s = Server::start(&[]);
    let out = Command::new(BIN)
        .args([
            "--listen",
            &s.addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("cannot listen on").count(), 1, "{stderr}");
}

#[test]
fn metrics_pass_a_strict_openmetrics_parser() {
    let admin = free_port();
    let s = Server::start(&["--shards", "2", "--admin-listen", &admin.to_string()]);
    let mut c = Client::connect(s.addr, "m").unwrap();
    c.join("room:metrics", json!({}));
    // Shards publish once a second: wait until the join is in the histograms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = get(admin, "/metrics", None);
        let joined = body
            .lines()
            .filter_map(|l| l.strip_prefix("roster_join_seconds_count{"))
            .any(|l| !l.ends_with("} 0"));
        if joined || std::time::Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status, 200);
    // The Prometheus project's own parser (pip prometheus-client), strict about types, names,
    // histogram buckets and the closing # EOF. scripts/test.sh installs it.
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    total = sum(s.value for s in f.samples if s.name.endswith(('_count', '_total')) or f.type in ('gauge', 'info'))
    print(f.name, f.type, total)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the OpenMetrics parser is missing: pip install prometheus-client ({stderr})"
    );
    assert!(
        out.status.success(),
        "strict parser refused /metrics: {stderr}\n{body}"
    );
    let families = String::from_utf8(out.stdout).unwrap();
    let kind = |name: &str| {
        families
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("absent")
            .to_owned()
    };
    let value = |name: &str| -> f64 {
        families
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .and_then(|l| l.split(' ').nth(2)?.parse().ok())
            .unwrap_or(-1.0)
    };
    for counter in [
        "roster_accepted",
        "roster_messages_in",
        "roster_errors",
        "process_cpu_seconds",
    ] {
        assert_eq!(kind(counter), "counter", "{counter}\n{families}");
    }
    for gauge in [
        "roster_connections",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "roster_heap_bytes",
    ] {
        assert_eq!(kind(gauge), "gauge", "{gauge}\n{families}");
        assert!(value(gauge) > 0.0, "{gauge} is {}", value(gauge));
    }
    assert_eq!(kind("roster_build"), "info");
    assert!(body.contains(&format!(
        "roster_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for h in ["roster_join_seconds", "roster_delivery_seconds"] {
        assert_eq!(kind(h), "histogram", "{h}");
        assert!(value(h) >= 1.0, "{h} counted the join: {}", value(h));
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = repo_file("scripts/roster.service");
    let ops = repo_file("docs/OPERATIONS.md");
    assert!(
        ops.contains(&unit),
        "OPERATIONS.md shows scripts/roster.service as it is"
    );
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: the unit is not verified here");
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("roster-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("roster.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/roster", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    // systemd-analyze exits 0 on settings it ignores: anything it says is a finding.
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn tune_host_shows_what_the_docs_say_it_does() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/tune-host.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    let ops = repo_file("docs/OPERATIONS.md");
    let block = ops
        .split("## A million connections")
        .nth(1)
        .and_then(|s| s.split("```\n").nth(1))
        .expect("the sysctl block");
    for line in block
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
    {
        let (name, want) = line.split_once(" = ").unwrap();
        let row = shown
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("tune-host.sh does not show {name}:\n{shown}"));
        assert!(
            row.contains(want),
            "{name}: the script wants what the doc says ({want}): {row}"
        );
    }
}
