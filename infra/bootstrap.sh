#!/usr/bin/env bash
# Container entrypoint: turn the environment RunPod gives a pod into a Ray node, then run the
# given command (node 0) or stay a cluster member.
#
#   bootstrap.sh [moola-pipeline ARGS...]
#
# RunPod Instant Clusters set NODE_RANK, NUM_NODES, PRIMARY_ADDR/MASTER_ADDR, NODE_ADDR and
# NUM_TRAINERS on every node; a single pod sets none of them and is its own one-node cluster.
# Node 0 starts the Ray head with token auth; the others wait (bounded) for the head and join
# with their own overlay address. Every node gets the same command; only node 0 runs it.
#
# Required: RAY_AUTH_TOKEN (shared by all nodes; never printed).
# Knobs (defaults): MOOLA_RAY_PORT (6379), MOOLA_DASHBOARD_PORT (8265), MOOLA_DASHBOARD_HOST
# (NODE_ADDR, or 0.0.0.0 on a single pod so the RunPod HTTP proxy can reach it), MOOLA_HEAD_WAIT_S
# (300: how long a member waits for the head), MOOLA_NODES_WAIT_S (600: how long node 0 waits for
# all NUM_NODES before running the command), MOOLA_NET_IFACE (ens1: RunPod's inter-node NIC),
# MOOLA_MIN_SHM_MB (8192), MOOLA_RAY_NUM_CPUS, MOOLA_RAY_TEMP_DIR, MOOLA_RAY_START_ARGS (extra
# `ray start` arguments, word-split).
set -euo pipefail

log() { echo "bootstrap[node ${rank:-?}]: $*" >&2; }
die() { echo "bootstrap[node ${rank:-?}]: error: $*" >&2; exit 1; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

rank=${NODE_RANK:-0}
num_nodes=${NUM_NODES:-1}
head_addr=${PRIMARY_ADDR:-${MASTER_ADDR:-}}
node_addr=${NODE_ADDR:-}
ray_port=${MOOLA_RAY_PORT:-6379}
dash_port=${MOOLA_DASHBOARD_PORT:-8265}
head_wait_s=${MOOLA_HEAD_WAIT_S:-300}
nodes_wait_s=${MOOLA_NODES_WAIT_S:-600}
iface=${MOOLA_NET_IFACE:-ens1}
min_shm_mb=${MOOLA_MIN_SHM_MB:-8192}
python=${MOOLA_PYTHON:-python3}

# -- check the environment before starting anything ------------------------------------------
for var in rank num_nodes ray_port dash_port head_wait_s nodes_wait_s min_shm_mb; do
  is_uint "${!var}" || die "$var=${!var} is not a non-negative integer (check NODE_RANK, NUM_NODES, MOOLA_*)"
done
(( num_nodes >= 1 )) || die "NUM_NODES=$num_nodes must be at least 1"
(( rank < num_nodes )) || die "NODE_RANK=$rank must be below NUM_NODES=$num_nodes"
if (( num_nodes > 1 )); then
  [ -n "$head_addr" ] || die "NUM_NODES=$num_nodes but neither PRIMARY_ADDR nor MASTER_ADDR is set"
  [ -n "$node_addr" ] || die "NUM_NODES=$num_nodes but NODE_ADDR (this node's cluster address) is not set"
fi
[ -n "${RAY_AUTH_TOKEN:-}" ] || die "RAY_AUTH_TOKEN is not set: the cluster runs with Ray token auth; set the same token on every node"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED=0

# -- network interface for NCCL (GPU) and gloo (CPU) collectives -----------------------------
# RunPod's eth0 is internet-only; collectives over it time out. Use the inter-node NIC if present.
if [ -e "/sys/class/net/$iface" ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface}
  log "collectives on $iface (NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME)"
elif (( num_nodes > 1 )); then
  log "warning: no $iface interface; NCCL/gloo pick an interface themselves (set MOOLA_NET_IFACE)"
fi

# -- /dev/shm: Ray's object store lives there; Docker's default 64 MB sends it to /tmp ----------
shm_mb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print int($2/1024)}')
if [ -z "$shm_mb" ]; then
  log "warning: no /dev/shm; Ray's object store falls back to /tmp (slow)"
elif (( shm_mb < min_shm_mb )); then
  log "warning: /dev/shm is ${shm_mb} MB, below ${min_shm_mb} MB: Ray's object store will be small or fall back to /tmp; run the container with --shm-size=8g or more"
else
  log "/dev/shm is ${shm_mb} MB"
fi

# -- helpers ----------------------------------------------------------------------------------
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

alive_nodes() {  # count of ALIVE nodes from the head's state API (token-authenticated)
  "$python" - "$1" <<'PY' 2>/dev/null || echo 0
import json, os, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/v0/nodes?limit=1000&detail=false",
                             headers={"Authorization": "Bearer " + os.environ["RAY_AUTH_TOKEN"]})
rows = json.load(urllib.request.urlopen(req, timeout=5))["data"]["result"]["result"]
print(sum(1 for r in rows if r.get("state") == "ALIVE"))
PY
}

ray_args=(--disable-usage-stats --block)
[ -n "$node_addr" ] && ray_args+=(--node-ip-address "$node_addr")
[ -n "${NUM_TRAINERS:-}" ] && ray_args+=(--num-gpus "$NUM_TRAINERS")
[ -n "${MOOLA_RAY_NUM_CPUS:-}" ] && ray_args+=(--num-cpus "$MOOLA_RAY_NUM_CPUS")
[ -n "${MOOLA_RAY_TEMP_DIR:-}" ] && ray_args+=(--temp-dir "$MOOLA_RAY_TEMP_DIR")
# shellcheck disable=SC2206  # word-splitting is the point
[ -n "${MOOLA_RAY_START_ARGS:-}" ] && ray_args+=($MOOLA_RAY_START_ARGS)

# -- members: wait for the head, join, stay ----------------------------------------------------
if (( rank > 0 )); then
  [ $# -gt 0 ] && log "node $rank joins as a member; only node 0 runs: $*"
  log "waiting up to ${head_wait_s}s for the Ray head at $head_addr:$ray_port"
  deadline=$((SECONDS + head_wait_s))
  until tcp_open "$head_addr" "$ray_port"; do
    (( SECONDS < deadline )) || die "the Ray head at $head_addr:$ray_port did not answer within ${head_wait_s}s (MOOLA_HEAD_WAIT_S); check that node 0 started and that $head_addr is reachable from $node_addr"
    sleep 1
  done
  log "joining the cluster at $head_addr:$ray_port as $node_addr"
  exec ray start --address "$head_addr:$ray_port" "${ray_args[@]}"
fi

# -- node 0: the head ---------------------------------------------------------------------------
if (( num_nodes > 1 )); then
  dash_host=${MOOLA_DASHBOARD_HOST:-$node_addr}
  head_ip=$node_addr
else
  dash_host=${MOOLA_DASHBOARD_HOST:-0.0.0.0}
  head_ip=${node_addr:-127.0.0.1}
fi
probe_host=$dash_host
[ "$probe_host" = "0.0.0.0" ] && probe_host=127.0.0.1
dashboard="http://$probe_host:$dash_port"

log "starting the Ray head on port $ray_port, job server on $dash_host:$dash_port (token auth)"
ray start --head --port "$ray_port" --dashboard-host "$dash_host" --dashboard-port "$dash_port" \
  --include-dashboard true "${ray_args[@]}" &
ray_pid=$!
stop_head() { kill -TERM "$ray_pid" 2>/dev/null || true; wait "$ray_pid" 2>/dev/null || true; }
trap stop_head EXIT
trap 'exit 143' TERM INT

log "waiting up to ${nodes_wait_s}s for $num_nodes node(s) to join"
deadline=$((SECONDS + nodes_wait_s))
while :; do
  kill -0 "$ray_pid" 2>/dev/null || die "ray start --head exited; see its output above"
  n=$(alive_nodes "$dashboard")
  (( n >= num_nodes )) && break
  (( SECONDS < deadline )) || die "only $n of $num_nodes nodes joined within ${nodes_wait_s}s (MOOLA_NODES_WAIT_S)"
  sleep 2
done
export RAY_ADDRESS="$head_ip:$ray_port"
log "cluster ready: $num_nodes node(s); RAY_ADDRESS=$RAY_ADDRESS; jobs at http://$dash_host:$dash_port"

if [ $# -eq 0 ]; then
  log "no command given: serving as the cluster head (submit jobs to the job server)"
  wait "$ray_pid"
  exit $?
fi

# The command runs in the background so a SIGTERM (docker stop, pod shutdown) reaches it now,
# not after it finishes; its own exit status is what this script exits with.
log "running: $*"
"$@" &
cmd_pid=$!
trap 'kill -TERM "$cmd_pid" 2>/dev/null || true' TERM INT
status=0
wait "$cmd_pid" || status=$?
while kill -0 "$cmd_pid" 2>/dev/null; do  # woken by a signal: wait for the real exit
  status=0
  wait "$cmd_pid" || status=$?
done
log "command exited with status $status"
exit "$status"
