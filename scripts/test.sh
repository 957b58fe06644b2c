#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, unit tests, the multi-shard simulation
# (1,000 seeds; ROSTER_SIM_SEEDS=N for more), server tests on real sockets, the phoenix.js
# end-to-end tests, and a smoke run of the core benchmark.
# This is the test command README.md names and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# The metrics test checks /metrics with the Prometheus project's strict OpenMetrics parser.
python3 -c 'import prometheus_client' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check prometheus-client

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release 2>&1 | tee "$log"
# End to end: the real binary driven by the official phoenix client (engine/tests/js).
cargo build --release -q -p roster-engine --bin roster
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
