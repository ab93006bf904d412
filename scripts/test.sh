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
# Databases earlier test runs left in the local ClickHouse (the tests name theirs
# `<prefix>_<16 hex digits>`, the migration tests `migr_<pid>`): dropped, so that repeated
# runs do not fill the disk.
ch="http://127.0.0.1:${TOLLGATE_CH_HTTP_PORT:-8123}/"
for db in $(curl -sf "$ch" --data-binary "SELECT name FROM system.databases
        WHERE match(name, '^[a-z0-9_]+_[0-9a-f]{16}\$') OR match(name, '^migr_[0-9]+\$')" || true); do
    curl -sf "$ch" --data-binary "DROP DATABASE IF EXISTS \`$db\`" >/dev/null || echo "warning: cannot drop test database $db" >&2
done
# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins --quiet
cargo test --workspace --all-features "$@"
