#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the multi-shard simulation
# (1,000 seeds, every invariant checked after every step; ROSTER_SIM_SEEDS=N for more), server
# tests on real sockets, the phoenix.js end-to-end tests, and a smoke run of the core benchmark.
# This is the test command README.md names and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# The metrics test checks /metrics with the Prometheus project's strict OpenMetrics parser.
python3 -c 'import prometheus_client' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check prometheus-client

# The cluster tests run real nats-server processes (Debian's package), each on a free loopback
# port; the TLS one makes its certificates with openssl.
install() {
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y "$1" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$1"; }
  else
    sudo apt-get install -y "$1"
  fi
}
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  install nats-server
fi
command -v openssl >/dev/null 2>&1 || install openssl

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Every server test needs io_uring and locked memory: say so once, up front, rather than let
# each test time out waiting for a server that cannot start.
cargo build --release -q -p roster-engine --bin roster
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
memlock=$(ulimit -Hl)
if [ "$memlock" != unlimited ] && [ "$memlock" -lt 512 ]; then
  echo "scripts/test.sh: the locked-memory hard limit is ${memlock} KiB; io_uring needs 512 KiB (ulimit -l, LimitMEMLOCK)" >&2
  exit 1
fi
if [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 2 ]; then
  echo "scripts/test.sh: io_uring is disabled on this kernel (kernel.io_uring_disabled=2); roster needs it" >&2
  exit 1
fi
"$target_dir/release/roster" --shards 1 --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  2>"$log" >/dev/null &
probe=$!
for _ in $(seq 50); do
  grep -q "shard ready" "$log" && break
  sleep 0.1
done
ready=$(grep -c "shard ready" "$log" || true)
kill "$probe" 2>/dev/null || true
wait "$probe" 2>/dev/null || true
if [ "$ready" = 0 ]; then
  echo "scripts/test.sh: roster cannot start here (io_uring or locked memory unavailable?):" >&2
  cat "$log" >&2
  exit 1
fi
: >"$log"

# The ci profile: release speed, overflow checks and debug assertions on (Cargo.toml).
cargo test --workspace --profile ci 2>&1 | tee "$log"
# End to end: the real binary driven by the official phoenix client (engine/tests/js).
export ROSTER_BIN="$target_dir/release/roster"
if [ ! -d engine/tests/js/node_modules ]; then
  npm ci --prefix engine/tests/js --no-audit --no-fund
fi
node --test --test-concurrency=1 --test-timeout=120000 engine/tests/js/*.test.mjs 2>&1 | tee -a "$log"
# The benchmark is a program that prints figures, not a test; this only proves it still runs.
cargo run --release -q -p roster-bench --bin core-bench -- --quick >/dev/null
# cargo's last "test result" line is the doc-tests' (0 tests); say the total plainly.
passed=$(grep -o 'test result: ok\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
node_passed=$(grep -o '^# pass [0-9]*' "$log" | awk '{s += $3} END {print s + 0}')
passed=$((passed + node_passed))
echo "scripts/test.sh: all checks passed"
echo "tests: $passed passed, 0 failed"
