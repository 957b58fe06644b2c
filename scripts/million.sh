#!/usr/bin/env bash
# A million connections on this box, with presence: a nats-server and as many roster nodes of
# one shard as the descriptor limit needs, roster-bench's `million` scenario in as many worker
# processes (clients spread over many loopback source addresses), four phases on the same
# clients (ramp, hold, churn, failover; see `roster-bench million --help`), then everything it
# started is stopped. Results (table, JSON, chart) go to bench-results/DATE/.
#
#   scripts/million.sh [CONNECTIONS]      # default 1000000
#
# Environment (defaults in brackets):
#   ROSTER_MILLION_PER_NODE [17000]   connections per node and per worker (one process here
#                                     holds ~19.9k descriptors; the survivors of the failover
#                                     take a killed node's share on top, so not all of them)
#   ROSTER_MILLION_BYTES_PER_CONN [42000]  memory the whole run needs per connection (servers, load
#                                     generator, kernel, NATS); measured, see docs/BENCHMARKS.md
#   ROSTER_MILLION_WATCH [3]          users on each client's watch list
#   ROSTER_MILLION_CHURN [10000]      joins+leaves per second during the churn phase
#   ROSTER_MILLION_HOLD_S [30], ROSTER_MILLION_CHURN_S [60]   phase lengths
#   ROSTER_MILLION_FORCE=1            run even if the memory check says it will not fit
#
# Loopback only, bounded in count and time. Servers, NATS and the load generator share this
# machine's cores: say so when you quote the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-1000000}
per_node=${ROSTER_MILLION_PER_NODE:-17000}
per_conn=${ROSTER_MILLION_BYTES_PER_CONN:-42000}
watch=${ROSTER_MILLION_WATCH:-3}
churn=${ROSTER_MILLION_CHURN:-10000}
hold_s=${ROSTER_MILLION_HOLD_S:-30}
churn_s=${ROSTER_MILLION_CHURN_S:-60}
sources=127.0.0.2-127.0.0.61
nodes=$(((conns + per_node - 1) / per_node))
[ "$nodes" -lt 2 ] && nodes=2 # a failover needs somewhere to go
nats_port=4780
nats_mon=4781
port=4790
admin=$((port + 1000))
cpus=$(nproc)
# Connects in flight per worker: 32, fewer past 11 workers so that the whole ramp keeps ~352 in
# flight (at 22 nodes, 704 in flight starved the nodes until they took each other for dead).
conc=$((352 / nodes))
[ "$conc" -gt 32 ] && conc=32
[ "$conc" -lt 4 ] && conc=4
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)

# What the run needs, checked before anything starts.
problems=()
hard=$(ulimit -Hn)
[ "$hard" -lt $((per_node + 200)) ] &&
  problems+=("open files hard limit $hard < $((per_node + 200)) (ROSTER_MILLION_PER_NODE=$per_node per process)")
filemax=$(sysctl -n fs.file-max)
[ "$filemax" -lt $((2 * conns + 20000)) ] &&
  problems+=("fs.file-max $filemax < $((2 * conns + 20000)) (both loopback ends of every connection; scripts/tune-host.sh --apply)")
avail_kb=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)
need_kb=$(((conns * per_conn + nodes * 12 * 1048576) / 1024))
if [ "$need_kb" -gt $((avail_kb * 9 / 10)) ]; then
  fits=$(((avail_kb * 9 / 10 * 1024 - nodes * 12 * 1048576) / per_conn))
  msg="memory: $conns connections need ~$((need_kb / 1024)) MiB at $per_conn B each, $((avail_kb / 1024)) MiB available (90%: about $fits connections fit)"
  if [ "${ROSTER_MILLION_FORCE:-}" = 1 ]; then echo "warning: $msg; going on (ROSTER_MILLION_FORCE=1)"; else problems+=("$msg"); fi
fi
[ -x "$nats_bin" ] || problems+=("no nats-server (apt-get install nats-server)")
if [ ${#problems[@]} -gt 0 ]; then
  echo "million.sh: cannot run $conns connections here:" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 2
fi
scripts/tune-host.sh | grep -E "low|differs" | sed 's/^/host setting: /' || true

out="bench-results/$(date -u +%Y-%m-%dT%H-%M-%SZ)-million-$conns"
mkdir -p "$out"
cargo build --release -q -p roster-engine -p roster-bench
pids=()
stop_all() {
  # Nodes first (they say goodbye), then NATS; only what this script started.
  [ ${#pids[@]} -gt 1 ] && kill -TERM "${pids[@]:1}" 2>/dev/null || true
  for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
  [ ${#pids[@]} -gt 0 ] && { kill -TERM "${pids[0]}" 2>/dev/null || true; wait "${pids[0]}" 2>/dev/null || true; }
  pids=()
}
trap stop_all EXIT
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$nats_bin" -a 127.0.0.1 -p "$nats_port" -m "$nats_mon" 2>"$out/nats.log" &
pids=($!)
wait_port "$nats_port"
urls=() admins=() node_pids=()
for i in $(seq 0 $((nodes - 1))); do
  # A one-shard node pins its shard to the first CPU it may use: spread them, as an operator
  # would with CPUAffinity. The leave grace lets a dead node's clients take their presences
  # back on the others unseen.
  taskset -c "$((i % cpus))" ./target/release/roster --listen "127.0.0.1:$((port + i))" --shards 1 \
    --admin-listen "127.0.0.1:$((admin + i))" --nats-url "nats://127.0.0.1:$nats_port" \
    --node-name "m$i" --leave-grace-ms 30000 2>"$out/node$i.log" &
  pids+=($!)
  node_pids+=($!)
  urls+=("ws://127.0.0.1:$((port + i))/socket")
  admins+=("http://127.0.0.1:$((admin + i))")
done
for i in $(seq 0 $((nodes - 1))); do wait_port $((port + i)); done
join() { local IFS=,; echo "$*"; }
echo "million.sh: nats-server and $nodes nodes up; $nodes workers of roster-bench; results in $out"
# Bounded: the ramp at several hundred joins/s or more (868/s at 100k over 6 nodes here), then
# the hold, the churn and the 40 s failover.
duration=$((conns / 400 + hold_s + churn_s + 200))
./target/release/roster-bench million --url "$(join "${urls[@]}")" --clients "$conns" \
  --procs "$nodes" --concurrency "$conc" --source-addrs "$sources" --watch "$watch" --churn-rate "$churn" \
  --hold-s "$hold_s" --churn-s "$churn_s" \
  --kill-cmd "kill -9 ${node_pids[0]}" --killed-node 0 --server-pids "$(join "${node_pids[@]}")" \
  --admin-urls "$(join "${admins[@]}")" --nats-pid "${pids[0]}" --nats-monitor "http://127.0.0.1:$nats_mon" \
  --duration-s "$duration" --json "$out/million.json" </dev/null | tee "$out/million.txt"
stop_all
./target/release/roster-chart "$out" || true
echo "results in $out"
