# shellcheck shell=bash
# The test cluster's nodes (#17). Each node is what a real node has of its
# own, on one machine:
#
#   network   the namespace /run/netns/NODE, a veth on the bridge, its own
#             iptables (kube-proxy) and pod bridge cni0 (CNI bridge plugin,
#             Debian's containernetworking-plugins)
#   files     a persistent mount namespace ($RUN/ns/NODE.mnt, propagation
#             slave: host mounts reach it, its mounts stay in it) in which
#             /etc/containerd, /var/lib/containerd, /run/containerd,
#             /var/lib/kubelet, /var/log/pods, /var/log/containers,
#             /var/lib/cni, /etc/cni/net.d, /var/lib/slipway, /run/netns
#             (where containerd pins pod network namespaces) and
#             /etc/resolv.conf are that node's own directories under
#             $STATE/nodes/NODE. The agent's hostPath volumes
#             (/etc/containerd/certs.d, /var/lib/slipway/cache) are then
#             per node, as on separate machines, and every component runs
#             with its default paths.
#   cgroups   the root /NODE in every v1 hierarchy (kubelet cgroupRoot)
#   runtime   containerd from integration/containerd-releases, with
#             config_path = /etc/containerd/certs.d, and the kubelet and
#             kube-proxy of build/
#
# Not `ip netns exec`: it unshares the mount namespace and remounts /sys,
# which hides the cgroup hierarchies from the kubelet and keeps the
# kubelet's volume mounts from containerd. nsenter joins exactly the two
# namespaces. Fails naming the node, the step and its log.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Directories a node has of its own: host path -> directory under the node's.
NODE_BINDS=(
  /etc/containerd:etc-containerd
  /var/lib/containerd:containerd
  /run/containerd:run-containerd
  /var/lib/kubelet:kubelet
  /var/log/pods:log-pods
  /var/log/containers:log-containers
  /var/lib/cni:cni-state
  /etc/cni/net.d:cni-conf
  /var/lib/slipway:slipway
  /run/netns:netns
)

CGROUP_SUBSYSTEMS=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)

release_bin() {
  local release=$1 version
  if [ "$release" = 1.6 ]; then
    echo /usr/bin
    return
  fi
  version=$(awk -v r="$release" '$1 == r && NF == 4 { print $2 }' "$REPO/integration/containerd-releases")
  [ -n "$version" ] || die "containerd release $release is not in integration/containerd-releases"
  [ -x "$CONTAINERD_CACHE/$version/usr/bin/containerd" ] ||
    die "containerd $release is not in $CONTAINERD_CACHE/$version (run integration/fetch-containerd.sh)"
  echo "$CONTAINERD_CACHE/$version/usr/bin"
}

bridge_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  set_sysctl net.ipv4.ip_forward 1
  # Node-to-node and pod traffic crosses the host's FORWARD chain.
  add_iptables FORWARD -i "$BRIDGE" -j ACCEPT -m comment --comment slipway-cluster
  add_iptables FORWARD -o "$BRIDGE" -j ACCEPT -m comment --comment slipway-cluster
}

# veth_into NS IFNAME IP: a veth from the bridge into namespace NS.
veth_into() {
  local ns=$1 host_if=$2 ip=$3
  ip netns list | grep -qw "^$ns" || ip netns add "$ns"
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name eth0 netns "$ns"
    ip link set "$host_if" master "$BRIDGE" up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$HOST_IP"
  fi
}

# A workstation that reaches Services through node 1 and resolves cluster
# names through the cluster's DNS: where tests push from (`ip netns exec`
# binds /etc/netns/slw-client/resolv.conf over /etc/resolv.conf).
client_up() {
  veth_into "$CLIENT_NS" slwc0 "$CLIENT_IP"
  make_host_dir "/etc/netns/$CLIENT_NS"
  printf 'nameserver %s\nsearch svc.cluster.local cluster.local\noptions ndots:5\n' "$DNS_SERVICE_IP" \
    >"/etc/netns/$CLIENT_NS/resolv.conf"
  journal file "/etc/netns/$CLIENT_NS/resolv.conf"
  ip route replace "$SERVICE_CIDR" via "$(node_ip "${NODES[0]}")"
}

node_network() {
  local node=$1 ip
  ip=$(node_ip "$node")
  veth_into "$node" "${node}h" "$ip"
  ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$node" sysctl -qw net.bridge.bridge-nf-call-iptables=1
  ip route replace "$(node_pod_cidr "$node")" via "$ip"
}

node_mount_ns() {
  local node=$1 d mnt b script=""
  d=$(node_dir "$node")
  mnt=$(node_mnt "$node")
  mkdir -p "$RUN/ns"
  if ! mountpoint -q "$RUN/ns"; then
    mount --bind "$RUN/ns" "$RUN/ns"
    mount --make-private "$RUN/ns"
  fi
  if [ -f "$mnt" ] && nsenter --mount="$mnt" true 2>/dev/null; then
    return 0
  fi
  for b in "${NODE_BINDS[@]}"; do
    make_host_dir "${b%%:*}"
    mkdir -p "$d/${b#*:}"
    script+="mount --bind '$d/${b#*:}' '${b%%:*}' && "
  done
  printf 'nameserver %s\n' "$HOST_IP" >"$d/resolv.conf"
  script+="mount --bind '$d/resolv.conf' /etc/resolv.conf"
  touch "$mnt"
  unshare --mount="$mnt" --propagation slave sh -c "$script" ||
    die "$node: could not make its mount namespace"
}

node_cgroups() {
  local node=$1 s
  for s in "${CGROUP_SUBSYSTEMS[@]}"; do
    [ -d "/sys/fs/cgroup/$s" ] || continue
    mkdir -p "/sys/fs/cgroup/$s/$node"
    if [ "$s" = cpuset ]; then
      cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$node/cpuset.cpus"
      cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$node/cpuset.mems"
    fi
  done
}

containerd_config() {
  local node=$1 release=$2
  local sandbox=localhost/slipway/pause:3.10
  # The opt plugin would create /opt/containerd on the host, outside the
  # node's own directories.
  local DISABLED='disabled_plugins = ["io.containerd.internal.v1.opt"]'
  # runc, with negative OOM scores clamped at 0 (see the script).
  local RUNC="$CLUSTER_HERE/runc-oom-clamp.sh"
  if [ "${release%%.*}" = 1 ]; then
    cat <<EOF
# containerd $release on test node $node (integration/cluster/node.sh)
version = 2
$DISABLED
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$sandbox"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
EOF
  else
    # 2.x: CRI pulls go through the transfer service, which unpacks only for
    # the platforms in unpack_config ("no unpack platforms defined").
    cat <<EOF
# containerd $release on test node $node (integration/cluster/node.sh)
version = 3
$DISABLED
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$sandbox"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = "$RUNC"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/usr/lib/cni"]
  conf_dir = "/etc/cni/net.d"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "overlayfs"
EOF
  fi
}

cni_config() {
  local node=$1
  cat <<EOF
{
  "cniVersion": "1.0.0",
  "name": "slipway-$node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$(node_pod_cidr "$node")"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

kubelet_config() {
  local node=$1
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $STATE/pki/ca.crt
authorization:
  mode: Webhook
# PID 1 is not systemd on these machines.
cgroupDriver: cgroupfs
cgroupRoot: /$node
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: [$DNS_SERVICE_IP]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
failSwapOn: false
# Images are imported, never pulled from outside: image GC must not remove
# them, and the nodes share the machine's disk with everything else, so
# eviction waits for a nearly full disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
EOF
}

kube_proxy_config() {
  local node=$1
  cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $node
bindAddress: $(node_ip "$node")
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# A network namespace cannot set the machine's conntrack table size or
# timeouts; 0 leaves them as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
}

# node_up NODE [KUBELET-FLAGS...]
node_up() {
  local node=$1 release bin d
  shift
  release=${NODE_RELEASE[$node]}
  bin=$(release_bin "$release")
  d=$(node_dir "$node")
  node_network "$node"
  node_mount_ns "$node"
  node_cgroups "$node"
  containerd_config "$node" "$release" >"$d/etc-containerd/config.toml"
  mkdir -p "$d/etc-containerd/certs.d"
  cni_config "$node" >"$d/cni-conf/10-slipway.conflist"
  kubelet_config "$node" >"$d/kubelet-config.yaml"
  kube_proxy_config "$node" >"$d/kube-proxy.yaml"
  start "$node-containerd" nsenter --mount="$(node_mnt "$node")" --net="/run/netns/$node" -- \
    env PATH="$bin:/usr/sbin:/usr/bin:/sbin:/bin" "$bin/containerd" --config /etc/containerd/config.toml
  wait_until "containerd $release on $node (log: $STATE/logs/$node-containerd.log)" 60 \
    in_node "$node" "$bin/ctr" --timeout 5s version
  in_node "$node" env SNAPSHOTTER=overlayfs bash "$CLUSTER_HERE/images.sh" import "$bin/ctr" \
    /run/containerd/containerd.sock "$IMAGES" >>"$STATE/logs/$node-images.log" 2>&1 ||
    die "$node: importing the images failed (log: $STATE/logs/$node-images.log)"
  journal_kubelet_sysctls
  start "$node-kubelet" nsenter --mount="$(node_mnt "$node")" --net="/run/netns/$node" -- \
    "$BIN/kubelet" --config="$d/kubelet-config.yaml" --kubeconfig="$STATE/$node.kubeconfig" \
    --hostname-override="$node" --node-ip="$(node_ip "$node")" \
    --node-labels="slipway.test/containerd=$release" "$@"
  start "$node-kube-proxy" nsenter --net="/run/netns/$node" -- "$BIN/kube-proxy" --config="$d/kube-proxy.yaml"
}

# Stops one node's processes and everything running in its namespaces and
# cgroups; keeps its directories (node_up starts it again).
node_stop() {
  local node=$1 mnt ino pid s
  stop "$node-kube-proxy"
  stop "$node-kubelet"
  # Every container of the node: its cgroups.
  for s in "${CGROUP_SUBSYSTEMS[@]}"; do
    [ -d "/sys/fs/cgroup/$s/$node" ] || continue
    # Cgroups vanish while find walks them: its failure is expected.
    { find "/sys/fs/cgroup/$s/$node" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } |
      while read -r pid; do
        kill -KILL "$pid" 2>/dev/null || true
      done
  done
  stop "$node-containerd"
  # Shims and anything else left in the node's mount or network namespace.
  mnt=$(node_mnt "$node")
  if [ -f "$mnt" ]; then
    ino=$(stat -L -c %i "$mnt" 2>/dev/null || true)
    for pid in /proc/[0-9]*; do
      pid=${pid#/proc/}
      if [ -n "$ino" ] && [ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" = "mnt:[$ino]" ]; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  ip netns pids "$node" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  sleep 0.5
}
