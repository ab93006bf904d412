#!/usr/bin/env bash
# tollgate's local stack: the Tansu Kafka broker and ClickHouse, on 127.0.0.1, with every
# byte under $TOLLGATE_STACK_DIR (default: <repo>/.stack, git-ignored).
#
#   scripts/stack.sh install   install what is missing (apt ClickHouse and Alertmanager, Tansu
#                              from crates.io, chdb)
#   scripts/stack.sh up        install, start both servers, wait until ready, create topics
#   scripts/stack.sh down      stop both servers (data is kept)
#   scripts/stack.sh status    show what runs
#   scripts/stack.sh reset     down, then delete the data
#
# Every command is safe to run twice. Ports: Kafka 9092, ClickHouse HTTP 8123 / native 9000
# (override with TOLLGATE_KAFKA_PORT, TOLLGATE_CH_HTTP_PORT, TOLLGATE_CH_TCP_PORT).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${TOLLGATE_STACK_DIR:-$ROOT/.stack}"
KAFKA_PORT="${TOLLGATE_KAFKA_PORT:-9092}"
CH_HTTP_PORT="${TOLLGATE_CH_HTTP_PORT:-8123}"
CH_TCP_PORT="${TOLLGATE_CH_TCP_PORT:-9000}"
# Tansu resolves a sqlite:// path against its working directory, which is $STACK/tansu.
TANSU_STORAGE="${TOLLGATE_TANSU_STORAGE:-sqlite://tansu.db}"
TANSU_VERSION="0.6.0"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_clickhouse() {
    if command -v clickhouse-server >/dev/null 2>&1; then return; fi
    log "installing clickhouse-server and clickhouse-client (Debian packages)"
    as_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q clickhouse-server clickhouse-client >/dev/null
}

# Prometheus Alertmanager: not part of the stack; the tests start their own to check the
# aggregator's `webhook_format = "alertmanager"` against the real API.
install_alertmanager() {
    if command -v prometheus-alertmanager >/dev/null 2>&1; then return; fi
    log "installing prometheus-alertmanager (Debian package; the tests run their own instance)"
    as_root apt-get update -q >/dev/null
    # On a machine with systemd the package also starts its own service (port 9093); the tests
    # do not use it (their instances take free ports and their own data directories).
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q prometheus-alertmanager >/dev/null
}

install_tansu() {
    if command -v tansu >/dev/null 2>&1; then return; fi
    log "building the Tansu broker from crates.io (once; about 20 minutes on 2 cores; cached in $CARGO_BIN)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore --quiet
}

install_chdb() {
    if python3 -c 'import chdb' >/dev/null 2>&1; then return; fi
    log "installing chdb-core (current ClickHouse engine, in-process) from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check chdb-core
}

cmd_install() { install_clickhouse; install_alertmanager; install_chdb; install_tansu; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # name, pidfile, log, seconds, command...
    local name=$1 pidf=$2 logf=$3 secs=$4; shift 4
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        pid_alive "$pidf" || { tail -5 "$logf" >&2; die "$name exited during start-up (log: $logf)"; }
        [ $SECONDS -lt $deadline ] || die "$name not ready after ${secs}s (log: $logf)"
        sleep 0.2
    done
    # Something else may answer on the port while ours failed to bind: check ours still runs.
    sleep 0.5
    pid_alive "$pidf" || { tail -5 "$logf" >&2; die "$name exited during start-up; is the port taken by another process? (log: $logf)"; }
}

ch_ready() { curl -sf "http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT%201" | grep -q 1; }
kafka_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }

start_clickhouse() {
    local dir="$STACK/clickhouse"
    if pid_alive "$dir/pid" && ch_ready; then log "ClickHouse already running (pid $(cat "$dir/pid"))"; return; fi
    if ch_ready; then log "ClickHouse already answers on 127.0.0.1:$CH_HTTP_PORT (not started by this checkout); using it"; return; fi
    mkdir -p "$dir/log" "$dir/data" "$dir/tmp"
    sed -e "s#@DIR@#$dir#g; s#@HTTP_PORT@#$CH_HTTP_PORT#; s#@TCP_PORT@#$CH_TCP_PORT#" \
        "$ROOT/scripts/stack/clickhouse-config.xml" > "$dir/config.xml"
    cp "$ROOT/scripts/stack/clickhouse-users.xml" "$dir/users.xml"
    log "starting ClickHouse on 127.0.0.1:$CH_HTTP_PORT"
    nohup clickhouse-server --config-file="$dir/config.xml" >"$dir/log/stdout.log" 2>&1 &
    echo $! > "$dir/pid"
    wait_for ClickHouse "$dir/pid" "$dir/log/clickhouse-server.err.log" 60 ch_ready
}

start_tansu() {
    local dir="$STACK/tansu"
    if pid_alive "$dir/pid" && kafka_ready; then log "Tansu already running (pid $(cat "$dir/pid"))"; return; fi
    if kafka_ready; then log "a broker already answers on 127.0.0.1:$KAFKA_PORT (not started by this checkout); using it"; return; fi
    mkdir -p "$dir"
    log "starting Tansu on 127.0.0.1:$KAFKA_PORT ($TANSU_STORAGE)"
    (cd "$dir" && exec nohup tansu broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "$TANSU_STORAGE" >"$dir/tansu.log" 2>&1) &
    echo $! > "$dir/pid"
    wait_for Tansu "$dir/pid" "$dir/tansu.log" 60 kafka_ready
}

create_topics() {
    local existing
    existing=$(tansu topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" 2>/dev/null || true)
    # quota-state is compacted (the latest state per consumer); Tansu accepts the setting.
    for spec in "api-calls:4" "api-calls.dlq:1" "quota-state:1:cleanup.policy=compact"; do
        local name parts config
        IFS=: read -r name parts config <<<"$spec"
        if grep -q "\"$name\"" <<<"$existing"; then continue; fi
        tansu topic create "$name" --partitions "$parts" ${config:+--config "$config"} --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 \
            || log "topic $name: create failed (may already exist)"
    done
}

stop_one() { # name, pidfile
    local pidf=$2
    if pid_alive "$pidf"; then
        local pid; pid=$(cat "$pidf")
        log "stopping $1 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"
}

case "${1:-up}" in
    install) cmd_install ;;
    up)
        cmd_install
        start_clickhouse
        start_tansu
        create_topics
        log "ready: Kafka 127.0.0.1:$KAFKA_PORT, ClickHouse http://127.0.0.1:$CH_HTTP_PORT"
        ;;
    down)
        stop_one Tansu "$STACK/tansu/pid"
        stop_one ClickHouse "$STACK/clickhouse/pid"
        ;;
    status)
        pid_alive "$STACK/tansu/pid" && echo "tansu: running (pid $(cat "$STACK/tansu/pid"))" || echo "tansu: stopped"
        pid_alive "$STACK/clickhouse/pid" && echo "clickhouse: running (pid $(cat "$STACK/clickhouse/pid"))" || echo "clickhouse: stopped"
        ;;
    reset)
        "$0" down
        rm -rf "$STACK/tansu" "$STACK/clickhouse"
        ;;
    *) die "unknown command ${1}; use install, up, down, status or reset" ;;
esac
