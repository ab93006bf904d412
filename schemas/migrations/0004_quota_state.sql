-- Monthly quota state per consumer and period, written by the aggregator next to the
-- compacted topic `quota-state` (which edges read). One row per (consumer, period); a newer
-- computation (higher computed_at_us) replaces an older one: read it FINAL.
CREATE TABLE IF NOT EXISTS quota_state
(
    consumer_id String,
    period String,
    plan_id String,
    quota UInt64,
    used UInt64,
    status Enum8('ok' = 1, 'warning' = 2, 'exceeded' = 3),
    enforcement Enum8('hard' = 1, 'soft' = 2),
    warning_percent UInt8,
    period_start DateTime,
    period_end DateTime,
    covered_until DateTime,
    computed_at_us UInt64
)
ENGINE = ReplacingMergeTree(computed_at_us)
PARTITION BY toYYYYMM(period_start)
ORDER BY (consumer_id, period);
