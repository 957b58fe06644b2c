#!/usr/bin/env bash
# The figures of presence beyond Phoenix, each side by side with its feature off: join storms
# into one topic with and without coalescing, fan-out to a big topic in count and full mode, and
# a reconnect storm with and without leave grace.
#
#   scripts/bench-beyond.sh [CLIENTS] [ROUNDS]   # default 19000 clients, 3 rounds of everything
#
# Join storms stop at 8,000: every client must end up holding every other one, so the bytes a
# storm moves grow with the square of its size (19,000 would be ~18 GB of JSON through loopback
# and 361M view entries in the load generator).
source "$(dirname "$0")/bench-lib.sh"
clients=${1:-19000}
rounds=${2:-3}

for r in $(seq "$rounds"); do
  for n in 2000 4000; do
    run "join-storm-$n-plain-$r" "--diff-window-ms 0" join-storm --clients "$n"
    run "join-storm-$n-coalesced-$r" "" join-storm --clients "$n"
  done
  # 10 changes a second for 3 s: diffs to every subscriber, or one count a second.
  run "fanout-count-$r" "" fanout --clients "$clients" --presence count --rounds 30 --interval-ms 100
  run "fanout-full-$r" "" fanout --clients "$clients" --rounds 30 --interval-ms 100
  # Half the clients drop and come back; the grace must outlast the storm (~6-13 s here).
  run "reconnect-plain-$r" "" reconnect-storm --clients "$clients" --topics 100 --window-s 15
  run "reconnect-grace-$r" "--leave-grace-ms 15000" reconnect-storm --clients "$clients" --topics 100 --window-s 15
done
ROSTER_BENCH_DURATION_S=300 run "join-storm-8000-coalesced" "" join-storm --clients 8000
echo "results in $out"
