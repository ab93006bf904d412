#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: starts the stack, builds release binaries, runs the benches.
#   bench/run.sh              both benchmarks
#   bench/run.sh ingest       ingest throughput only
#   bench/run.sh freshness    freshness only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
scripts/stack.sh up
cargo build --release --bins --quiet
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tollgate-bench"
case "${1:-all}" in
    ingest) "$BIN" ingest ;;
    freshness) "$BIN" freshness ;;
    all) "$BIN" ingest; echo; "$BIN" freshness ;;
    *) echo "usage: bench/run.sh [ingest|freshness]" >&2; exit 2 ;;
esac
