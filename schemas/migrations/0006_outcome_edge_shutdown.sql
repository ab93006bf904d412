-- ApiCall schema v3 adds the outcome `edge_shutdown` (the edge's shutdown grace ran out before
-- the response completed). Adding a value at the end of an Enum8 only changes metadata, also
-- for a sorting-key column; altering to the same type again is a no-op, so this is idempotent.
ALTER TABLE api_calls MODIFY COLUMN outcome
    Enum8('forwarded' = 1, 'unauthenticated' = 2, 'forbidden' = 3, 'rate_limited' = 4,
          'quota_exceeded' = 5, 'upstream_error' = 6, 'upstream_timeout' = 7,
          'bad_request' = 8, 'no_route' = 9, 'client_aborted' = 10, 'edge_shutdown' = 11);

ALTER TABLE usage_minute MODIFY COLUMN outcome
    Enum8('forwarded' = 1, 'unauthenticated' = 2, 'forbidden' = 3, 'rate_limited' = 4,
          'quota_exceeded' = 5, 'upstream_error' = 6, 'upstream_timeout' = 7,
          'bad_request' = 8, 'no_route' = 9, 'client_aborted' = 10, 'edge_shutdown' = 11);

-- ClickHouse 18.16 views keep the column types they were created with (a filter on the new
-- value would fail through them): made again over the altered tables.
DROP TABLE IF EXISTS api_calls_unique;
CREATE VIEW IF NOT EXISTS api_calls_unique AS SELECT * FROM api_calls FINAL;

DROP TABLE IF EXISTS usage_minute_final;
CREATE VIEW IF NOT EXISTS usage_minute_final AS SELECT * FROM usage_minute FINAL;
