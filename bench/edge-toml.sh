# Sourced by the bench scripts: what they share.

# Installs (Debian packages) those of the given tools that are missing.
need_tools() {
    local tool sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd=sudo
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || $sudo_cmd apt-get install -y -q "$tool" >/dev/null
    done
}

# A TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The config of a benchmark edge, all paths to one upstream, one API-key consumer on a plan no
# load reaches, events to the local Tansu.
#   bench_edge_toml LISTEN ADMIN METERING(true|false) TOPIC SPOOL_DIR UPSTREAM KEY_SHA256 [KAFKA_PROPERTY_LINES]
bench_edge_toml() {
    cat <<CFG
[edge]
listen = "$1"
admin_listen = "$2"
[kafka]
enabled = $3
brokers = "127.0.0.1:9092"
topic = "$4"
[spool]
dir = "$5"
[[routes]]
id = "up"
path_prefix = "/"
upstream = "http://$6"
auth = "api_key_or_jwt"
[plans.big]
rate_per_second = 10000000
[[consumers]]
id = "bench"
plan = "big"
keys = [{ id = "k", sha256 = "$7" }]
[kafka.properties]
${8:-}
CFG
}
