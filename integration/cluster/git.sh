# shellcheck shell=bash
# Builds in the test cluster (#19): a git server the cluster's pods can
# reach, and the build images the nodes hold.
#
#   git_serve DIR   serves the git repository in DIR (a work tree or a bare
#                   repository) with `git daemon` in a pod of namespace
#                   slipway-git, from the node-imported git image; DIR is a
#                   read-only hostPath volume (every node shares this
#                   machine's disk), so later commits in DIR are served too.
#                   Prints the clone URL, git://git-NAME-HASH.slipway-git.
#                   svc.cluster.local:9418/NAME, as its last line (NAME from
#                   DIR's base name, HASH from its path). Serving DIR again
#                   reuses its pod.
#   build_env       prints SLIPWAY_BUILD_EXECUTOR_IMAGE=… and
#                   SLIPWAY_BUILD_GIT_IMAGE=… for the images `up` imported.
#
# The server is a plain pod: `down` stops it with its node, and removes
# the namespace with the cluster's state. Fails naming the directory, the
# image list or the pod (with its events) that is wrong.

# shellcheck source=integration/cluster/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GIT_NS=slipway-git

require_up() {
  [ -f "$STATE/admin.kubeconfig" ] && [ -f "$STATE/images.txt" ] ||
    die "the cluster is not up (bash integration/cluster.sh up)"
}

# The reference of the image in FILE (kaniko.tar, git.tar) among those
# `up` imported into the nodes.
imported_ref() { # FILE
  local ref
  ref=$(awk -v f="$1" '$1 == f { print $2 }' "$STATE/images.txt")
  [ -n "$ref" ] || die "$STATE/images.txt lists no $1: the nodes have no such image (bash integration/cluster.sh down, then up)"
  echo "$ref"
}

build_env() {
  require_up
  echo "SLIPWAY_BUILD_EXECUTOR_IMAGE=$(imported_ref kaniko.tar)"
  echo "SLIPWAY_BUILD_GIT_IMAGE=$(imported_ref git.tar)"
}

git_serve() {
  [ $# = 1 ] && [ -n "$1" ] || die "usage: bash integration/cluster.sh git-serve DIR"
  require_up
  local dir name image pod
  dir=$(cd "$1" 2>/dev/null && pwd -P) || die "git-serve: $1: no such directory"
  git -C "$dir" rev-parse --git-dir >/dev/null 2>&1 || die "git-serve: $dir is not a git repository"
  # A DNS label: lowercase letters, digits and '-', at most 40 of them.
  name=$(basename "$dir" | tr 'A-Z_.' 'a-z--' | tr -cd 'a-z0-9-' | sed -e 's/^-*//' -e 's/-*$//' | cut -c1-40)
  name=${name%.git}
  [ -n "$name" ] || name=repo
  image=$(imported_ref git.tar)
  # One server per directory: two directories of one name get two.
  pod="git-$name-$(printf %s "$dir" | sha256sum | cut -c1-8)"
  # privileged: the hostPath volume (Pod Security admission).
  kctl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $GIT_NS
  labels:
    pod-security.kubernetes.io/enforce: privileged
---
apiVersion: v1
kind: Service
metadata:
  name: $pod
  namespace: $GIT_NS
spec:
  selector:
    slipway.dev/git-serve: $pod
  ports:
  - name: git
    port: 9418
    targetPort: 9418
---
apiVersion: v1
kind: Pod
metadata:
  name: $pod
  namespace: $GIT_NS
  labels:
    app.kubernetes.io/name: git-serve
    slipway.dev/git-serve: $pod
  annotations:
    slipway.dev/dir: $dir
spec:
  automountServiceAccountToken: false
  enableServiceLinks: false
  containers:
  - name: git-daemon
    image: $image
    imagePullPolicy: Never
    # --export-all: DIR needs no git-daemon-export-ok. safe.directory: DIR
    # belongs to whoever made it, not to the daemon's uid (git >= 2.35.2).
    command: [git, daemon, --reuseaddr, --export-all, --informative-errors, --verbose,
              --listen=0.0.0.0, --port=9418, --base-path=/srv/git, /srv/git]
    env:
    - {name: GIT_CONFIG_COUNT, value: "1"}
    - {name: GIT_CONFIG_KEY_0, value: safe.directory}
    - {name: GIT_CONFIG_VALUE_0, value: "*"}
    ports:
    - containerPort: 9418
    readinessProbe:
      tcpSocket: {port: 9418}
      periodSeconds: 1
    volumeMounts:
    - {name: repo, mountPath: /srv/git/$name, readOnly: true}
  volumes:
  - name: repo
    hostPath: {path: $dir, type: Directory}
EOF
  if ! kctl -n "$GIT_NS" wait --for=condition=Ready "pod/$pod" --timeout=120s >/dev/null; then
    die "git-serve: pod $GIT_NS/$pod is not Ready: $(kctl -n "$GIT_NS" get events --field-selector "involvedObject.name=$pod" -o 'jsonpath={range .items[*]}{.reason}: {.message}; {end}' 2>&1)"
  fi
  echo "git://$pod.$GIT_NS.svc.cluster.local:9418/$name"
}
