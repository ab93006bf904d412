#!/usr/bin/env bash
# Runs every test of tollgate against the real local broker and ClickHouse, starting them
# (and installing what is missing) first. Extra arguments go to `cargo test`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

scripts/stack.sh up
# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins --quiet
cargo test --workspace --all-features "$@"
