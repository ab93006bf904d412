#!/usr/bin/env bash
# Instructions per request of the edge's request path (user space), counted by callgrind: exact
# and free of the noise of this shared machine, so two builds compare directly.
#   bench/callgrind-edge.sh [EDGE_BINARY]   (default: target/release/tollgate-edge)
# The edge runs under valgrind (metering off, one API-key consumer, limits on) in front of the
# demo upstream; wrk sends 2 s at 4 connections, then 10 s at 8. Prints the total instructions
# divided by the requests (start-up included, about 1,000 per request at these counts) and the
# top inclusive costs of the edge's own functions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EDGE="${1:-$ROOT/target/release/tollgate-edge}"
DEMO="$ROOT/target/release/tollgate-demo"
for tool in valgrind wrk; do
    command -v "$tool" >/dev/null 2>&1 || { sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd=sudo;
        $sudo_cmd apt-get install -y -q "$tool" >/dev/null; }
done
[ -x "$DEMO" ] && [ -x "$EDGE" ] || (cd "$ROOT" && cargo build --release --quiet -p tollgate-edge -p tollgate-demo)
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
KEY=tg_bench_0123456789abcdefghijklmnopqrstuv
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
cat > "$DIR/edge.toml" <<CFG
[edge]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
[kafka]
enabled = false
[spool]
dir = "$DIR/spool"
[[routes]]
id = "up"
path_prefix = "/"
upstream = "http://127.0.0.1:$UP"
auth = "api_key_or_jwt"
[plans.big]
rate_per_second = 10000000
[[consumers]]
id = "bench"
plan = "big"
keys = [{ id = "k", sha256 = "$HASH" }]
CFG
"$DEMO" upstream --listen "127.0.0.1:$UP" >"$DIR/upstream.log" 2>&1 &
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.out" "$EDGE" run --config "$DIR/edge.toml" \
    >"$DIR/edge.log" 2>&1 &
VG=$!
for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$ADMIN/healthz" && break
    sleep 0.1
done
count() { wrk -t1 -c"$1" -d"$2"s -H "x-api-key: $KEY" "http://127.0.0.1:$PORT/bench?bytes=64" | awk '/requests in/{print $1}'; }
A=$(count 4 2); B=$(count 8 10)
kill -INT "$VG"; wait "$VG" || true
TOTAL=$(callgrind_annotate "$DIR/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
echo "requests: $((A + B)); instructions per request: $((TOTAL / (A + B)))"
callgrind_annotate --inclusive=yes "$DIR/cg.out" 2>/dev/null | grep -E 'tollgate_edge::' | head -12 \
    | awk -v n=$((A + B)) '{c=$1; gsub(",","",c); $1=""; $2=""; printf "%8d per request %s\n", c/n, $0}' | cut -c1-160
