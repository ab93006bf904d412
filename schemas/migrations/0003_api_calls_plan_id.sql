-- ApiCall schema v2 adds `plan_id` (the consumer's plan when the call was made); events of
-- schema v1 have none and read as ''.
-- ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: the migration runner skips an
-- `ALTER TABLE t ADD COLUMN c` whose column exists, which keeps this statement idempotent.
ALTER TABLE api_calls ADD COLUMN plan_id String DEFAULT '';
