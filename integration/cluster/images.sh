#!/usr/bin/env bash
# Builds the container images the issue-17 test cluster runs, from this
# machine's files only (no registry is reachable), and imports them into a
# node's containerd.
#
#   images.sh build OUTDIR
#   images.sh import CTR SOCKET OUTDIR
#
# `build` writes one docker-archive tarball per image, OUTDIR/<file>.tar, that
# carries its reference (so `ctr images import` tags it), and OUTDIR/images.txt
# with one `<file>.tar <reference>` line per image. Every image is linux/amd64,
# a single layer, all files owned by root (unless said otherwise), mtimes and
# the config's `created` and the one history entry fixed at
# SOURCE_DATE_EPOCH (default 0):
#
#   slipway.tar   localhost/slipway/slipway:cluster
#       $SLIPWAY_BIN (glibc, dynamic) at /slipway, every library `ldd` lists
#       and the dynamic loader at their host paths, /etc/passwd and /etc/group
#       (root 0, nobody 65534, nonroot 65532), /etc/nsswitch.conf, the host's
#       CA bundle at /etc/ssl/certs/ca-certificates.crt, /tmp (1777), /root.
#       Entrypoint ["/slipway"], no Cmd, user root: a stand-in for
#       daemonset/image/Dockerfile (distroless static).
#   registry.tar  localhost/slipway/registry:2.8
#       Debian's docker-registry (distribution 2.8) /usr/bin/docker-registry
#       at /bin/registry plus its libraries, the config.yml the official
#       registry:2 image ships, static busybox at /bin/busybox with all its
#       applets linked in /bin (the probes run wget), /var/lib/registry, /tmp.
#       Entrypoint ["/bin/registry"], Cmd ["serve", "/etc/docker/registry/config.yml"].
#   pause.tar     localhost/slipway/pause:3.10
#       Kubernetes' build/pause/linux/pause.c ($PAUSE_C, default from the Go
#       module cache, k8s.io/kubernetes@v1.34.4) compiled with
#       `gcc -Os -static -DVERSION=3.10` and stripped, at /pause.
#       Entrypoint ["/pause"], user 65535:65535 as upstream.
#   coredns.tar   localhost/slipway/coredns:cluster
#       $COREDNS_BIN at /coredns (plus libraries if it is not static) and the
#       CA bundle. Entrypoint ["/coredns"]. Skipped, with a note on stderr,
#       while COREDNS_BIN is unset.
#   busybox.tar   localhost/slipway/busybox:cluster
#       Debian's busybox-static /bin/busybox with every applet
#       (`busybox --list`) linked in /bin, passwd/group, /tmp.
#       Cmd ["sh"], Env PATH=/bin. The test workload.
#   kaniko.tar    localhost/slipway/kaniko:v1.27.5-debug
#       $KANIKO_BIN (the executor, static) laid out as the official -debug
#       image (osscontainertools/kaniko deploy/Dockerfile, kaniko-debug):
#       /kaniko/executor, /kaniko/ssl/certs/ca-certificates.crt,
#       /kaniko/.docker, /kaniko mode 0777, /etc/nsswitch.conf, static busybox
#       with its applets in /busybox (an image VOLUME, as upstream), /bin/sh
#       -> /busybox/sh, /workspace. Entrypoint ["/kaniko/executor"], Env as
#       upstream (PATH=/usr/local/bin:/kaniko:/busybox, SSL_CERT_DIR,
#       DOCKER_CONFIG=/kaniko/.docker/, HOME=/root, USER=root). Skipped,
#       with a note, while KANIKO_BIN is unset.
#   git.tar       localhost/slipway/git:debian
#       A minimal Debian root: the files of this machine's installed
#       packages git, dash, coreutils, grep, sed, mawk, findutils and
#       openssh-client and of everything they depend on (Depends and
#       Pre-Depends, first installed alternative), without documentation,
#       /bin/sh -> dash, passwd/group, /tmp. Cmd ["sh"]. The build Job's git
#       container, in place of alpine/git, and the git-serve server.
#   gcc.tar       localhost/slipway/gcc:debian   (in bases.txt, not imported)
#       The same kind of root with gcc and libc6-dev (and make): the base
#       image the build tests and `cargo bench --bench build` push to the
#       in-cluster registry, so that a Dockerfile's FROM resolves there.
#
# OUTDIR/bases.txt lists, in the same form as images.txt, the images that
# are for the in-cluster registry, not for the nodes (busybox.tar is in both).
#
# Inputs (environment): SLIPWAY_BIN (required), COREDNS_BIN (optional),
# KANIKO_BIN (optional),
# PAUSE_C, REGISTRY_BIN (default /usr/bin/docker-registry), BUSYBOX_BIN
# (default /bin/busybox), CA_CERTS (default /etc/ssl/certs/ca-certificates.crt),
# SOURCE_DATE_EPOCH. Tools: umoci, skopeo, gcc (libc6-dev), ldd.
#
# An image whose tarball is newer than all its inputs (including this
# script), and that was built from the same input files (paths, sizes and
# mtimes, kept in OUTDIR/.<file>.inputs), is not rebuilt. Everything is built
# in a private work directory in OUTDIR (an OCI layout made with umoci, then
# `skopeo copy` to docker-archive) and renamed into place only when complete,
# images.txt last: a failed run never leaves a tarball or list that looks
# complete. Runs as root, or as any user (umoci --rootless; the same bytes).
#
# `import` runs `CTR --address SOCKET -n k8s.io images import` on every
# tarball in OUTDIR/images.txt (ctr unpacks into the snapshotter on import;
# $SNAPSHOTTER, if set, is passed as --snapshotter; where ctr has --local,
# 1.7 and 2.x, it is passed to use the client-side import of 1.6), then
# checks with `images ls -q` that every reference is present and with
# `images check` that it is unpacked. Tested with containerd 1.6, 1.7, 2.1.
#
# Failure: any missing input or tool stops the run with a message naming it
# (e.g. "images.sh: SLIPWAY_BIN is not set", "images.sh: /usr/bin/docker-registry
# missing: apt-get install docker-registry") and a non-zero exit; the work
# directory is removed on every exit.
set -Eeuo pipefail
shopt -s inherit_errexit
umask 022

PROG=images.sh
SELF=$(readlink -f "${BASH_SOURCE[0]}")

die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }
# Any other failing command is named too (its own message comes first).
on_err() { local rc=$?; note "failed (exit $rc): $BASH_COMMAND"; exit "$rc"; }
trap on_err ERR

usage() {
  cat >&2 <<EOF
usage: $PROG build OUTDIR
       $PROG import CTR SOCKET OUTDIR
EOF
  exit 2
}

need_tool() { # NAME DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2"
}

need_file() { # PATH HINT
  [ -f "$1" ] || die "$1 missing${2:+: $2}"
}

# The absolute paths of the shared objects (libraries and the dynamic loader)
# that `ldd` lists for BINARY; nothing for a static binary.
shared_deps() { # BINARY
  local out
  if ! out=$(LC_ALL=C ldd "$1" 2>&1); then
    case "$out" in
      *'not a dynamic executable'*) return 0 ;;
      *) die "ldd $1 failed: $out" ;;
    esac
  fi
  case "$out" in
    *'statically linked'*) return 0 ;;
    *'not found'*) die "ldd $1: a library is missing: $out" ;;
  esac
  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
  # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no path.
  awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' <<<"$out"
}

is_static() { # BINARY
  local deps
  deps=$(shared_deps "$1") || exit 1
  [ -z "$deps" ]
}

# Copies BINARY to ROOTFS/DEST and every shared object it needs to the same
# path under ROOTFS (dereferencing symlinks).
copy_binary() { # ROOTFS BINARY DEST
  local rootfs=$1 bin=$2 dest=$3 deps lib
  deps=$(shared_deps "$bin") || exit 1
  mkdir -p "$rootfs$(dirname "$dest")"
  cp -L "$bin" "$rootfs$dest"
  chmod 0755 "$rootfs$dest"
  while IFS= read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done <<<"$deps"
}

add_ca_certs() { # ROOTFS
  mkdir -p "$1/etc/ssl/certs"
  cp -L "$CA_CERTS" "$1/etc/ssl/certs/ca-certificates.crt"
  chmod 0644 "$1/etc/ssl/certs/ca-certificates.crt"
}

# The users and groups of distroless static.
add_users() { # ROOTFS
  mkdir -p "$1/etc"
  cat >"$1/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$1/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  chmod 0644 "$1/etc/passwd" "$1/etc/group"
  mkdir -p "$1/root"
  chmod 0700 "$1/root"
}

add_tmp() { # ROOTFS
  mkdir -p "$1/tmp"
  chmod 1777 "$1/tmp"
}

add_busybox() { # ROOTFS
  local rootfs=$1 applet
  mkdir -p "$rootfs/bin"
  cp -L "$BUSYBOX_BIN" "$rootfs/bin/busybox"
  chmod 0755 "$rootfs/bin/busybox"
  while IFS= read -r applet; do
    case "$applet" in ''|busybox|*/*) continue ;; esac
    [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
  done < <("$BUSYBOX_BIN" --list)
  for applet in sh wget cat ls; do
    [ -L "$rootfs/bin/$applet" ] || die "$BUSYBOX_BIN has no $applet applet"
  done
}

# --- minimal Debian roots from this machine's installed packages.

# The installed packages PKG... and everything they depend on (Depends and
# Pre-Depends; of alternatives the first installed one), one per line.
deb_closure() { # PKG...
  local -A seen=()
  local queue=("$@") pkg deps alt name
  while [ ${#queue[@]} -gt 0 ]; do
    pkg=${queue[0]}
    queue=("${queue[@]:1}")
    [ -z "${seen[$pkg]:-}" ] || continue
    deps=$(dpkg-query -W -f='${db:Status-Status}|${Depends}, ${Pre-Depends}' "$pkg" 2>/dev/null) ||
      die "package $pkg is not installed (apt-get install $pkg)"
    [ "${deps%%|*}" = installed ] || die "package $pkg is not installed (apt-get install $pkg)"
    seen[$pkg]=1
    printf '%s\n' "$pkg"
    while IFS= read -r alt; do
      [ -n "$alt" ] || continue
      # "a (>= 1) | b:any" -> the first alternative that is installed.
      for name in $(sed -e 's/([^)]*)//g' -e 's/:any//g' -e 's/|/ /g' <<<"$alt"); do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$name" 2>/dev/null)" = installed ]; then
          queue+=("$name")
          break
        fi
      done
    done < <(tr ',' '\n' <<<"${deps#*|}")
  done
}

# Copies the files of PKG... and their dependencies into ROOTFS, at their
# real paths (the merged-/usr links of this machine are made first, so
# /bin/x lands in /usr/bin/x), leaving out documentation.
add_debian_packages() { # ROOTFS PKG...
  local rootfs=$1 d path
  shift
  for d in bin sbin lib lib64; do
    if [ -L "/$d" ]; then
      mkdir -p "$rootfs/$(readlink "/$d")"
      ln -sfn "$(readlink "/$d")" "$rootfs/$d"
    fi
  done
  while IFS= read -r path; do
    case "$path" in
      /.|/bin|/sbin|/lib|/lib64|/usr/share/doc/*|/usr/share/man/*|/usr/share/info/*|/usr/share/locale/*|/usr/share/lintian/*) continue ;;
    esac
    # Directories come with the files in them; a path another package
    # diverted (dash's /bin/sh) may be missing.
    if [ -d "$path" ] && [ ! -L "$path" ]; then continue; fi
    [ -e "$path" ] || [ -L "$path" ] || continue
    printf '%s\0' "${path#/}"
  done < <(deb_closure "$@" | xargs dpkg -L 2>/dev/null) |
    # From /, with relative paths: coreutils 9.1's cp --parents sets the
    # copied parents' modes by the path relative to the working directory.
    (cd / && xargs -0 -r cp -a --parents -t "$rootfs")
}

debian_root() { # ROOTFS PKG...
  local rootfs=$1
  shift
  add_debian_packages "$rootfs" "$@"
  ln -sfn dash "$rootfs/usr/bin/sh"
  # Alternatives (update-alternatives links) are not in any package list.
  [ ! -e "$rootfs/usr/bin/mawk" ] || ln -sfn mawk "$rootfs/usr/bin/awk"
  [ ! -e "$rootfs/usr/bin/gcc" ] || ln -sfn gcc "$rootfs/usr/bin/cc"
  add_users "$rootfs"
  add_tmp "$rootfs"
}

GIT_PACKAGES=(git dash coreutils grep sed mawk findutils openssh-client)
GCC_PACKAGES=(gcc libc6-dev make dash coreutils grep sed mawk findutils)

# --- the images: inputs_NAME lists the files the image is made from,
# populate_NAME fills its rootfs, config_NAME sets CFG (umoci config flags).

inputs_slipway() { printf '%s\n' "$SLIPWAY_BIN" "$CA_CERTS"; shared_deps "$SLIPWAY_BIN"; }
populate_slipway() {
  copy_binary "$1" "$SLIPWAY_BIN" /slipway
  add_users "$1"
  add_ca_certs "$1"
  add_tmp "$1"
  printf 'hosts: files dns\n' >"$1/etc/nsswitch.conf"
}
config_slipway() {
  CFG=(--config.entrypoint /slipway --config.user 0
       --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
       --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
       --config.workingdir /)
}

inputs_registry() { printf '%s\n' "$REGISTRY_BIN" "$BUSYBOX_BIN"; shared_deps "$REGISTRY_BIN"; }
populate_registry() {
  copy_binary "$1" "$REGISTRY_BIN" /bin/registry
  add_busybox "$1"
  add_tmp "$1"
  mkdir -p "$1/var/lib/registry" "$1/etc/docker/registry"
  # As in the official image (distribution-library-image, registry:2).
  cat >"$1/etc/docker/registry/config.yml" <<'EOF'
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
  chmod 0644 "$1/etc/docker/registry/config.yml"
}
config_registry() {
  CFG=(--config.entrypoint /bin/registry
       --config.cmd serve --config.cmd /etc/docker/registry/config.yml
       --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
       --config.exposedports 5000/tcp --config.volume /var/lib/registry
       --config.workingdir /)
}

inputs_pause() { printf '%s\n' "$PAUSE_C"; }
populate_pause() {
  # upstream: gcc -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV), strip
  gcc -Os -static -DVERSION=3.10 -o "$1/pause" "$PAUSE_C" \
    || die "gcc failed to compile $PAUSE_C (is libc6-dev installed?)"
  strip "$1/pause"
  chmod 0755 "$1/pause"
}
config_pause() {
  CFG=(--config.entrypoint /pause --config.user 65535:65535 --config.workingdir /)
}

inputs_coredns() { printf '%s\n' "$COREDNS_BIN" "$CA_CERTS"; shared_deps "$COREDNS_BIN"; }
populate_coredns() {
  copy_binary "$1" "$COREDNS_BIN" /coredns
  add_ca_certs "$1"
}
config_coredns() {
  CFG=(--config.entrypoint /coredns
       --config.exposedports 53/tcp --config.exposedports 53/udp
       --config.workingdir /)
}

inputs_busybox() { printf '%s\n' "$BUSYBOX_BIN"; }
populate_busybox() {
  add_busybox "$1"
  add_users "$1"
  add_tmp "$1"
}
config_busybox() {
  CFG=(--config.cmd sh --config.env PATH=/bin --config.workingdir /)
}

inputs_kaniko() { printf '%s\n' "$KANIKO_BIN" "$BUSYBOX_BIN" "$CA_CERTS"; }
populate_kaniko() {
  local rootfs=$1 applet
  mkdir -p "$rootfs/kaniko/ssl/certs" "$rootfs/kaniko/.docker" "$rootfs/busybox" \
    "$rootfs/bin" "$rootfs/etc" "$rootfs/workspace"
  chmod 0777 "$rootfs/kaniko"
  cp -L "$KANIKO_BIN" "$rootfs/kaniko/executor"
  chmod 0755 "$rootfs/kaniko/executor"
  cp -L "$CA_CERTS" "$rootfs/kaniko/ssl/certs/ca-certificates.crt"
  chmod 0644 "$rootfs/kaniko/ssl/certs/ca-certificates.crt"
  cp -L "$BUSYBOX_BIN" "$rootfs/busybox/busybox"
  chmod 0755 "$rootfs/busybox/busybox"
  while IFS= read -r applet; do
    case "$applet" in ''|busybox|*/*) continue ;; esac
    ln -sf busybox "$rootfs/busybox/$applet"
  done < <("$BUSYBOX_BIN" --list)
  ln -s /busybox/sh "$rootfs/bin/sh"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
}
config_kaniko() {
  CFG=(--config.entrypoint /kaniko/executor
       --config.env HOME=/root --config.env USER=root
       --config.env PATH=/usr/local/bin:/kaniko:/busybox
       --config.env SSL_CERT_DIR=/kaniko/ssl/certs
       --config.env DOCKER_CONFIG=/kaniko/.docker/
       --config.env DOCKER_CREDENTIAL_GCR_CONFIG=/kaniko/.config/gcloud/docker_credential_gcr_config.json
       --config.volume /busybox --config.workingdir /workspace)
}

# A Debian root's inputs: the package list of each package in its closure
# (whose mtime changes when the package is upgraded).
deb_inputs() { # PKG...
  deb_closure "$@" | while IFS= read -r p; do
    for f in "/var/lib/dpkg/info/$p.list" "/var/lib/dpkg/info/$p:amd64.list"; do
      [ ! -f "$f" ] || printf '%s\n' "$f"
    done
  done
}

inputs_git() { deb_inputs "${GIT_PACKAGES[@]}"; }
populate_git() { debian_root "$1" "${GIT_PACKAGES[@]}"; }
config_git() {
  CFG=(--config.cmd sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
       --config.workingdir /)
}

inputs_gcc() { deb_inputs "${GCC_PACKAGES[@]}"; }
populate_gcc() { debian_root "$1" "${GCC_PACKAGES[@]}"; }
config_gcc() { config_git; }

# The stamp of NAME's inputs: path, size and mtime of each (and this script),
# and the epoch. A different stamp (SLIPWAY_BIN pointing at another, older
# file, say) rebuilds the image even when the tarball is newer.
stamp() { # NAME
  local inputs
  inputs=$("inputs_$1") || exit 1
  printf 'SOURCE_DATE_EPOCH=%s\n' "$EPOCH"
  # shellcheck disable=SC2046 # one path per line, none with blanks
  stat -L -c '%n %s %Y' "$SELF" $(printf '%s\n' "$inputs")
}

# Is OUTDIR/NAME.tar newer than every input of NAME and this script, and
# built from the same inputs (OUTDIR/.NAME.inputs)?
up_to_date() { # TAR NAME
  local tar=$1 name=$2 inputs input
  [ -f "$tar" ] && [ -f "$OUTDIR/.$name.inputs" ] || return 1
  inputs=$("inputs_$name") || exit 1
  while IFS= read -r input; do
    [ -n "$input" ] || continue
    [ "$input" -nt "$tar" ] && return 1
  done <<<"$SELF
$inputs"
  [ "$(stamp "$name")" = "$(cat "$OUTDIR/.$name.inputs")" ]
}

build_image() { # NAME REFERENCE
  local name=$1 ref=$2 tar="$OUTDIR/$1.tar"
  if up_to_date "$tar" "$name"; then
    note "$name.tar is up to date ($ref)"
    LIST+=("$name.tar $ref")
    return 0
  fi
  note "building $name.tar ($ref)"
  local bundle="$WORK/bundle-$name"
  stamp "$name" >"$WORK/$name.inputs"
  umoci new --image "$LAYOUT:$name"
  umoci unpack "${UMOCI_MODE[@]}" --image "$LAYOUT:$name" "$bundle"
  "populate_$name" "$bundle/rootfs"
  find "$bundle/rootfs" -exec touch -h -d "@$EPOCH" {} +
  # (repack reads --rootless from the bundle; the config comes after it
  # because repack leaves out the image's Volumes, /var/lib/registry.)
  umoci repack --image "$LAYOUT:$name" \
    --history.created "$CREATED" --history.created_by "integration/cluster/images.sh ($name)" \
    "$bundle"
  rm -rf "$bundle"
  CFG=()
  "config_$name"
  umoci config --no-history --image "$LAYOUT:$name" \
    --os linux --architecture amd64 --created "$CREATED" "${CFG[@]}"
  skopeo --insecure-policy copy --quiet \
    "oci:$LAYOUT:$name" "docker-archive:$WORK/$name.tar:$ref"
  rm -f "$OUTDIR/.$name.inputs"
  mv -f "$WORK/$name.tar" "$tar"
  mv -f "$WORK/$name.inputs" "$OUTDIR/.$name.inputs"
  LIST+=("$name.tar $ref")
}

cmd_build() {
  [ $# -eq 1 ] || usage
  OUTDIR=$1

  need_tool umoci umoci
  need_tool skopeo skopeo
  need_tool ldd libc-bin
  need_tool gcc gcc
  need_tool strip binutils

  # Every input is checked before anything is built.
  [ -n "${SLIPWAY_BIN:-}" ] || die "SLIPWAY_BIN is not set (the slipway release binary, e.g. target/release/slipway)"
  [ -f "$SLIPWAY_BIN" ] || die "SLIPWAY_BIN=$SLIPWAY_BIN: no such file"
  [ -x "$SLIPWAY_BIN" ] || die "SLIPWAY_BIN=$SLIPWAY_BIN is not executable"
  REGISTRY_BIN=${REGISTRY_BIN:-/usr/bin/docker-registry}
  need_file "$REGISTRY_BIN" "apt-get install docker-registry"
  BUSYBOX_BIN=${BUSYBOX_BIN:-/bin/busybox}
  need_file "$BUSYBOX_BIN" "apt-get install busybox-static"
  is_static "$BUSYBOX_BIN" || die "$BUSYBOX_BIN is dynamically linked: apt-get install busybox-static"
  CA_CERTS=${CA_CERTS:-/etc/ssl/certs/ca-certificates.crt}
  need_file "$CA_CERTS" "apt-get install ca-certificates"
  if [ -z "${PAUSE_C:-}" ]; then
    command -v go >/dev/null 2>&1 || die "PAUSE_C is not set and go is not in PATH to find the module cache"
    PAUSE_C="$(go env GOMODCACHE)/k8s.io/kubernetes@v1.34.4/build/pause/linux/pause.c"
  fi
  need_file "$PAUSE_C" "PAUSE_C (download the module: cd integration/cluster/build && go mod download k8s.io/kubernetes)"
  local images=(slipway registry pause busybox git)
  if [ -z "${COREDNS_BIN:-}" ]; then
    note "COREDNS_BIN is not set: skipping the coredns image"
  else
    [ -f "$COREDNS_BIN" ] || die "COREDNS_BIN=$COREDNS_BIN: no such file"
    [ -x "$COREDNS_BIN" ] || die "COREDNS_BIN=$COREDNS_BIN is not executable"
    images+=(coredns)
  fi
  if [ -z "${KANIKO_BIN:-}" ]; then
    note "KANIKO_BIN is not set: skipping the kaniko image"
  else
    [ -f "$KANIKO_BIN" ] || die "KANIKO_BIN=$KANIKO_BIN: no such file"
    is_static "$KANIKO_BIN" || die "KANIKO_BIN=$KANIKO_BIN is dynamically linked (build it with CGO_ENABLED=0)"
    images+=(kaniko)
  fi
  need_tool dpkg-query dpkg
  # Every package of the Debian roots is checked now.
  deb_closure "${GIT_PACKAGES[@]}" "${GCC_PACKAGES[@]}" >/dev/null
  # Library lists are resolved now so that a missing one fails here.
  shared_deps "$SLIPWAY_BIN" >/dev/null
  shared_deps "$REGISTRY_BIN" >/dev/null
  [ -z "${COREDNS_BIN:-}" ] || shared_deps "$COREDNS_BIN" >/dev/null

  EPOCH=${SOURCE_DATE_EPOCH:-0}
  CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  UMOCI_MODE=()
  [ "$(id -u)" -eq 0 ] || UMOCI_MODE=(--rootless)

  mkdir -p "$OUTDIR"
  OUTDIR=$(cd "$OUTDIR" && pwd)
  WORK=$(mktemp -d "$OUTDIR/.images-work.XXXXXX")
  # shellcheck disable=SC2064 # expand WORK now
  trap "rm -rf '$WORK'" EXIT
  LAYOUT="$WORK/oci"
  umoci init --layout "$LAYOUT"

  LIST=()
  local name
  for name in "${images[@]}"; do
    case "$name" in
      slipway) build_image slipway localhost/slipway/slipway:cluster ;;
      registry) build_image registry localhost/slipway/registry:2.8 ;;
      pause) build_image pause localhost/slipway/pause:3.10 ;;
      coredns) build_image coredns localhost/slipway/coredns:cluster ;;
      busybox) build_image busybox localhost/slipway/busybox:cluster ;;
      git) build_image git localhost/slipway/git:debian ;;
      kaniko) build_image kaniko localhost/slipway/kaniko:v1.27.5-debug ;;
    esac
  done
  local nodes=("${LIST[@]}")
  LIST=()
  build_image gcc localhost/slipway/gcc:debian
  printf '%s\n' "busybox.tar localhost/slipway/busybox:cluster" "${LIST[@]}" >"$WORK/bases.txt"
  mv -f "$WORK/bases.txt" "$OUTDIR/bases.txt"
  LIST=("${nodes[@]}")

  printf '%s\n' "${LIST[@]}" >"$WORK/images.txt"
  mv -f "$WORK/images.txt" "$OUTDIR/images.txt"
  note "wrote $OUTDIR/images.txt (${#LIST[@]} images)"
}

cmd_import() {
  [ $# -eq 3 ] || usage
  local ctr=$1 socket=$2 outdir=$3
  command -v "$ctr" >/dev/null 2>&1 || die "$ctr (CTR) not found or not executable"
  [ -S "${socket#unix://}" ] || die "$socket is not a unix socket (is containerd running?)"
  need_file "$outdir/images.txt" "run: $PROG build $outdir"

  local base=("$ctr" --address "$socket" --namespace k8s.io)
  local import=(images import) check=(images check)
  # ctr >= 2.0 imports through the transfer service unless --local, and
  # there (2.1.9) --snapshotter fails with "no unpack platforms defined";
  # --local is the client-side import that 1.6 (no such flag) and 1.7 (its
  # default) always do. Every release unpacks on import unless --no-unpack.
  local help
  help=$("$ctr" images import --help 2>&1) || true
  if grep -q -- '--local' <<<"$help"; then
    import+=(--local)
  fi
  if [ -n "${SNAPSHOTTER:-}" ]; then
    import+=(--snapshotter "$SNAPSHOTTER")
    check+=(--snapshotter "$SNAPSHOTTER")
  fi

  local file ref refs=()
  while read -r file ref; do
    case "$file" in ''|'#'*) continue ;; esac
    [ -n "$ref" ] || die "$outdir/images.txt: no reference for $file"
    need_file "$outdir/$file" "listed in $outdir/images.txt"
    note "importing $file ($ref)"
    "${base[@]}" "${import[@]}" "$outdir/$file" </dev/null >&2 \
      || die "ctr images import $outdir/$file failed"
    refs+=("$ref")
  done <"$outdir/images.txt"
  [ "${#refs[@]}" -gt 0 ] || die "$outdir/images.txt lists no image"

  # Present, and unpacked for the snapshotter: the last column of `images
  # check` (REF ... UNPACKED). Not `check -q`: 1.6 lists images there that
  # are complete but not unpacked.
  local present table unpacked
  present=$("${base[@]}" images ls -q) || die "ctr images ls failed"
  table=$("${base[@]}" "${check[@]}") || die "ctr images check failed"
  [ "$(awk 'NR == 1 { print $NF }' <<<"$table")" = UNPACKED ] \
    || die "ctr images check: no UNPACKED column in: $(head -1 <<<"$table")"
  unpacked=$(awk 'NR > 1 && $NF == "true" { print $1 }' <<<"$table")
  for ref in "${refs[@]}"; do
    grep -qxF "$ref" <<<"$present" || die "$ref is missing from containerd at $socket after import"
    grep -qxF "$ref" <<<"$unpacked" \
      || die "$ref is not unpacked${SNAPSHOTTER:+ for snapshotter $SNAPSHOTTER} in containerd at $socket"
  done
  note "imported ${#refs[@]} images into $socket (namespace k8s.io)"
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
  build) cmd_build "$@" ;;
  import) cmd_import "$@" ;;
  *) usage ;;
esac
