-- Raw events, one row per ApiCall as written by ingest.
-- Deduplicated on event_id: redeliveries insert the same row again (same sorting key, same
-- partition), and ReplacingMergeTree keeps one of them. Merges are eventual, so every
-- documented query reads `api_calls FINAL` (or the view `api_calls_unique`), which never
-- counts a redelivered event twice.
-- Timestamps: `ts` (DateTime, second) for partitioning and time filters, `start_time_us`
-- (UInt64 microseconds since the epoch) for precision; no DateTime64 (ClickHouse 18.16).
-- Empty strings stand for the Avro nulls of consumer_id, credential_id, route_id,
-- user_agent and trace_id.
CREATE TABLE IF NOT EXISTS api_calls
(
    event_id UUID,
    ts DateTime,
    start_time_us UInt64,
    edge_id String,
    consumer_id String,
    credential_id String,
    route_id String,
    method String,
    host String,
    path String,
    status UInt16,
    outcome Enum8('forwarded' = 1, 'unauthenticated' = 2, 'forbidden' = 3, 'rate_limited' = 4,
                  'quota_exceeded' = 5, 'upstream_error' = 6, 'upstream_timeout' = 7,
                  'bad_request' = 8, 'no_route' = 9, 'client_aborted' = 10),
    latency_us UInt64,
    upstream_latency_us Nullable(UInt64),
    request_bytes UInt64,
    response_bytes UInt64,
    client_ip String,
    user_agent String,
    trace_id String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(ts)
ORDER BY (consumer_id, ts, event_id);

CREATE VIEW IF NOT EXISTS api_calls_unique AS SELECT * FROM api_calls FINAL;
