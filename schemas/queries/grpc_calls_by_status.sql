-- gRPC calls per route and grpc-status code over the last hour (routes with
-- `upstream_protocol = "h2"` serving application/grpc; `grpc_status` is NULL for every other
-- call). `status` holds the HTTP status the code means (UNAVAILABLE 503, NOT_FOUND 404...), so
-- usage, SLOs and invoices count failed gRPC calls as failures; this shows which codes they
-- were. Reads `api_calls FINAL` so a redelivered event never counts twice.
SELECT
    route_id,
    grpc_status,
    any(status) AS http_status,
    count() AS calls,
    round(quantileExact(0.99)(latency_us) / 1000, 2) AS p99_ms
FROM api_calls FINAL
WHERE ts >= now() - 3600 AND isNotNull(grpc_status)
GROUP BY route_id, grpc_status
ORDER BY route_id, grpc_status
