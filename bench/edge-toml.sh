# Sourced by the bench scripts: the config of a benchmark edge, all paths to one upstream,
# one API-key consumer on a plan no load reaches, events to the local Tansu.
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
