#!/usr/bin/env bash
# Instructions per request of the edge's request path (user space), counted by callgrind: exact
# and free of the noise of this shared machine, so two builds compare directly.
#   bench/callgrind-edge.sh [EDGE_BINARY]   (default: target/release/tollgate-edge)
# The edge runs under valgrind (metering off, one API-key consumer, limits on) in front of the
# demo upstream; wrk sends 2 s at 4 connections (warm-up, not counted), then 10 s at 8. Then
# the baseline, the bench's bare hyper proxy (`tollgate-bench hyper-proxy`: same server,
# runtime and upstream pool, no gateway work), under the same load. Prints each one's
# instructions of the measured run divided by its requests, their ratio, and the top
# inclusive costs of the edge's own functions. CALLGRIND_KEEP=DIR keeps both profiles there.
# CALLGRIND_METERING=1: metering on, to the local Tansu (`scripts/stack.sh up`), topic
# `callgrind-bench`; the count then includes librdkafka's threads in the edge process.
# CALLGRIND_ACCESS_LOG=1: `edge.access_log` on (a file in the temporary directory); the count
# then includes the access log's writer thread.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/edge-toml.sh
. "$ROOT/bench/edge-toml.sh"
EDGE="${1:-$ROOT/target/release/tollgate-edge}"
DEMO="$ROOT/target/release/tollgate-demo"
PROXY="$ROOT/target/release/tollgate-bench"
need_tools valgrind wrk
[ -x "$DEMO" ] && [ -x "$EDGE" ] && [ -x "$PROXY" ] \
    || (cd "$ROOT" && cargo build --release --quiet -p tollgate-edge -p tollgate-demo -p tollgate-bench)
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -z "${CALLGRIND_KEEP:-}" ] || cp "$DIR"/*.out* "$CALLGRIND_KEEP"/; rm -rf "$DIR"' EXIT
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
METERING=false
if [ "${CALLGRIND_METERING:-0}" = 1 ]; then
    METERING=true
    "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" topic create callgrind-bench --partitions 4 --broker tcp://127.0.0.1:9092 \
        >/dev/null 2>&1 || true
fi
KEY=tg_bench_0123456789abcdefghijklmnopqrstuv
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
bench_edge_toml "127.0.0.1:$PORT" "127.0.0.1:$ADMIN" "$METERING" callgrind-bench "$DIR/spool" "127.0.0.1:$UP" "$HASH" \
    >"$DIR/edge.toml"
if [ "${CALLGRIND_ACCESS_LOG:-0}" = 1 ]; then
    sed -i "s|^admin_listen = .*|&\naccess_log = \"$DIR/access.log\"|" "$DIR/edge.toml"
fi
"$DEMO" upstream --listen "127.0.0.1:$UP" >"$DIR/upstream.log" 2>&1 &
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.out" "$EDGE" run --config "$DIR/edge.toml" \
    >"$DIR/edge.log" 2>&1 &
VG=$!
for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$ADMIN/healthz" && break
    sleep 0.1
done
count() { wrk -t1 -c"$1" -d"$2"s -H "x-api-key: $KEY" "http://127.0.0.1:$3/bench?bytes=64" | awk '/requests in/{print $1}'; }
# Warm-up, then counters zeroed: only the measured run's instructions are counted (dumped as
# part 1 of the profile), not start-up.
measure() { # port, valgrind pid
    count 4 2 "$1" >/dev/null
    callgrind_control -z "$2" >/dev/null 2>&1
    local n; n=$(count 8 10 "$1")
    callgrind_control -d "$2" >/dev/null 2>&1
    echo "$n"
}
A=$(measure "$PORT" "$VG")
kill -INT "$VG"; wait "$VG" || true
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}'; }
EDGE_PER=$(( $(total "$DIR/cg.out.1") / A ))

# The baseline. (A background job ignores SIGINT in a script: it is stopped with SIGTERM,
# after which valgrind still writes its profile.)
BASE=$(free_port)
valgrind --tool=callgrind --callgrind-out-file="$DIR/base.out" "$PROXY" hyper-proxy --listen "127.0.0.1:$BASE" \
    --upstream "127.0.0.1:$UP" --threads 2 >"$DIR/proxy.log" 2>&1 &
VG=$!
for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$BASE/" && break
    sleep 0.1
done
C=$(measure "$BASE" "$VG")
kill -TERM "$VG"; wait "$VG" || true
BASE_PER=$(( $(total "$DIR/base.out.1") / C ))
if [ "${CALLGRIND_ACCESS_LOG:-0}" = 1 ]; then
    echo "access log: $(wc -l < "$DIR/access.log") lines"
fi
echo "edge: $A requests, $EDGE_PER instructions per request"
echo "hyper proxy (baseline): $C requests, $BASE_PER instructions per request"
awk -v e="$EDGE_PER" -v b="$BASE_PER" 'BEGIN { printf "edge / baseline: %.2fx\n", e / b }'
callgrind_annotate --inclusive=yes "$DIR/cg.out.1" 2>/dev/null | grep -E 'tollgate_edge::' | head -12 \
    | awk -v n="$A" '{c=$1; gsub(",","",c); $1=""; $2=""; printf "%8d per request %s\n", c/n, $0}' | cut -c1-160
