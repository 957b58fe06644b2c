#!/usr/bin/env bash
# Starts roster (release build) and runs the standard roster-bench suite against it, a fresh
# server per run, writing each run's table and JSON to a dated folder, then draws chart.svg.
#
#   scripts/bench.sh [CLIENTS]      # default 19000 (what one process may hold here)
source "$(dirname "$0")/bench-lib.sh"
clients=${1:-19000}

for n in $((clients / 4)) $((clients / 2)) "$clients"; do
  run "connect-none-$n" "" connect --clients "$n" --topics 100 --presence none
  run "connect-full-$n" "" connect --clients "$n" --topics 100 --presence full
done
run join-storm "" join-storm --clients "$(( clients < 2000 ? clients : 2000 ))"
run fanout "" fanout --clients "$clients" --rounds 20 --interval-ms 250
run churn "" churn --clients "$clients" --rate 100 --window-s 10
run reconnect-storm "" reconnect-storm --clients "$clients" --topics 100 --window-s 5
./target/release/roster-chart "$out"
echo "results in $out"
