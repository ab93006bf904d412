#!/usr/bin/env bash
# Runs every test of tollgate against the real local broker and ClickHouse, starting them
# (and installing what is missing) first. Extra arguments go to `cargo test`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# A fresh build and test run writes about 3 GB to target/; a disk that fills up mid-link makes
# the linker die with an obscure SIGBUS, so say it plainly first.
avail_kb=$(df -Pk "$ROOT" | awk 'NR == 2 {print $4}')
if [ "${avail_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
    echo "warning: only $((avail_kb / 1024)) MiB free on the disk of $ROOT; building and testing needs about 3 GiB" >&2
fi

scripts/stack.sh up
# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins --quiet
cargo test --workspace --all-features "$@"
