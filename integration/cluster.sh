#!/usr/bin/env bash
# The real Kubernetes test cluster (#17): one entry point for every
# end-to-end test and for anyone who wants the cluster by hand.
#
#   bash integration/cluster.sh up     build what is missing, start the
#                                      cluster, import the images; the last
#                                      line printed is KUBECONFIG=<path>
#   bash integration/cluster.sh down   stop every process, remove every
#                                      mount, network namespace, iptables
#                                      rule, cgroup and file `up` made
#   bash integration/cluster.sh kubeconfig   print KUBECONFIG=<path> if up
#   bash integration/cluster.sh git-serve DIR   serve the git repository in
#                                      DIR to the cluster's pods; the last
#                                      line printed is its clone URL
#   bash integration/cluster.sh build-env    print the SLIPWAY_BUILD_*_IMAGE=
#                                      lines for the build images the nodes
#                                      hold (Kaniko built from source, git)
#   bash integration/cluster.sh stand-in NAME   start a stand-in upstream
#                                      registry for NAME (e.g. docker.io),
#                                      resolvable under that name by the
#                                      nodes and pods, TLS from a test CA the
#                                      mirror overlay trusts; prints
#                                      PUSH=<host:port> and LOG=<access log>
#                                      (integration/cluster/stand-in.sh, #20)
#   bash integration/cluster.sh stand-in-stop NAME   stop it, as an outage
#   bash integration/cluster.sh object-store   start the object store
#                                      (SeaweedFS's S3 gateway) on the
#                                      cluster bridge and write Secret
#                                      shared-services/registry-storage for
#                                      daemonset/overlays/object-storage;
#                                      prints ENDPOINT=<url> and BUCKET=<name>
#                                      (integration/cluster/object-store.sh, #22)
#   bash integration/cluster.sh object-store-stop   stop it, as an outage
#   bash integration/cluster.sh node-restart NODE [KUBELET-FLAG...]
#                                      stop NODE's kubelet and containers,
#                                      delete its Node object and start it
#                                      again with the extra kubelet flags
#                                      (e.g. --register-with-taints=...)
#
# Both up and down are safe to run twice. Kubernetes v1.34.4, etcd and
# CoreDNS are built from the Go modules in integration/cluster/build and
# integration/cluster/coredns (go.sum checked in); two worker nodes run
# containerd 1.7 and 2.1 (integration/containerd-releases), each in its own
# network and mount namespace (integration/cluster/node.sh). Every image is
# built from this machine's files (integration/cluster/images.sh): nothing
# is pulled from outside. Needs root, Go, cargo and the packages of
# integration/install-deps.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=integration/cluster/lib.sh
. "$here/cluster/lib.sh"
# shellcheck source=integration/cluster/pki.sh
. "$here/cluster/pki.sh"
# shellcheck source=integration/cluster/control.sh
. "$here/cluster/control.sh"
# shellcheck source=integration/cluster/node.sh
. "$here/cluster/node.sh"
# shellcheck source=integration/cluster/git.sh
. "$here/cluster/git.sh"
# shellcheck source=integration/cluster/stand-in.sh
. "$here/cluster/stand-in.sh"
# shellcheck source=integration/cluster/object-store.sh
. "$here/cluster/object-store.sh"

IMAGES="$CACHE/images"

# A command that fails under set -e says which, instead of ending the
# script silently.
set -E
trap 'printf "cluster: failed: %s (%s line %s)\n" "$BASH_COMMAND" "${BASH_SOURCE[0]}" "$LINENO" >&2' ERR

require() {
  [ "$(id -u)" = 0 ] || die "run as root (network namespaces, mounts, cgroups)"
  local missing=() b
  for b in go cargo kubectl nsenter unshare ip iptables openssl umoci skopeo runc curl; do
    command -v "$b" >/dev/null || missing+=("$b")
  done
  [ -x /usr/lib/cni/bridge ] || missing+=("/usr/lib/cni/bridge (containernetworking-plugins)")
  [ ${#missing[@]} = 0 ] || die "missing: ${missing[*]} (bash integration/install-deps.sh as root)"
}

build_images() {
  (cd "$REPO" && cargo build --release --locked --bin slipway) || die "cargo build --release of slipway failed"
  SLIPWAY_BIN="$REPO/target/release/slipway" COREDNS_BIN="$BIN/coredns" KANIKO_BIN="$KANIKO_BIN" \
    PAUSE_C="$(cd "$CLUSTER_HERE/build" && go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c" \
    bash "$CLUSTER_HERE/images.sh" build "$IMAGES" >>"$STATE/logs/images.log" 2>&1 ||
    die "building the images failed (log: $STATE/logs/images.log)"
}

nodes_ready() {
  local n
  for n in "${NODES[@]}"; do
    [ "$(kctl get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] || return 1
  done
}

addons() {
  kctl apply -f "$CLUSTER_HERE/manifests/coredns.yaml" >/dev/null
  wait_until "the nodes to be Ready (logs: $STATE/logs/slw-n*-kubelet.log)" 180 nodes_ready
  kctl -n kube-system rollout status deployment/coredns --timeout=180s >/dev/null ||
    die "CoreDNS did not become available (kubectl -n kube-system describe pod -l k8s-app=kube-dns)"
  # The registry's PersistentVolumeClaim (daemonset/base/registry.yaml) binds
  # to this volume, as a cloud cluster's default StorageClass would provide
  # one. hostPath: every node shares this machine's disk. Owned by the
  # registry's uid: kubelets do not apply fsGroup to hostPath volumes.
  mkdir -p "$STATE/volumes/registry"
  chown 10001:10001 "$STATE/volumes/registry"
  kctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: slipway-test-registry
spec:
  capacity:
    storage: 20Gi
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath:
    path: $STATE/volumes/registry
    type: Directory
EOF
}

control_plane() {
  start_etcd
  start_apiserver
  start_controllers
  start_site_dns
}

up() {
  require
  mkdir -p "$STATE/logs"
  local t_all
  t_all=$(date +%s)
  timed fetch-containerd bash "$REPO/integration/fetch-containerd.sh" >&2
  timed go-binaries build_binaries
  timed kaniko build_kaniko
  timed images build_images
  pki_all
  bridge_up
  echo "$BIN" >"$STATE/bin"
  timed control-plane control_plane
  client_up
  local n
  for n in "${NODES[@]}"; do
    timed "node-$n" node_up "$n"
  done
  timed addons addons
  # What the nodes hold, for build-env (#19).
  cp "$IMAGES/images.txt" "$STATE/images.txt"
  log "up in $(($(date +%s) - t_all))s: ${TIMINGS[*]}"
  echo "KUBECONFIG=$STATE/admin.kubeconfig"
}

down() {
  [ "$(id -u)" = 0 ] || die "run as root"
  local n
  for n in "${NODES[@]}"; do
    node_stop "$n"
  done
  stand_in_stop_all
  stop object-store
  for n in site-dns kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop "$n"
  done
  for n in "${NODES[@]}"; do
    if [ -f "$(node_mnt "$n")" ]; then
      umount "$(node_mnt "$n")" 2>/dev/null || true
    fi
    ip route del "$(node_pod_cidr "$n")" 2>/dev/null || true
    ip link del "${n}h" 2>/dev/null || true
    ip netns del "$n" 2>/dev/null || true
    remove_cgroups "$n"
  done
  ip route del "$SERVICE_CIDR" 2>/dev/null || true
  ip link del slwc0 2>/dev/null || true
  ip netns del "$CLIENT_NS" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  if mountpoint -q "$RUN/ns"; then
    umount "$RUN/ns"
  fi
  rm -rf "$RUN"
  undo_journal
  # Everything else `up` made is under $STATE; $CACHE (binaries, images)
  # stays for the next up.
  rm -rf "$STATE"
  log "down"
}

remove_cgroups() {
  local node=$1 s
  for s in "${CGROUP_SUBSYSTEMS[@]}"; do
    [ -d "/sys/fs/cgroup/$s/$node" ] || continue
    # Deepest first; a cgroup is removed with rmdir, never rm.
    find "/sys/fs/cgroup/$s/$node" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

undo_journal() {
  [ -f "$JOURNAL" ] || return 0
  local kind rest
  while read -r kind rest; do
    case "$kind" in
      sysctl) sysctl -qw "${rest%% *}=${rest#* }" || true ;;
      iptables)
        # shellcheck disable=SC2086
        iptables -D $rest 2>/dev/null || true
        ;;
      file) rm -f "$rest" ;;
      dir) rmdir "$rest" 2>/dev/null || true ;;
    esac
  done < <(tac "$JOURNAL")
}

node_restart() {
  local node=$1
  shift
  [ -n "${NODE_INDEX[$node]:-}" ] || die "no node $node (nodes: ${NODES[*]})"
  BIN=$(cat "$STATE/bin")
  node_stop "$node"
  kctl delete node "$node" --ignore-not-found >/dev/null
  node_up "$node" "$@"
  wait_until "$node to register" 60 kctl get node "$node"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  kubeconfig)
    [ -f "$STATE/admin.kubeconfig" ] || die "the cluster is not up (bash integration/cluster.sh up)"
    echo "KUBECONFIG=$STATE/admin.kubeconfig"
    ;;
  node-restart)
    shift
    node_restart "$@"
    ;;
  git-serve)
    shift
    git_serve "$@"
    ;;
  build-env) build_env ;;
  stand-in)
    shift
    stand_in "$@"
    ;;
  stand-in-stop)
    shift
    stand_in_stop "$@"
    ;;
  object-store)
    shift
    object_store "$@"
    ;;
  object-store-stop)
    shift
    object_store_stop "$@"
    ;;
  *) die "usage: bash integration/cluster.sh up|down|kubeconfig|git-serve DIR|build-env|node-restart NODE [FLAGS]|stand-in NAME|stand-in-stop NAME|object-store|object-store-stop" ;;
esac
