#!/usr/bin/env bash
# Starts the whole tollgate pipeline on this machine with demo traffic:
# the local stack (Tansu + ClickHouse), ingest, the aggregator, the demo upstream (and a canary
# taking a tenth of the echo route), a webhook
# receiver for SLO alerts and the edge; then sends demo traffic (four consumers, bad keys, an
# over-limit burst, upstream failures) and prints usage from ClickHouse, then per-minute usage
# with latency percentiles from the aggregator once the minute has closed, quota states, SLO
# alerts and draft invoices. Everything keeps running afterwards.
#
#   scripts/demo.sh          start (or restart) and run the demo traffic
#   scripts/demo.sh stop     stop the pipeline and the stack
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STACK="${TOLLGATE_STACK_DIR:-$ROOT/.stack}"
RUN="$STACK/run"
CH="http://127.0.0.1:${TOLLGATE_CH_HTTP_PORT:-8123}"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
log() { printf '[demo] %s\n' "$*" >&2; }

stop_components() {
    for name in edge aggregator ingest upstream canary webhook; do
        local pidf="$RUN/$name.pid"
        if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
            kill -TERM "$(cat "$pidf")" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$(cat "$pidf")" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidf"
    done
}

if [ "${1:-}" = "stop" ]; then
    stop_components
    scripts/stack.sh down
    exit 0
fi

scripts/stack.sh up
log "building (first time: several minutes)"
cargo build --quiet --bins
BIN="$ROOT/target/debug"
[ -n "${CARGO_TARGET_DIR:-}" ] && BIN="$CARGO_TARGET_DIR/debug"

stop_components
mkdir -p "$RUN"
start() { # name, command...
    local name=$1; shift
    nohup "$@" >"$RUN/$name.log" 2>&1 &
    echo $! > "$RUN/$name.pid"
}
start upstream "$BIN/tollgate-demo" upstream --listen 127.0.0.1:8081
start canary "$BIN/tollgate-demo" upstream --listen 127.0.0.1:8083
: > "$RUN/alerts.jsonl"
start webhook "$BIN/tollgate-demo" webhook --listen 127.0.0.1:8082 --out "$RUN/alerts.jsonl"
start ingest "$BIN/tollgate-ingest" run --config config/demo/ingest.toml
start aggregator "$BIN/tollgate-aggregator" run --config config/demo/aggregator.toml
rm -f "$RUN/edge.ready"
# The access log (edge.access_log) goes under the run directory: one JSON line per call.
TOLLGATE_EDGE_EDGE__ACCESS_LOG="$RUN/access.log" \
    start edge "$BIN/tollgate-edge" run --config config/demo/edge.toml --ready-file "$RUN/edge.ready"
for _ in $(seq 1 100); do [ -s "$RUN/edge.ready" ] && break; sleep 0.1; done
[ -s "$RUN/edge.ready" ] || { log "edge did not start; see $RUN/edge.log"; tail -5 "$RUN/edge.log" >&2; exit 1; }
for _ in $(seq 1 100); do curl -sf "$CH/?query=EXISTS%20TABLE%20tollgate.api_calls" | grep -q 1 && break; sleep 0.2; done

q() { curl -sf --data-binary "$1" "$CH/"; }
# Runs a documented query file in database tollgate, as a table.
qf() { grep -v '^--' "$1" | sed 's/;[[:space:]]*$//' | { cat; echo " FORMAT PrettyCompactNoEscapes"; } | curl -sf --data-binary @- "$CH/?database=tollgate"; }
before=$(q "SELECT count() FROM tollgate.api_calls FINAL" || echo 0)
log "sending demo traffic through http://127.0.0.1:8080"
"$BIN/tollgate-demo" traffic --edge http://127.0.0.1:8080 --scale 5 | tee "$RUN/traffic.txt"
sent=$(sed -n 's/^sent \([0-9]*\) requests.*/\1/p' "$RUN/traffic.txt")
want=$((before + sent))
log "waiting for the $sent events to reach ClickHouse"
for _ in $(seq 1 150); do
    have=$(q "SELECT count() FROM tollgate.api_calls FINAL" || echo 0)
    [ "$have" -ge "$want" ] && break
    sleep 0.2
done

echo
echo "== usage per consumer (schemas/queries/usage_by_consumer.sql, database tollgate) =="
qf schemas/queries/usage_by_consumer.sql
echo "== calls per outcome and status (schemas/queries/calls_by_outcome.sql) =="
qf schemas/queries/calls_by_outcome.sql
echo "== calls per route and upstream target: the canary on 8083 takes 1 in 10 (schemas/queries/calls_by_upstream_target.sql) =="
qf schemas/queries/calls_by_upstream_target.sql

# The aggregator writes a minute once it has ended and its lateness window (10 s) passed.
last_minute=$(q "SELECT toUInt32(toStartOfMinute(max(ts))) FROM tollgate.api_calls" || echo 0)
log "waiting for the aggregator to close the demo's last minute (up to 80 s)"
for _ in $(seq 1 400); do
    done_min=$(q "SELECT toUInt32(max(minute)) FROM tollgate.usage_minute" || echo 0)
    [ "${done_min:-0}" -ge "$last_minute" ] && break
    sleep 0.2
done
echo
echo "== aggregated usage this month: calls, errors, P50/P95/P99 from merged histograms =="
echo "== (tollgate-aggregator usage --config config/demo/aggregator.toml) =="
"$BIN/tollgate-aggregator" usage --config config/demo/aggregator.toml
# Quota states are published after the minutes they count are written: wait for the state
# that covers the demo's last minute (a consumer without calls since keeps its earlier one).
# Waits (up to 30 s) until the number SQL $1 returns is past the demo's last minute.
wait_past_last_minute() {
    for _ in $(seq 1 150); do
        [ "$(q "$1" || echo 0)" -gt "$last_minute" ] 2>/dev/null && return
        sleep 0.2
    done
}
wait_past_last_minute "SELECT toUInt32(max(covered_until)) FROM tollgate.quota_state FINAL"
echo "== monthly quota state (table quota_state; free plan: 1000 calls, hard) =="
q "SELECT consumer_id, plan_id, period, used, quota, status, enforcement, covered_until FROM tollgate.quota_state FINAL ORDER BY consumer_id FORMAT PrettyCompactNoEscapes" || true
# The SLOs are evaluated when a minute closes: wait for the evaluation past the demo's last
# minute. An alert still firing from an earlier demo run is not notified again.
wait_past_last_minute "SELECT toUInt32(max(minute)) FROM tollgate.slo_burn_rate"
echo "== SLO alerts (config/demo/aggregator.toml [slo]; table slo_alerts, burn rates in slo_burn_rate) =="
q "SELECT at, alert_id, status, round(long_burn_rate, 1) AS long_burn, round(short_burn_rate, 1) AS short_burn, window_end FROM tollgate.slo_alerts ORDER BY at_us FORMAT PrettyCompactNoEscapes" || true
echo "webhook (tollgate-demo webhook) received $(wc -l < "$RUN/alerts.jsonl") notification(s) this run, in $RUN/alerts.jsonl:"
sed -n 's/.*"status":"\([a-z]*\)".*"summary":"\([^"]*\)".*/  \1: \2/p' "$RUN/alerts.jsonl"
echo "== draft invoices of this month (tollgate-billing invoice --period $(date -u +%Y-%m) --format csv) =="
"$BIN/tollgate-billing" invoice --config config/demo/billing.toml --period "$(date -u +%Y-%m)" --format csv
echo "(JSON: --format json; a printable page per consumer: --format html > invoices.html)"
echo
echo "The pipeline keeps running: edge http://127.0.0.1:8080 (admin http://127.0.0.1:9901/metrics),"
echo "ingest admin http://127.0.0.1:9903/metrics, aggregator admin http://127.0.0.1:9902/metrics,"
echo "SLO webhook receiver http://127.0.0.1:8082,"
echo "ClickHouse $CH (database tollgate),"
echo "Kafka 127.0.0.1:9092. Logs: $RUN/*.log; the edge's access log (a JSON line per call): $RUN/access.log"
echo "Stop everything with: scripts/demo.sh stop"
