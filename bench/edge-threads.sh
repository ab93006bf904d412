#!/usr/bin/env bash
# CPU time per request of each of the edge's threads (workers, librdkafka's broker thread, the
# producer task's runtime, ...), from /proc/<pid>/task/*/stat over a wrk run, for three edges in
# the same run: metering off (the baseline), metering on with the default producer, and metering
# on with `enable.idempotence = true`. Medians of ROUNDS rounds (default 3), interleaved.
#   bench/edge-threads.sh [EDGE_BINARY]   (default: target/release/tollgate-edge)
# Metering goes to the local Tansu of `scripts/stack.sh up` (SQLite storage, as the demo and the
# tests use it), topic `threads-bench`. SECONDS_PER_RUN (default 8) sets each wrk run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/edge-toml.sh
. "$ROOT/bench/edge-toml.sh"
EDGE="${1:-$ROOT/target/release/tollgate-edge}"
DEMO="$ROOT/target/release/tollgate-demo"
need_tools wrk
[ -x "$DEMO" ] && [ -x "$EDGE" ] || (cd "$ROOT" && cargo build --release --quiet -p tollgate-edge -p tollgate-demo)
ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_RUN:-8}"
DIR="$(mktemp -d)"
PIDS=()
# The edges start in subshells (see start_edge), so they are not jobs of this shell.
trap 'kill $(jobs -p) "${PIDS[@]}" 2>/dev/null || true; rm -rf "$DIR"' EXIT
"${CARGO_HOME:-$HOME/.cargo}/bin/tansu" topic create threads-bench --partitions 4 --broker tcp://127.0.0.1:9092 \
    >/dev/null 2>&1 || true
KEY=tg_bench_0123456789abcdefghijklmnopqrstuv
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
UP=$(free_port)
"$DEMO" upstream --listen "127.0.0.1:$UP" >"$DIR/upstream.log" 2>&1 &

# Starts an edge (name, metering true/false, extra [kafka.properties] lines); prints its pid
# and port.
start_edge() {
    local name=$1 metering=$2 props=$3 port admin
    port=$(free_port); admin=$(free_port)
    bench_edge_toml "127.0.0.1:$port" "127.0.0.1:$admin" "$metering" threads-bench "$DIR/$name-spool" \
        "127.0.0.1:$UP" "$HASH" "$props" >"$DIR/$name.toml"
    RUST_LOG=warn "$EDGE" run --config "$DIR/$name.toml" >"$DIR/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$admin/healthz" && break
        sleep 0.1
    done
    echo "$pid $port"
}

# CPU clock ticks of each thread of a process, as "<thread class> <ticks>" (librdkafka's
# per-broker thread names carry the broker id; classes merge them).
ticks() {
    for t in /proc/"$1"/task/*; do
        printf '%s %s %s\n' "$(basename "$t")" "$(tr ' ' _ <"$t/comm" | sed -E 's/^(edge-worker|rdk:broker).*/\1/')" \
            "$(awk '{print $14 + $15}' "$t/stat")"
    done
}

NAMES=(off on idempotent)
read -r P_OFF PORT_OFF < <(start_edge off false "")
PIDS+=("$P_OFF")
read -r P_ON PORT_ON < <(start_edge on true "")
PIDS+=("$P_ON")
read -r P_ID PORT_ID < <(start_edge idempotent true '"enable.idempotence" = "true"')
PIDS+=("$P_ID")
PORTS=("$PORT_OFF" "$PORT_ON" "$PORT_ID")
TCK=$(getconf CLK_TCK)
for i in 0 1 2; do # warm-up
    wrk -t1 -c32 -d2s -H "x-api-key: $KEY" "http://127.0.0.1:${PORTS[$i]}/bench?bytes=64" >/dev/null
done
for r in $(seq 1 "$ROUNDS"); do
    for i in 0 1 2; do
        ticks "${PIDS[$i]}" >"$DIR/a"
        n=$(wrk -t1 -c32 -d"${SECS}"s -H "x-api-key: $KEY" "http://127.0.0.1:${PORTS[$i]}/bench?bytes=64" \
            | awk '/requests in/{print $1}')
        ticks "${PIDS[$i]}" >"$DIR/b"
        # Per thread class: microseconds of CPU per request.
        join <(sort "$DIR/a") <(sort "$DIR/b") | awk -v n="$n" -v t="$TCK" -v name="${NAMES[$i]}" -v r="$r" \
            '{ d[$2] += $5 - $3; tot += $5 - $3 }
             END { for (c in d) if (d[c] > 0) printf "%s %s %s %.2f\n", name, r, c, d[c] / t * 1e6 / n;
                   printf "%s %s total %.2f\n%s %s requests/s %.0f\n", name, r, tot / t * 1e6 / n, name, r, n / '"$SECS"' }' \
            >>"$DIR/results"
    done
done
echo "edge CPU per request by thread (µs, median of $ROUNDS rounds of ${SECS} s, wrk -c32; local Tansu)"
printf '%-18s %12s %12s %16s\n' "thread" "metering off" "metering on" "on, idempotent"
median() { sort -n | awk '{v[NR]=$1} END { if (NR == 0) print "-"; else print v[int((NR + 1) / 2)] }'; }
for class in $(awk '{print $3}' "$DIR/results" | sort -u | grep -v -e total -e requests/s) total requests/s; do
    row=()
    for name in "${NAMES[@]}"; do
        row+=("$(awk -v n="$name" -v c="$class" '$1 == n && $3 == c {print $4}' "$DIR/results" | median)")
    done
    printf '%-18s %12s %12s %16s\n' "$class" "${row[@]}"
done
