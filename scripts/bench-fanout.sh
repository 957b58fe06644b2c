#!/usr/bin/env bash
# Fan-out beside the kernel's floor, alternating in one run: roster-bench fanout against a fresh
# roster with ROSTER_BENCH_SHARDS shards (default 2), then `floor` with as many writer threads,
# then `floor` with one, RUNS times; both read with the same epoll receiver
# (roster_bench::receiver). Prints each run and the medians with the ratio roster/floor.
#
#   scripts/bench-fanout.sh [CLIENTS] [RUNS]      # default 9999 subscribers + 1 member, 3 runs
#
# ROSTER_BENCH_BASELINE=path/to/roster adds that server binary to each run (an older build, for
# a before/after measured side by side).
source "$(dirname "$0")/bench-lib.sh"
clients=${1:-10000}
runs=${2:-3}
# One process may hold ~19.9k descriptors here: past 19.5k the load generator uses two worker
# processes (and so two receiver threads to floor's one).
procs=$(( clients > 19500 ? 2 : 1 ))

baseline=${ROSTER_BENCH_BASELINE:-}
for r in $(seq "$runs"); do
  run "fanout-$r" "" fanout --clients "$clients" --rounds 20 --interval-ms 250 --procs "$procs"
  if [ -n "$baseline" ]; then
    server_bin=$baseline run "baseline-$r" "" fanout --clients "$clients" --rounds 20 \
      --interval-ms 250 --procs "$procs"
  fi
  for w in "$shards" 1; do
    ./target/release/floor --clients $((clients - 1)) --rounds 20 --interval-ms 250 \
      --writers "$w" --source-addrs "$sources" --json "$out/floor-w$w-$r.json" \
      | tee "$out/floor-w$w-$r.txt"
  done
done

python3 - "$out" "$runs" "$shards" "$baseline" <<'PY'
import json, statistics, sys
out, runs, shards, baseline = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(name):
    return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, runs + 1)]
rows = [("roster fanout, %s shards" % shards, load("fanout")),
        ("floor, %s writers" % shards, load("floor-w" + shards)),
        ("floor, 1 writer", load("floor-w1"))]
if baseline:
    rows.append(("baseline roster", load("baseline")))
def med(runs, key, q):
    return statistics.median(r[key][q] for r in runs) / 1000
print(f"\nmedians of {runs} runs (ms): one member p50 / p99, all members p50 / p99")
base = rows[0][1]
for name, rs in rows:
    vals = [med(rs, "delivery_us", "p50"), med(rs, "delivery_us", "p99"),
            med(rs, "all_members_us", "p50"), med(rs, "all_members_us", "p99")]
    print(f"  {name:26} " + "  ".join(f"{v:7.1f}" for v in vals))
for name, rs in rows[1:]:
    ratios = [med(base, k, q) / med(rs, k, q) for k, q in
              [("delivery_us", "p50"), ("delivery_us", "p99"), ("all_members_us", "p50"), ("all_members_us", "p99")]]
    print(f"  roster / {name:17} " + "  ".join(f"{v:7.2f}" for v in ratios))
PY
echo "results in $out"
