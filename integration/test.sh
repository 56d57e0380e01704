#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what it needs, checks
# formatting and lints, runs unit, golden, CLI and integration tests (real
# containerd, registry and TLS; none may skip), then renders and validates
# every kustomization and the build Job renders.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
SLIPWAY_REQUIRE_INTEGRATION=1 cargo test --lib --bins --tests --examples --locked -- --test-threads=2
# Also every `slipway build --render` golden file (integration/golden/build/).
bash .ci/validate-manifests.sh integration/golden/build/*.yaml
