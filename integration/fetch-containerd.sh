#!/usr/bin/env bash
# Unpacks the containerd releases pinned in integration/containerd-releases
# (1.7 from Debian 13, 2.1 from sid) into a cache directory, once, without
# touching the system's packages: apt reads a private sources list, lists
# and package cache, `apt-get download` fetches the .deb and `dpkg -x`
# unpacks it. The binaries need only libc6 >= 2.34 and runc (both on
# Debian 12). integration/harness.rs finds them at
#   $SLIPWAY_CONTAINERD_CACHE/<debian-version>/usr/bin/containerd
# (default /var/cache/slipway/containerd).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${SLIPWAY_CONTAINERD_CACHE:-/var/cache/slipway/containerd}"
mkdir -p "$cache"
apt_dir="$cache/apt"

# Which pins are missing from the cache?
want=()
while read -r release version suite kind; do
  case "$release" in ''|'#'*) continue ;; esac
  [ "$kind" = fetched ] || continue
  if [ -f "$cache/$version/.complete" ]; then
    echo "fetch-containerd: containerd $release ($version) already in $cache/$version"
  else
    want+=("$release $version $suite")
  fi
done < integration/containerd-releases
[ "${#want[@]}" -gt 0 ] || exit 0

# A private apt state: only the suites the pins come from. The system's
# sources, lists and pkgcache stay as they are.
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/dl"
: > "$apt_dir/sources.list"
for w in "${want[@]}"; do
  suite="${w##* }"
  line="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
  grep -qxF "$line" "$apt_dir/sources.list" || echo "$line" >> "$apt_dir/sources.list"
done
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
  -o APT::Sandbox::User=root
)
apt-get -qq "${apt_opts[@]}" update

for w in "${want[@]}"; do
  read -r release version suite <<<"$w"
  rm -f "$apt_dir/dl"/*.deb
  if ! (cd "$apt_dir/dl" && apt-get -qq "${apt_opts[@]}" download "containerd=$version"); then
    echo "fetch-containerd: containerd=$version (release $release) is not in Debian $suite any more;" >&2
    echo "the archive now has:" >&2
    apt-cache "${apt_opts[@]}" madison containerd >&2 || true
    echo "update the pin in integration/containerd-releases" >&2
    exit 1
  fi
  deb="$(find "$apt_dir/dl" -name 'containerd_*.deb' | head -1)"
  rm -rf "$cache/$version"
  mkdir -p "$cache/$version"
  dpkg -x "$deb" "$cache/$version"
  got="$("$cache/$version/usr/bin/containerd" --version)"
  case "$got" in
    *" $release."*) ;;
    *) echo "fetch-containerd: $deb unpacked a containerd that says: $got" >&2; exit 1 ;;
  esac
  touch "$cache/$version/.complete"
  rm -f "$deb"
  echo "fetch-containerd: containerd $release ($version) in $cache/$version: $got"
done
