#!/usr/bin/env bash
# Starts roster (release build) and runs the standard roster-bench suite against it, a fresh
# server per run, writing each run's table and JSON to a dated folder, then draws chart.svg.
#
#   scripts/bench.sh [CLIENTS]      # default 19000 (what one process may hold here)
#
# Loopback only; every run is bounded in count and time. Server and load generator share this
# machine's cores: say so when you quote the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-19000}
shards=${ROSTER_BENCH_SHARDS:-2}
sources=${ROSTER_BENCH_SOURCES:-127.0.0.2-127.0.0.21}
out="bench-results/$(date -u +%Y-%m-%dT%H-%M-%SZ)"
mkdir -p "$out"
cargo build --release -q -p roster-engine -p roster-bench
port=4790

run() { # name, roster-bench args...
  local name=$1; shift
  ./target/release/roster --listen "127.0.0.1:$port" --shards "$shards" 2>"$out/$name.server.log" &
  local pid=$!
  # Never leave a server behind (the next one would share its port through SO_REUSEPORT).
  trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  ./target/release/roster-bench "$@" --url "ws://127.0.0.1:$port/socket" --source-addrs "$sources" \
    --server-pid "$pid" --duration-s 120 --json "$out/$name.json" | tee "$out/$name.txt"
  kill -TERM "$pid"; wait "$pid" || true
}

for n in $((clients / 4)) $((clients / 2)) "$clients"; do
  run "connect-none-$n" connect --clients "$n" --topics 100 --presence none
  run "connect-full-$n" connect --clients "$n" --topics 100 --presence full
done
run join-storm join-storm --clients "$(( clients < 2000 ? clients : 2000 ))"
run fanout fanout --clients "$clients" --rounds 20 --interval-ms 250
run churn churn --clients "$clients" --rate 100 --window-s 10
run reconnect-storm reconnect-storm --clients "$clients" --topics 100 --window-s 5
./target/release/roster-chart "$out"
echo "results in $out"
