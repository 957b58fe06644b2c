#!/usr/bin/env bash
# Starts roster (release build) and runs the standard roster-bench suite against it, one fresh
# server per scenario, writing each scenario's JSON and the printed tables to a dated folder.
#
#   scripts/bench.sh [CLIENTS]      # default 19000 (what one process may hold here)
#
# Loopback only; every run is bounded in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-19000}
shards=${ROSTER_BENCH_SHARDS:-2}
out="bench-results/$(date -u +%Y-%m-%dT%H-%M-%SZ)"
mkdir -p "$out"
cargo build --release -q -p roster-engine -p roster-bench
port=4790

run() { # name, roster-bench args...
  local name=$1; shift
  ./target/release/roster --listen "127.0.0.1:$port" --shards "$shards" 2>"$out/$name.server.log" &
  local pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  ./target/release/roster-bench "$@" --url "ws://127.0.0.1:$port/socket" --server-pid "$pid" --json "$out/$name.json" \
    | tee "$out/$name.txt"
  kill -TERM "$pid"; wait "$pid" || true
}

run connect-none connect --clients "$clients" --topics 100 --presence none --duration-s 120
run connect-full connect --clients "$clients" --topics 100 --presence full --duration-s 120
run join-storm join-storm --clients "$(( clients < 4000 ? clients : 4000 ))" --duration-s 120
run fanout fanout --clients "$clients" --rounds 20 --interval-ms 250 --duration-s 120
echo "results in $out"
