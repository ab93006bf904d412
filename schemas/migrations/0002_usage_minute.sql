-- Per-minute usage, written by the aggregator: one row per minute x consumer x route x
-- outcome x status class (status / 100; 0 when no HTTP status was sent).
-- Each row is a pure function of the deduplicated raw events of its key (`api_calls FINAL`):
-- the aggregator recomputes a key's row whenever events for it arrive and writes it again;
-- ReplacingMergeTree keeps the row with the highest `version` (the time the recomputation
-- started, in microseconds; a later recomputation sees a superset of raw events). Read it
-- `FINAL` (or through `usage_minute_final`) so a key counts once even before merges.
-- Latency: `latency_le_us[i]` is the inclusive upper bound of an HDR histogram bucket
-- (hdrhistogram, 2 significant digits: exact below 256 us, then buckets narrower than 1/128
-- of their value) and `latency_count[i]` the number of calls in it. Buckets are fixed for
-- all rows, so any window merges exactly with sumMap(latency_le_us, latency_count).
CREATE TABLE IF NOT EXISTS usage_minute
(
    minute DateTime,
    consumer_id String,
    route_id String,
    outcome Enum8('forwarded' = 1, 'unauthenticated' = 2, 'forbidden' = 3, 'rate_limited' = 4,
                  'quota_exceeded' = 5, 'upstream_error' = 6, 'upstream_timeout' = 7,
                  'bad_request' = 8, 'no_route' = 9, 'client_aborted' = 10),
    status_class UInt8,
    requests UInt64,
    errors_4xx UInt64,
    errors_5xx UInt64,
    request_bytes UInt64,
    response_bytes UInt64,
    latency_sum_us UInt64,
    latency_le_us Array(UInt64),
    latency_count Array(UInt64),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(minute)
ORDER BY (consumer_id, minute, route_id, outcome, status_class);

CREATE VIEW IF NOT EXISTS usage_minute_final AS SELECT * FROM usage_minute FINAL;
