#!/usr/bin/env bash
# The cluster's figures, on one machine: a nats-server and three roster nodes of one shard each
# (loopback), then roster-bench's `cluster` scenario (remote join latency idle and under churn,
# NATS traffic per change, the last node's memory with and without interest in a large topic,
# kill -9 of the last node timed until its presences left), and joins per second with the
# clients spread over the three nodes against one node of two shards on the same two cores.
#
#   scripts/bench-cluster.sh [ROUNDS] [CLIENTS]   # default 3 rounds, 6000 clients for the joins
#
# Servers, NATS and the load generator share this machine's cores: say so when you quote them.
source "$(dirname "$0")/bench-lib.sh"
rounds=${1:-3}
clients=${2:-6000}
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
nats_port=4780
nodes=3
cpus=$(nproc)
pids=()

start_cluster() { # name: nats-server and $nodes nodes
  local name=$1
  "$nats_bin" -a 127.0.0.1 -p "$nats_port" 2>"$out/$name.nats.log" &
  pids=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$nats_port) 2>/dev/null && break; sleep 0.1; done
  urls=() admins=()
  for i in $(seq 0 $((nodes - 1))); do
    # A one-shard node pins its shard to the first CPU it may use: spread the nodes over the
    # CPUs, as an operator would with CPUAffinity (else all three share CPU 0).
    taskset -c "$((i % cpus))" ./target/release/roster --listen "127.0.0.1:$((port + i))" --shards 1 \
      --admin-listen "127.0.0.1:$((port + 100 + i))" \
      --nats-url "nats://127.0.0.1:$nats_port" --node-name "bench-$i" \
      2>"$out/$name.node$i.log" &
    pids+=($!)
    urls+=("ws://127.0.0.1:$((port + i))/socket")
    admins+=("http://127.0.0.1:$((port + 100 + i))")
  done
  for i in $(seq 0 $((nodes - 1))); do
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$((port + i))) 2>/dev/null && break; sleep 0.1; done
  done
  trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' EXIT
}

stop_cluster() {
  # The nodes first (they say goodbye through NATS), then NATS; a killed node is gone already.
  kill -TERM "${pids[@]:1}" 2>/dev/null || true
  for p in "${pids[@]:1}"; do wait "$p" 2>/dev/null || true; done
  kill -TERM "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
}

join_urls() { local IFS=,; echo "$*"; }

for r in $(seq "$rounds"); do
  start_cluster "cluster-$r"
  last=${pids[$nodes]}
  ./target/release/roster-bench cluster --url "$(join_urls "${urls[@]}")" \
    --admin-urls "$(join_urls "${admins[@]}")" --big 5000 --rounds 300 --rate 1000 --churners 300 \
    --kill-cmd "kill -9 $last" --source-addrs "$sources" --duration-s 120 \
    --json "$out/cluster-$r.json" | tee "$out/cluster-$r.txt"
  stop_cluster

  # Joins per second: the same clients and topics, over three nodes, then one.
  start_cluster "connect3-$r"
  ./target/release/roster-bench connect --url "$(join_urls "${urls[@]}")" --clients "$clients" \
    --topics 100 --source-addrs "$sources" --duration-s 120 --json "$out/connect3-$r.json" \
    | tee "$out/connect3-$r.txt"
  stop_cluster
  run "connect1-$r" "" connect --clients "$clients" --topics 100
done
echo "results in $out"
