-- ApiCall schema v4 adds `upstream_target` (the route target the call was sent to, as
-- scheme://host:port); calls that were not forwarded, and events of older schemas, read as ''.
-- Idempotent on 18.16: the migration runner skips an ADD COLUMN whose column exists.
ALTER TABLE api_calls ADD COLUMN upstream_target String DEFAULT '';

-- ClickHouse 18.16 views keep the columns they were created with: made again over the table.
DROP TABLE IF EXISTS api_calls_unique;
CREATE VIEW IF NOT EXISTS api_calls_unique AS SELECT * FROM api_calls FINAL;
