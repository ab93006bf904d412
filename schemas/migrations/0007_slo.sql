-- SLO burn rates and alerts, written by the aggregator (docs/ARCHITECTURE.md, "SLOs and
-- alerts"). An objective is evaluated whenever a minute closes, over each window its alert
-- rules use; `minute` is the end (exclusive) of the windows. `total` and `bad` are the calls
-- the objective counts in the window, `burn_rate` = (bad / total) / (1 - objective), 0 when
-- total is 0. `consumer_id` is '' unless the objective is evaluated per consumer. A
-- re-evaluation of the same end (a restart) replaces the row: read it FINAL.
CREATE TABLE IF NOT EXISTS slo_burn_rate
(
    minute DateTime,
    slo_id String,
    consumer_id String,
    window_minutes UInt32,
    total UInt64,
    bad UInt64,
    burn_rate Float64,
    evaluated_at_us UInt64
)
ENGINE = ReplacingMergeTree(evaluated_at_us)
PARTITION BY toYYYYMM(minute)
ORDER BY (slo_id, consumer_id, window_minutes, minute);

-- Every alert notification, written once it is delivered to the webhook (or at once when no
-- webhook is configured: `delivered` = 0). The latest row of an `alert_id` is its state: an
-- aggregator that starts, or takes over the evaluation, reads it from here.
CREATE TABLE IF NOT EXISTS slo_alerts
(
    at DateTime,
    at_us UInt64,
    alert_id String,
    slo_id String,
    consumer_id String,
    severity String,
    status Enum8('firing' = 1, 'resolved' = 2),
    window_end DateTime,
    long_window_minutes UInt32,
    short_window_minutes UInt32,
    burn_rate_threshold Float64,
    long_burn_rate Float64,
    short_burn_rate Float64,
    delivered UInt8
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (alert_id, at_us);
