# shellcheck shell=bash
# The test cluster's control plane (#17): builds Kubernetes v1.34.4, etcd and
# CoreDNS from the Go modules pinned in build/ and coredns/ (go.sum checked
# in), then runs etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler as host processes, and the "site resolver": a CoreDNS on the
# bridge that answers NXDOMAIN for every name, as a VPC resolver does for a
# cluster-internal name such as registry.shared-services (the seed's `no such
# host`).
#
# Binaries go to $CACHE/bin/<key>, where key hashes go.mod, go.sum, the Go
# version and the ldflags: a warm `up` builds nothing. Logs:
# $STATE/logs/{etcd,kube-apiserver,...}.log. Fails naming the component that
# did not build or become healthy, and its log.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Why 1.34: these machines' cgroups are v1 (hybrid), and kubelet 1.35+
# refuses cgroup v1 unless its config sets failCgroupV1: false (KEP-5573).
K8S_LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34 \
-X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

go_key() {
  { cat "$1/go.mod" "$1/go.sum"; go version; echo "$2"; } | sha256sum | cut -c1-16
}

# Sets BIN to the directory holding kube-*, kubelet, etcd and coredns.
build_binaries() {
  command -v go >/dev/null || die "go is not installed (the cluster is built from Go modules)"
  local k8s="$CLUSTER_HERE/build" dns="$CLUSTER_HERE/coredns"
  BIN="$CACHE/bin/$(go_key "$k8s" "$K8S_LDFLAGS")-$(go_key "$dns" "")"
  if [ -f "$BIN/.complete" ]; then
    log "binaries: cached in $BIN"
    return 0
  fi
  mkdir -p "$BIN"
  log "binaries: building Kubernetes $K8S_VERSION and etcd (cold: about 6 minutes on 2 cores)"
  (cd "$k8s" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$K8S_LDFLAGS" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy) ||
    die "go build of Kubernetes failed (integration/cluster/build)"
  (cd "$k8s" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3) ||
    die "go build of etcd failed (integration/cluster/build)"
  log "binaries: building CoreDNS"
  (cd "$dns" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$BIN/coredns" github.com/coredns/coredns) ||
    die "go build of CoreDNS failed (integration/cluster/coredns)"
  touch "$BIN/.complete"
}

# Sets KANIKO_BIN to the Kaniko executor built from kaniko/ (#19): the
# module github.com/osscontainertools/kaniko at the version its go.mod pins,
# with the release's version ldflag so that `executor version` names it.
build_kaniko() {
  local dir="$CLUSTER_HERE/kaniko" version ldflags
  version=$(awk '$1 == "require" && $2 == "github.com/osscontainertools/kaniko" { print $3 }' "$dir/go.mod")
  [ -n "$version" ] || die "integration/cluster/kaniko/go.mod does not require github.com/osscontainertools/kaniko"
  ldflags="-s -w -X github.com/osscontainertools/kaniko/pkg/version.version=$version"
  KANIKO_BIN="$CACHE/bin/kaniko-$(go_key "$dir" "$ldflags")/executor"
  if [ -x "$KANIKO_BIN" ]; then
    log "kaniko: cached in $KANIKO_BIN"
    return 0
  fi
  log "kaniko: building the executor $version (cold: about 2 minutes on 2 cores)"
  mkdir -p "$(dirname "$KANIKO_BIN")"
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" \
    -o "$KANIKO_BIN.tmp" github.com/osscontainertools/kaniko/cmd/executor) ||
    die "go build of the Kaniko executor failed (integration/cluster/kaniko)"
  mv -f "$KANIKO_BIN.tmp" "$KANIKO_BIN"
}

start_etcd() {
  mkdir -p "$STATE/etcd"
  chmod 700 "$STATE/etcd"
  # --unsafe-no-fsync: a throwaway test cluster on a shared disk; fsync per
  # write would only slow every API call.
  start etcd "$BIN/etcd" --name default --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --unsafe-no-fsync --log-level warn
  wait_until "etcd (log: $STATE/logs/etcd.log)" 60 curl -fsS --max-time 5 http://127.0.0.1:2379/health
}

start_apiserver() {
  local p="$STATE/pki"
  # Pod Security admission and RBAC are on as in any 1.34 cluster
  # (PodSecurity is a default admission plugin); NodeRestriction as kubeadm
  # sets it.
  start kube-apiserver "$BIN/kube-apiserver" \
    --advertise-address="$HOST_IP" --bind-address="$HOST_IP" --secure-port=6443 \
    --etcd-servers=http://127.0.0.1:2379 \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" \
    --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" --kubelet-client-key="$p/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true --profiling=false
  wait_until "kube-apiserver /readyz (log: $STATE/logs/kube-apiserver.log)" 120 kctl get --raw /readyz
}

start_controllers() {
  local p="$STATE/pki"
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --cluster-cidr="$POD_CIDR"
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false
  wait_until "kube-controller-manager (log: $STATE/logs/kube-controller-manager.log)" 60 \
    curl -fsSk --max-time 5 https://127.0.0.1:10257/healthz
  wait_until "kube-scheduler (log: $STATE/logs/kube-scheduler.log)" 60 \
    curl -fsSk --max-time 5 https://127.0.0.1:10259/healthz
}

# The nodes' upstream resolver: NXDOMAIN for everything, as a VPC resolver
# answers for cluster-internal names.
# The site resolver's Corefile: every name NXDOMAIN (nothing is looked up
# outside), except the stand-in upstream registries (stand-in.sh, #20),
# which answer from $STATE/site-dns/hosts under the real names (docker.io,
# registry-1.docker.io). Their zones get a server block of their own:
# CoreDNS runs template before hosts whatever the Corefile's order, so one
# block could not hold both. `reload` picks up a rewritten Corefile.
site_dns_corefile() {
  local zones
  zones=$(sed -e 's/#.*//' "$STATE/site-dns/hosts" | awk 'NF > 1 { for (i = 2; i <= NF; i++) printf "%s:53 ", $i }')
  {
    printf '.:53 {\n    bind %s\n    reload 2s 1s\n    template ANY ANY {\n        rcode NXDOMAIN\n    }\n}\n' "$HOST_IP"
    if [ -n "$zones" ]; then
      printf '%s{\n    bind %s\n    hosts %s {\n        ttl 5\n        reload 1s\n    }\n}\n' "$zones" "$HOST_IP" "$STATE/site-dns/hosts"
    fi
  } >"$STATE/site-dns/Corefile.tmp"
  mv "$STATE/site-dns/Corefile.tmp" "$STATE/site-dns/Corefile"
}

start_site_dns() {
  mkdir -p "$STATE/site-dns"
  touch "$STATE/site-dns/hosts"
  site_dns_corefile
  start site-dns "$BIN/coredns" -conf "$STATE/site-dns/Corefile"
  wait_until "the site resolver on $HOST_IP:53 (log: $STATE/logs/site-dns.log)" 30 \
    bash -c "exec 3<>/dev/tcp/$HOST_IP/53"
}
