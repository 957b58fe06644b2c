#!/usr/bin/env bash
# Restarts and node loss, measured with roster-bench reconnect-storm (loopback, bounded):
#
# 1. restart: one node of 2 shards with CLIENTS clients in 100 topics is stopped (SIGTERM) and
#    started again on the same port, with a state file and without; every client reconnects and
#    rejoins with its meta and counts the presence changes it sees once back.
# 2. failover: a nats-server and three nodes of one shard each, all with --leave-grace-ms
#    30000 (and, to compare, 0); CLIENTS clients on node 0, 1000 observers on nodes 1 and 2 in
#    the same topics; node 0 is killed with -9 and its clients reconnect to nodes 1 and 2 (as a
#    load balancer would send them); the observers count the presence changes they see.
#
#   scripts/bench-restart.sh [CLIENTS] [RUNS]   # default 19000 clients, 1 run of each
#
# Servers, NATS and the load generator share this machine's cores: say so when you quote them.
source "$(dirname "$0")/bench-lib.sh"
clients=${1:-19000}
runs=${2:-1}
topics=${ROSTER_BENCH_TOPICS:-100}
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
nats_port=4780
# Past the 30 s graces (plus the node timeout): what nobody took back would leave within it.
window=${ROSTER_BENCH_WINDOW_S:-40}
pids=()
trap 'kill -TERM "${pids[@]}" $(cat "$out"/*.pid 2>/dev/null) 2>/dev/null || true' EXIT

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.1; done; }

restart_run() { # name, extra server args
  local name=$1 extra=$2
  local args="--listen 127.0.0.1:$port --shards $shards --admin-listen 127.0.0.1:0 $extra"
  rm -f "$out/state.bin"
  # shellcheck disable=SC2086
  ./target/release/roster $args 2>"$out/$name.server.log" &
  echo $! >"$out/$name.pid"
  wait_port "$port"
  # The command the load generator runs: SIGTERM, wait for the exit, start again (same flags).
  local cmd="p=\$(cat $out/$name.pid); kill -TERM \$p; while kill -0 \$p 2>/dev/null; do sleep 0.02; done;
    ./target/release/roster $args </dev/null >/dev/null 2>>$out/$name.server.log & echo \$! >$out/$name.pid"
  ./target/release/roster-bench reconnect-storm --clients "$clients" --topics "$topics" --window-s "$window" \
    --restart-cmd "$cmd" --procs 2 --url "ws://127.0.0.1:$port/socket" --source-addrs "$sources" \
    --duration-s 150 --json "$out/$name.json" | tee "$out/$name.txt"
  kill -TERM "$(cat "$out/$name.pid")" 2>/dev/null || true
  while kill -0 "$(cat "$out/$name.pid")" 2>/dev/null; do sleep 0.1; done
  rm -f "$out/$name.pid"
}

failover_run() { # name, leave grace (ms)
  local name=$1 grace=$2
  "$nats_bin" -a 127.0.0.1 -p "$nats_port" 2>"$out/$name.nats.log" &
  pids=($!)
  wait_port "$nats_port"
  local urls=()
  for i in 0 1 2; do
    taskset -c "$((i % $(nproc)))" ./target/release/roster --listen "127.0.0.1:$((port + i))" --shards 1 \
      --admin-listen "127.0.0.1:0" --nats-url "nats://127.0.0.1:$nats_port" --node-name "fo-$i" \
      --leave-grace-ms "$grace" 2>"$out/$name.node$i.log" &
    pids+=($!)
    urls+=("ws://127.0.0.1:$((port + i))/socket")
  done
  for i in 0 1 2; do wait_port $((port + i)); done
  ./target/release/roster-bench reconnect-storm --clients "$clients" --topics "$topics" --window-s "$window" \
    --restart-cmd "kill -9 ${pids[1]}" --url "${urls[0]}" --reconnect-url "${urls[1]},${urls[2]}" \
    --observers 1000 --observer-url "${urls[1]},${urls[2]}" --procs 2 --source-addrs "$sources" \
    --duration-s 150 --json "$out/$name.json" | tee "$out/$name.txt"
  kill -TERM "${pids[@]:2}" 2>/dev/null || true
  for p in "${pids[@]:2}"; do wait "$p" 2>/dev/null || true; done
  kill -TERM "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true
  pids=()
}

for r in $(seq "$runs"); do
  restart_run "restart-state-$r" "--state-file $out/state.bin --restart-grace-ms 30000"
  restart_run "restart-none-$r" ""
  failover_run "failover-grace-$r" 30000
  failover_run "failover-nograce-$r" 0
done
echo "results in $out"
