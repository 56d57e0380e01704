# shellcheck shell=bash
# The test cluster's own PKI and kubeconfigs (#17), with openssl: what
# `kubeadm init phase certs` and `init phase kubeconfig` make, without
# building kubeadm. Files in $STATE/pki and $STATE/*.kubeconfig; made once
# and kept (a second `up` reuses them, so kubeconfigs handed out stay valid).
#
# Identities, as the API server's bootstrap RBAC expects them:
#   admin                   O=system:masters
#   kube-controller-manager CN=system:kube-controller-manager
#   kube-scheduler          CN=system:kube-scheduler
#   kube-proxy              CN=system:kube-proxy (bootstrap binding
#                           system:node-proxier)
#   node NAME               CN=system:node:NAME, O=system:nodes (Node
#                           authorizer and NodeRestriction)
#   apiserver -> kubelet    O=system:masters
# Fails naming the certificate whose openssl step failed.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PKI="$STATE/pki"

pki_key() {
  [ -f "$PKI/$1.key" ] || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/$1.key" 2>/dev/null
}

# pki_cert NAME SUBJECT [SAN] [serverAuth|clientAuth]
pki_cert() {
  local name=$1 subj=$2 san=${3:-} usage=${4:-clientAuth} ext
  [ -f "$PKI/$name.crt" ] && return 0
  pki_key "$name"
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } >"$ext"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null ||
    die "pki: openssl req for $name failed"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$ext" -out "$PKI/$name.crt.tmp" 2>/dev/null ||
    die "pki: signing $name failed"
  mv "$PKI/$name.crt.tmp" "$PKI/$name.crt"
  rm -f "$ext" "$PKI/$name.csr"
}

pki_kubeconfig() {
  local name=$1 file="$STATE/$1.kubeconfig"
  [ -f "$file" ] && return 0
  kubectl config --kubeconfig "$file.tmp" set-cluster slipway --server="$APISERVER" \
    --certificate-authority="$PKI/ca.crt" --embed-certs=true >/dev/null
  kubectl config --kubeconfig "$file.tmp" set-credentials "$name" \
    --client-certificate="$PKI/$name.crt" --client-key="$PKI/$name.key" --embed-certs=true >/dev/null
  kubectl config --kubeconfig "$file.tmp" set-context default --cluster=slipway --user="$name" >/dev/null
  kubectl config --kubeconfig "$file.tmp" use-context default >/dev/null
  mv "$file.tmp" "$file"
}

pki_all() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  if [ ! -f "$PKI/ca.crt" ]; then
    pki_key ca
    openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=slipway-test-cluster-ca" -days 30 -sha256 \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$PKI/ca.crt" 2>/dev/null || die "pki: the cluster CA failed"
  fi
  pki_cert apiserver "/CN=kube-apiserver" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:$API_SERVICE_IP,IP:$HOST_IP,IP:127.0.0.1" \
    serverAuth
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  pki_cert admin "/O=system:masters/CN=kubernetes-admin"
  pki_cert kube-controller-manager "/CN=system:kube-controller-manager"
  pki_cert kube-scheduler "/CN=system:kube-scheduler"
  pki_cert kube-proxy "/CN=system:kube-proxy"
  local node
  for node in "${NODES[@]}"; do
    pki_cert "$node" "/O=system:nodes/CN=system:node:$node"
    pki_kubeconfig "$node"
  done
  [ -f "$PKI/sa.key" ] || pki_key sa
  [ -f "$PKI/sa.pub" ] || openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  local c
  for c in admin kube-controller-manager kube-scheduler kube-proxy; do
    pki_kubeconfig "$c"
  done
}
