#!/usr/bin/env bash
# Installs what is needed, then runs every check CI runs: formatting, clippy, all tests.
# Run as root on Debian 12 (integration tests start real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
