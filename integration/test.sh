#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what it needs, checks
# formatting and lints, runs unit, golden, CLI and integration tests (real
# containerd, registry and TLS; a test that cannot run fails, unless
# SLIPWAY_SKIP_INTEGRATION=<reason> is set), then renders and validates
# every kustomization and the build Job renders.
#
# Then the real Kubernetes cluster of integration/cluster.sh (#17) comes up,
# the seed's flow and the builds with the real Kaniko executor (#19) run
# against it with kubectl and slipway (cargo test --test cluster), then the
# build benchmark (cargo bench --bench build), and the cluster goes down
# again.
#
# The integration tests run once per containerd release pinned in
# integration/containerd-releases (#8): the first pass (with every other
# test) on Debian 12's 1.6, then `--test integration` again with
# SLIPWAY_CONTAINERD=1.7 and =2.1, whose binaries fetch-containerd.sh
# unpacks from Debian's packages. The layout tests (integration/layouts.rs)
# name their own releases, and the hardening tests (integration/hardening.rs
# and proxy_hardening.rs), the gateway tests other than its CRI pull
# (integration/gateway.rs: skopeo, curl and openssl against the gateway) and
# the coalescing test (scale::eight_…, plain HTTP to one agent) and the
# fan-out tree's fault tests (scale::a_relay_…, agents only, #23) do not
# depend on the containerd release, so they run in the first pass only. The
# gateway's CRI pull through the agent and the other scale:: tests pull
# through CRI and run in every pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/install-deps.sh
bash integration/fetch-containerd.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# --all-targets leaves out the cluster test (test = false in Cargo.toml).
cargo clippy --test cluster --locked -- -D warnings
timings=()
t0=$(date +%s)
# The real-cluster test (integration/cluster_e2e.rs) is not among --tests
# (test = false): it runs on its own below, once the cluster is up.
SLIPWAY_CONTAINERD=1.6 cargo test --lib --bins --tests --examples --locked -- --test-threads=2
timings+=("all tests, integration on containerd 1.6: $(($(date +%s) - t0)) s")
for release in $(awk '!/^#/ && NF == 4 && $1 != "1.6" { print $1 }' integration/containerd-releases); do
  t0=$(date +%s)
  SLIPWAY_CONTAINERD="$release" cargo test --test integration --locked -- --test-threads=2 --skip layouts:: --skip hardening:: --skip proxy_hardening:: --skip gateway::writes_ --skip gateway::the_ --skip gateway::a_bad_ --skip gateway::password_ --skip scale::a_late_registry --skip scale::eight_concurrent_gets --skip scale::sigterm_to_an_owner --skip scale::a_relay_
  timings+=("integration on containerd $release: $(($(date +%s) - t0)) s")
done
# The real Kubernetes cluster (#17): built from source (cold: the Go build
# is most of it), started, then the seed's flow with kubectl; always taken
# down, also after a failure.
t0=$(date +%s)
trap 'bash integration/cluster.sh down || true' EXIT
bash integration/cluster.sh up
timings+=("cluster up (build included): $(($(date +%s) - t0)) s")
t0=$(date +%s)
cargo test --test cluster --locked -- --nocapture
timings+=("cluster tests: $(($(date +%s) - t0)) s")
# What the registry layer cache saves a real build (#19): cold, warm and
# one-change builds of a C project with the real Kaniko executor.
t0=$(date +%s)
cargo bench --bench build --locked
timings+=("build benchmark: $(($(date +%s) - t0)) s")
t0=$(date +%s)
bash integration/cluster.sh down
trap - EXIT
timings+=("cluster down: $(($(date +%s) - t0)) s")
printf 'timing: %s\n' "${timings[@]}"
# Also every `slipway build --render` golden file (integration/golden/build/).
bash .ci/validate-manifests.sh integration/golden/build/*.yaml
