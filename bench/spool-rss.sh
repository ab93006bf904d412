#!/usr/bin/env bash
# The edge's peak RSS while its events go through the spool and back: librdkafka's queue is
# capped at 2,000 messages, so under wrk -c32 nearly every event is refused by it, written to
# the spool, and replayed once the load stops. 100,000 consumers configured (a
# `consumers_file`), as in the gateway benchmark's RSS figure. Each given edge binary runs
# ROUNDS times (default 2), interleaved with the others, so machine drift hits all alike:
#   bench/spool-rss.sh [EDGE_BINARY...]   (default: target/release/tollgate-edge)
# e.g. an A/B of two builds: bench/spool-rss.sh /tmp/edge-before target/release/tollgate-edge
# Per run: ROUNDS_OF_LOAD (6) wrk runs of SECONDS_PER_RUN (6) s, then SETTLE (20) s for the
# replay. Prints, per run, requests/s, events spooled and replayed, RSS when listening, peak
# (VmHWM) and after the replay; then the median peak per binary. Metering goes to the local
# Tansu of `scripts/stack.sh up`, topic `spool-rss-bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/edge-toml.sh
. "$ROOT/bench/edge-toml.sh"
EDGES=("$@")
[ ${#EDGES[@]} -gt 0 ] || EDGES=("$ROOT/target/release/tollgate-edge")
DEMO="$ROOT/target/release/tollgate-demo"
need_tools wrk
[ -x "$DEMO" ] && [ -x "${EDGES[0]}" ] || (cd "$ROOT" && cargo build --release --quiet -p tollgate-edge -p tollgate-demo)
ROUNDS="${ROUNDS:-2}"
LOADS="${ROUNDS_OF_LOAD:-6}"
SECS="${SECONDS_PER_RUN:-6}"
SETTLE="${SETTLE:-20}"
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT
"${CARGO_HOME:-$HOME/.cargo}/bin/tansu" topic create spool-rss-bench --partitions 1 --broker tcp://127.0.0.1:9092 \
    >/dev/null 2>&1 || true
KEY=tg_bench_0123456789abcdefghijklmnopqrstuv
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
python3 - "$DIR/consumers.jsonl" <<'PY'
import hashlib, json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1, 100_001):
        h = hashlib.sha256(f"tg_c{i}_key".encode()).hexdigest()
        f.write(json.dumps({"id": f"c{i}", "plan": "big", "keys": [{"id": f"k{i}", "sha256": h}]}) + "\n")
PY
UP=$(free_port)
"$DEMO" upstream --listen "127.0.0.1:$UP" >"$DIR/upstream.log" 2>&1 &
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$2/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

declare -A PEAKS
for round in $(seq 1 "$ROUNDS"); do
    for i in "${!EDGES[@]}"; do
        edge=${EDGES[$i]}
        port=$(free_port); admin=$(free_port)
        { echo "consumers_file = \"$DIR/consumers.jsonl\""
          bench_edge_toml "127.0.0.1:$port" "127.0.0.1:$admin" true spool-rss-bench "$DIR/spool-$round-$i" \
              "127.0.0.1:$UP" "$HASH" '"queue.buffering.max.messages" = "2000"'; } >"$DIR/edge.toml"
        RUST_LOG=warn "$edge" run --config "$DIR/edge.toml" >"$DIR/edge-$round-$i.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$admin/healthz" && break; sleep 0.1; done
        sleep 3
        listening=$(kib VmRSS "$pid")
        rps=()
        for _ in $(seq 1 "$LOADS"); do
            rps+=("$(wrk -t1 -c32 -d"${SECS}s" -H "x-api-key: $KEY" "http://127.0.0.1:$port/bench?bytes=64" \
                | awk '/Requests\/sec/ {printf "%.0f", $2}')")
        done
        sleep "$SETTLE"
        spooled=$(metric "$admin" tollgate_edge_events_spooled_total)
        replayed=$(metric "$admin" tollgate_edge_events_replayed_total)
        peak=$(kib VmHWM "$pid"); after=$(kib VmRSS "$pid")
        kill "$pid"; wait "$pid" 2>/dev/null || true
        PEAKS[$i]="${PEAKS[$i]:-} $peak"
        echo "$edge round $round: req/s ${rps[*]}; spooled $spooled, replayed $replayed;" \
            "RSS listening $(mib "$listening") MiB, peak $(mib "$peak") MiB, after replay $(mib "$after") MiB"
    done
done
echo
for i in "${!EDGES[@]}"; do
    # shellcheck disable=SC2086
    median=$(printf '%s\n' ${PEAKS[$i]} | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
    echo "${EDGES[$i]}: median peak RSS $(mib "$median") MiB"
done
