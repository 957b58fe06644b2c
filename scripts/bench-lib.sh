# Shared by the bench scripts: builds, and runs one roster-bench scenario against a fresh server.
# Loopback only; every run is bounded in count and time. Server and load generator share this
# machine's cores: say so when you quote the figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shards=${ROSTER_BENCH_SHARDS:-2}
sources=${ROSTER_BENCH_SOURCES:-127.0.0.2-127.0.0.21}
out="bench-results/$(date -u +%Y-%m-%dT%H-%M-%SZ)"
mkdir -p "$out"
cargo build --release -q -p roster-engine -p roster-bench
port=4790

run() { # name, "server args", roster-bench args... (the server: $server_bin, else this build's)
  local name=$1 server_args=$2; shift 2
  # shellcheck disable=SC2086 # server_args is a list of flags
  "${server_bin:-./target/release/roster}" --listen "127.0.0.1:$port" --shards "$shards" --admin-listen 127.0.0.1:0 \
    $server_args \
    2>"$out/$name.server.log" &
  local pid=$!
  # Never leave a server behind (the next one would refuse to start on its port).
  trap 'kill -TERM "${pid:-}" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  ./target/release/roster-bench "$@" --url "ws://127.0.0.1:$port/socket" --source-addrs "$sources" \
    --server-pid "$pid" --duration-s "${ROSTER_BENCH_DURATION_S:-120}" --json "$out/$name.json" \
    | tee "$out/$name.txt"
  kill -TERM "$pid"; wait "$pid" || true
}
