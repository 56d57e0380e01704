# shellcheck shell=bash disable=SC2034
# (SC2034: the layout variables are read by the scripts that source this.)
# Shared by integration/cluster.sh and the scripts beside this file (#17):
# the cluster's layout (paths, addresses, node table), logging with timings,
# process start and stop, and the undo journal that lets `down` remove
# exactly what `up` made and nothing else.
#
# Layout on the host (root):
#   $STATE   = ${SLIPWAY_CLUSTER_DIR:-/var/lib/slipway-cluster}: certificates,
#              kubeconfigs, etcd, logs, pid files, per-node directories
#   $RUN     = /run/slipway-cluster: the nodes' persistent mount namespaces
#   $CACHE   = ${SLIPWAY_CLUSTER_CACHE:-/var/cache/slipway/cluster}: built
#              binaries and images, keyed by what they are built from, kept
#              across `down` so that the next `up` is warm
#
# Network (RFC 2544's 198.18.0.0/15; integration/harness.rs uses 198.18.0/24):
#   bridge slwbr0 198.19.0.1/24 in the host namespace: the API server and the
#   site resolver listen there; node i is the network namespace slw-nI at
#   198.19.0.(10+i) with pod subnet 10.244.I.0/24; the namespace slw-client
#   (198.19.0.2) stands for a workstation that resolves cluster names.
#
# Failure: every function exits non-zero with a message naming what failed
# and the log to read; `up` is safe to run again after a failure, and `down`
# after anything.

set -euo pipefail

CLUSTER_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$CLUSTER_HERE/../.." && pwd)"
STATE="${SLIPWAY_CLUSTER_DIR:-/var/lib/slipway-cluster}"
RUN=/run/slipway-cluster
CACHE="${SLIPWAY_CLUSTER_CACHE:-/var/cache/slipway/cluster}"
CONTAINERD_CACHE="${SLIPWAY_CONTAINERD_CACHE:-/var/cache/slipway/containerd}"
K8S_VERSION=v1.34.4

BRIDGE=slwbr0
HOST_IP=198.19.0.1
CLIENT_NS=slw-client
CLIENT_IP=198.19.0.2
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
POD_CIDR=10.244.0.0/16
APISERVER="https://$HOST_IP:6443"

# The nodes: name, containerd release (integration/containerd-releases).
# Two releases so that both CRI pull paths are real: 1.7's local pull and
# 2.1's transfer service (field notes, "containerd 1.7 and 2.x").
NODES=(slw-n1 slw-n2)
declare -A NODE_RELEASE=([slw-n1]=1.7 [slw-n2]=2.1)
declare -A NODE_INDEX=([slw-n1]=1 [slw-n2]=2)

node_ip() { echo "198.19.0.$((10 + NODE_INDEX[$1]))"; }
node_pod_cidr() { echo "10.244.${NODE_INDEX[$1]}.0/24"; }
node_dir() { echo "$STATE/nodes/$1"; }
node_mnt() { echo "$RUN/ns/$1.mnt"; }

log() { printf '%s cluster: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  printf 'cluster: %s\n' "$*" >&2
  exit 1
}

# Times one named step and keeps the figure for the summary line that `up`
# prints at the end (the closing note asks for build and start times).
TIMINGS=()
timed() {
  local what=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  TIMINGS+=("$what $(($(date +%s) - t0))s")
}

# --- the undo journal -------------------------------------------------------
# One line per thing `up` made on the host outside $STATE, $RUN and $CACHE:
# `dir PATH` (created, removed by down if still empty), `sysctl KEY VALUE`
# (the value before, restored by down), `iptables ARGS` (a rule, deleted by
# down). down replays it last line first.
JOURNAL="$STATE/undo"

journal() {
  mkdir -p "$STATE"
  grep -qxF -- "$*" "$JOURNAL" 2>/dev/null || echo "$*" >>"$JOURNAL"
}

# mkdir -p that journals every directory it creates, outermost first.
make_host_dir() {
  local d=$1 missing=()
  while [ ! -e "$d" ]; do
    missing=("$d" "${missing[@]}")
    d=$(dirname "$d")
  done
  for d in "${missing[@]}"; do
    mkdir "$d"
    journal dir "$d"
  done
}

# Sets a sysctl, journaling its old value the first time.
set_sysctl() {
  local key=$1 value=$2 old
  old=$(sysctl -n "$key")
  [ "$old" = "$value" ] && return 0
  grep -q "^sysctl $key " "$JOURNAL" 2>/dev/null || journal sysctl "$key" "$old"
  sysctl -qw "$key=$value"
}

# Adds an iptables rule (filter table) once, journaled for down.
add_iptables() {
  iptables -C "$@" 2>/dev/null || iptables -I "$@"
  journal iptables "$@"
}

# Kubernetes sets these on the host when it starts (kubelet's
# setupKernelTunables: vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops); journal them before any kubelet runs so that down
# puts the machine back.
journal_kubelet_sysctls() {
  local key
  for key in vm.overcommit_memory kernel.panic kernel.panic_on_oops; do
    grep -q "^sysctl $key " "$JOURNAL" 2>/dev/null || journal sysctl "$key" "$(sysctl -n "$key")"
  done
}

# --- processes --------------------------------------------------------------
# start NAME [nsenter options --] CMD...: runs CMD in its own session, output
# to $STATE/logs/NAME.log, pid in $STATE/pids/NAME.
start() {
  local name=$1
  shift
  mkdir -p "$STATE/logs" "$STATE/pids"
  if is_running "$name"; then
    return 0
  fi
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name"
}

is_running() {
  local pid
  pid=$(cat "$STATE/pids/$1" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null
}

# Stops NAME: SIGTERM, then SIGKILL after a bounded wait.
stop() {
  local name=$1 pid i
  pid=$(cat "$STATE/pids/$name" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE/pids/$name"
}

# wait_until WHAT SECONDS CMD...: polls CMD once a second until it succeeds;
# on timeout fails naming WHAT (and the log to read, when given in WHAT).
wait_until() {
  local what=$1 limit=$2 i
  shift 2
  for i in $(seq 1 "$limit"); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  die "timed out after ${limit}s waiting for $what"
}

# Runs a command inside node $1's network and mount namespaces, where
# /etc/containerd, /var/lib/kubelet and the rest are that node's own.
in_node() {
  local node=$1
  shift
  nsenter --mount="$(node_mnt "$node")" --net="/run/netns/$node" -- "$@"
}

# Every API call has a deadline, above the longest --timeout the scripts
# give kubectl's own waits (240 s): a hung API server fails, never hangs.
KUBECTL_REQUEST_TIMEOUT=300s
kctl() { kubectl --kubeconfig "$STATE/admin.kubeconfig" --request-timeout="$KUBECTL_REQUEST_TIMEOUT" "$@"; }
