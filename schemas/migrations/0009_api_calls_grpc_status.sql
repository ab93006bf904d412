-- ApiCall schema v5 adds `grpc_status`: the grpc-status code of a gRPC answer (`status` holds
-- the HTTP status it means); NULL for every other call and for events of older schemas.
-- Idempotent on 18.16: the migration runner skips an ADD COLUMN whose column exists.
ALTER TABLE api_calls ADD COLUMN grpc_status Nullable(UInt16);

-- ClickHouse 18.16 views keep the columns they were created with: made again over the table.
DROP TABLE IF EXISTS api_calls_unique;
CREATE VIEW IF NOT EXISTS api_calls_unique AS SELECT * FROM api_calls FINAL;
