#!/usr/bin/env bash
# README command 1: the local pull demo. Installs what it needs, then runs
# integration/demo.rs against a real registry and containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/install-deps.sh
cargo build --quiet --bin slipway
cargo build --quiet --example demo
SLIPWAY_BIN="$PWD/target/debug/slipway" ./target/debug/examples/demo
