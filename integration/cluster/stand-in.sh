# shellcheck shell=bash
# Stand-in upstream registries for the mirror (#20): a public registry such
# as docker.io, played on this machine, so that the mirror can be tried and
# tested in the test cluster with nothing leaving the machine.
#
#   stand_in NAME        starts (or restarts) the stand-in for NAME: the
#                        Debian docker-registry (distribution 2.8) on
#                        IP:5000, plain HTTP, for pushing test images, and
#                        nginx on IP:443 with a certificate for NAME (and
#                        registry-1.docker.io, index.docker.io for
#                        docker.io) from the stand-in CA, logging every
#                        request. IP is an address of its own on the
#                        cluster bridge; the site resolver answers NAME with
#                        it, so the nodes and, through CoreDNS, the pods
#                        reach it under the real name. The CA goes to the
#                        cluster as ConfigMap shared-services/
#                        slipway-mirror-ca (key ca.crt), which
#                        overlay-mirror gives the gateway (the namespace
#                        is made if the install has not run yet). Prints
#                        PUSH=IP:5000 and LOG=<access log>, the log's lines
#                        being `METHOD URI STATUS BYTES`.
#   stand_in_stop NAME   stops both processes, as an outage would: the name
#                        still resolves, and connections are refused. The
#                        data and the log stay; stand_in NAME starts it
#                        again with them.
#
# `down` stops every stand-in and removes their files with the cluster's
# state. Fails naming the process and its log.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/cluster/control.sh
. "$(dirname "${BASH_SOURCE[0]}")/control.sh"

STAND_IN="$STATE/stand-in"

stand_in_names() { # NAME: the names its certificate and DNS entry carry
  case "$1" in
    docker.io) echo "docker.io registry-1.docker.io index.docker.io" ;;
    *) echo "$1" ;;
  esac
}

# The stand-in's own address on the bridge: 198.19.0.100 + its number,
# kept in its directory so that a restart keeps it.
stand_in_ip() { # NAME
  local dir="$STAND_IN/$1" n
  if [ ! -f "$dir/ip" ]; then
    n=$(find "$STAND_IN" -mindepth 2 -maxdepth 2 -name ip 2>/dev/null | wc -l)
    [ "$n" -lt 50 ] || die "stand-in: at most 50 stand-ins"
    echo "198.19.0.$((100 + n))" >"$dir/ip"
  fi
  cat "$dir/ip"
}

stand_in_ca() {
  [ -f "$STAND_IN/ca.crt" ] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=slipway test stand-in CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
    -keyout "$STAND_IN/ca.key.tmp" -out "$STAND_IN/ca.crt.tmp" 2>>"$STAND_IN/openssl.log" ||
    die "stand-in: the CA (log: $STAND_IN/openssl.log)"
  mv "$STAND_IN/ca.key.tmp" "$STAND_IN/ca.key"
  mv "$STAND_IN/ca.crt.tmp" "$STAND_IN/ca.crt"
}

stand_in_cert() { # NAME DIR
  local name=$1 dir=$2 san="" n
  for n in $(stand_in_names "$name"); do
    san+="${san:+,}DNS:$n"
  done
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$name" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>>"$STAND_IN/openssl.log" &&
    openssl x509 -req -in "$dir/tls.csr" -CA "$STAND_IN/ca.crt" -CAkey "$STAND_IN/ca.key" \
      -CAcreateserial -days 30 -out "$dir/tls.crt" \
      -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") \
      2>>"$STAND_IN/openssl.log" ||
    die "stand-in: the certificate for $name (log: $STAND_IN/openssl.log)"
}

stand_in() {
  [ $# = 1 ] && [[ "$1" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] ||
    die "usage: bash integration/cluster.sh stand-in NAME (a registry host name, e.g. docker.io)"
  [ -f "$STATE/admin.kubeconfig" ] || die "the cluster is not up (bash integration/cluster.sh up)"
  local b
  for b in docker-registry nginx openssl curl; do
    command -v "$b" >/dev/null || die "stand-in: $b is missing (bash integration/install-deps.sh as root)"
  done
  local name=$1 dir ip n
  dir="$STAND_IN/$name"
  mkdir -p "$dir/data" "$dir/nginx"
  stand_in_ca
  ip=$(stand_in_ip "$name")
  [ -f "$dir/tls.crt" ] || stand_in_cert "$name" "$dir"
  ip -o addr show dev "$BRIDGE" | grep -qF " $ip/" || ip addr add "$ip/24" dev "$BRIDGE"

  cat >"$dir/registry.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: $ip:5000
EOF
  # The access log is the upstream's view: what the mirror (or anything
  # else) asked it, in order.
  cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log;
events { worker_connections 256; }
http {
  client_body_temp_path $dir/nginx/body;
  proxy_temp_path $dir/nginx/proxy;
  fastcgi_temp_path $dir/nginx/fastcgi;
  uwsgi_temp_path $dir/nginx/uwsgi;
  scgi_temp_path $dir/nginx/scgi;
  log_format standin '\$request_method \$request_uri \$status \$body_bytes_sent';
  access_log $dir/access.log standin;
  server {
    listen $ip:443 ssl;
    server_name $(stand_in_names "$name");
    ssl_certificate $dir/tls.crt;
    ssl_certificate_key $dir/tls.key;
    client_max_body_size 0;
    location / {
      proxy_pass http://$ip:5000;
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-Proto https;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }
  }
}
EOF
  touch "$dir/access.log"
  start "stand-in-$name-registry" docker-registry serve "$dir/registry.yml"
  start "stand-in-$name-tls" nginx -c "$dir/nginx.conf" -g 'daemon off;'

  # The names, for the nodes (site resolver) and the pods (CoreDNS forwards
  # to it). Replaced, not appended, on a restart.
  local hosts="$STATE/site-dns/hosts"
  grep -qF "reload" "$STATE/site-dns/Corefile" ||
    die "stand-in: the site resolver does not reload its Corefile: this cluster was started by an older cluster.sh (down, then up)"
  {
    grep -v " # stand-in $name\$" "$hosts" 2>/dev/null || true
    echo "$ip $(stand_in_names "$name") # stand-in $name"
  } >"$hosts.tmp"
  mv "$hosts.tmp" "$hosts"
  site_dns_corefile

  # The install's namespace, made here if the install has not run yet (the
  # install then labels it); overlay-mirror's registry pod waits for this.
  if ! kctl get namespace shared-services >/dev/null 2>&1; then
    kctl create namespace shared-services >/dev/null
    log "stand-in: created namespace shared-services for ConfigMap slipway-mirror-ca"
  fi
  kctl -n shared-services create configmap slipway-mirror-ca --from-file=ca.crt="$STAND_IN/ca.crt" \
    --dry-run=client -o yaml | kctl apply -f - >/dev/null

  wait_until "stand-in $name's registry on $ip:5000 (log: $STATE/logs/stand-in-$name-registry.log)" 30 \
    curl -fsS "http://$ip:5000/v2/"
  wait_until "stand-in $name's TLS on $ip:443 (log: $dir/nginx/error.log)" 30 \
    curl -fsS --cacert "$STAND_IN/ca.crt" --resolve "$name:443:$ip" "https://$name/v2/"
  # The site resolver re-reads its hosts file every 2 s; the nodes must see
  # the name before anyone pulls.
  for n in "${NODES[@]}"; do
    wait_until "$n to resolve $name to $ip (site resolver: $STATE/logs/site-dns.log)" 30 \
      node_resolves "$n" "$name" "$ip"
  done
  echo "PUSH=$ip:5000"
  echo "LOG=$dir/access.log"
}

node_resolves() { # NODE NAME IP
  in_node "$1" getent hosts "$2" | grep -qF "$3"
}

stand_in_stop() {
  [ $# = 1 ] && [ -n "$1" ] || die "usage: bash integration/cluster.sh stand-in-stop NAME"
  [ -d "$STAND_IN/$1" ] || die "stand-in-stop: no stand-in $1 (started: $(find "$STAND_IN" -mindepth 1 -maxdepth 1 -type d -printf '%f ' 2>/dev/null))"
  stop "stand-in-$1-tls"
  stop "stand-in-$1-registry"
  log "stand-in $1 stopped"
}

# For down: every stand-in's processes.
stand_in_stop_all() {
  local d
  for d in "$STAND_IN"/*/; do
    [ -d "$d" ] || continue
    d=$(basename "$d")
    stop "stand-in-$d-tls"
    stop "stand-in-$d-registry"
  done
}
