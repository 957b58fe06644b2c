//! state-bench: the cost of a restart that keeps presence, without a server: a state file of
//! `--presences` presences (one per connection, `--per-topic` per topic, a meta the size of a
//! typical app's), written, read back and checked, then taken back by `--shards` cores (all in
//! this thread, as each shard of a server does before it accepts). Prints the file's size per
//! presence and each step's time, medians of `--rounds`. `--keep PATH` leaves the file there,
//! for timing a real server's start with it (`roster --state-file PATH`).
//!
//!   state-bench --presences 1000000 --shards 2 [--keep /tmp/state.bin]

use std::time::Instant;

use clap::Parser;
use roster_bench::report::median;
use roster_engine::core::{Config, Millis, Shard};
use roster_engine::mesh::ShardId;
use roster_engine::state_file::{self, HeldConn, HeldPresence, State};
use roster_proto::{ClientMeta, PhxRef};

#[derive(Parser)]
#[command(about = "Writing, reading and taking back a state file of N presences (no server)")]
struct Cli {
    #[arg(long, default_value_t = 1_000_000)]
    presences: usize,
    #[arg(long, default_value_t = 10)]
    per_topic: usize,
    #[arg(long, default_value_t = 2)]
    shards: u16,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the file is written (and left, if given).
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

const META: &str = r#"{"page":"/room/123","status":"online"}"#;

fn main() {
    let cli = Cli::parse();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut stored = Vec::new();
    let conns = (0..cli.presences)
        .map(|i| {
            stored.clear();
            let meta = ClientMeta::from_json(META).expect("a meta");
            meta.encode(&mut stored, None, PhxRef(0x9e37_79b9 ^ i as u64), None);
            HeldConn {
                key: format!("user-{i}"),
                presences: vec![HeldPresence {
                    topic: format!("room:{}", i / cli.per_topic.max(1)),
                    phx_ref: 0x9e37_79b9 ^ i as u64,
                    meta: stored.clone(),
                }],
            }
        })
        .collect();
    let state = State {
        written_at_ms: now_ms,
        node: String::new(),
        conns,
        server: Vec::new(),
    };
    let path = cli.keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("state-bench-{}", std::process::id()))
    });
    let (mut write, mut read, mut restore) = (Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..cli.rounds {
        let t = Instant::now();
        state_file::write(&path, &state).expect("write");
        write.push(t.elapsed().as_secs_f64() * 1e3);
        size = std::fs::metadata(&path).map_or(0, |m| m.len());
        let t = Instant::now();
        let back = state_file::read(&path, "", now_ms, 60_000).expect("read");
        read.push(t.elapsed().as_secs_f64() * 1e3);
        let config = Config {
            shards: cli.shards,
            ..Config::default()
        };
        let mut shards: Vec<Shard> = (0..cli.shards)
            .map(|i| Shard::new(ShardId(i), config.clone()))
            .collect();
        let t = Instant::now();
        let mut taken = 0;
        // Each shard scans the whole file and takes its own topics' presences, as the server's
        // shards do (there in parallel, one core each: this is their sum).
        for shard in &mut shards {
            let presences = back.each_presence();
            taken += shard.restore(presences, Millis(30_000));
            let _ = shard.outputs().count();
        }
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            taken, cli.presences,
            "every presence taken by its topic's owner"
        );
    }
    if cli.keep.is_none() {
        let _ = std::fs::remove_file(&path);
    }
    let show = |what: &str, xs: Vec<f64>| {
        let (m, lo, hi) = median(xs);
        println!("  {what}: {m:.1} ms (runs {lo:.1}-{hi:.1})");
    };
    println!(
        "state-bench: {} presences, {} per topic, {} shards; file {} bytes, {:.1} B per presence",
        cli.presences,
        cli.per_topic,
        cli.shards,
        size,
        size as f64 / cli.presences.max(1) as f64
    );
    show("write (temporary file, fsync, rename)", write);
    show("read and check", read);
    show("taken back by every shard, in sum", restore);
}
