#!/usr/bin/env bash
# Reproduces docs/benchmarks.md: starts the stack, builds release binaries, runs the benches.
#   bench/run.sh              both benchmarks
#   bench/run.sh ingest       ingest throughput only
#   bench/run.sh freshness    freshness only
#   bench/run.sh gateway      wrk: direct, nginx, edge (metering off/on, JWT), RSS; built with
#                             the `dist` profile (fat LTO), the build to deploy (README)
#   bench/run.sh encode       event encoding: direct Avro writer vs apache-avro
#   bench/run.sh aggregate    aggregator replay throughput
#   bench/run.sh lag          usage and quota lag at 2,000 requests/s
#   bench/run.sh billing      close and export a month of invoices for 10,000 consumers
#   bench/run.sh slo          one SLO evaluation over 3 days of usage of 1,000 consumers
#   bench/run.sh queue        ns per place handed down the edge's queue of waiting calls
#   bench/run.sh callgrind    the edge's instructions per request (valgrind; exact, noise-free)
#   bench/run.sh threads      the edge's CPU per request by thread: metering off / on / idempotent
#   bench/run.sh spool-rss    the edge's peak RSS while its events go through the spool and back
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
scripts/stack.sh up
# shellcheck source=bench/edge-toml.sh
. bench/edge-toml.sh
need_tools wrk nginx
cargo build --release --bins --quiet
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tollgate-bench"
case "${1:-all}" in
    ingest) "$BIN" ingest ;;
    freshness) "$BIN" freshness ;;
    gateway) cargo build --profile dist --quiet -p tollgate-edge -p tollgate-demo -p tollgate-bench
        "${CARGO_TARGET_DIR:-$ROOT/target}/dist/tollgate-bench" gateway ;;
    encode) "$BIN" encode ;;
    aggregate) "$BIN" aggregate ;;
    lag) "$BIN" lag ;;
    billing) "$BIN" billing ;;
    slo) "$BIN" slo ;;
    queue) "$BIN" queue ;;
    callgrind) bench/callgrind-edge.sh ;;
    threads) bench/edge-threads.sh ;;
    spool-rss) bench/spool-rss.sh ;;
    all) "$BIN" ingest; echo; "$BIN" freshness; echo; "$0" gateway; echo; "$BIN" encode; echo; "$BIN" aggregate; echo; "$BIN" lag; echo; "$BIN" billing; echo; "$BIN" slo ;;
    *) echo "usage: bench/run.sh [ingest|freshness|gateway|encode|aggregate|lag|billing|slo|queue|callgrind|threads|spool-rss]" >&2; exit 2 ;;
esac
