-- Calls per route and upstream target over the last hour: the answer to "is the canary
-- worse than the stable targets?" (`routes[].upstreams` with weights). Calls that reached no
-- target (refused at the edge) are left out; a call retried on another target counts for the
-- target that answered it. Reads `api_calls FINAL` so a redelivered event never counts twice.
SELECT
    route_id,
    upstream_target,
    count() AS calls,
    countIf(status >= 500) AS errors_5xx,
    round(countIf(status >= 500) / count() * 100, 2) AS error_percent,
    round(quantileExact(0.5)(latency_us) / 1000, 2) AS p50_ms,
    round(quantileExact(0.99)(latency_us) / 1000, 2) AS p99_ms
FROM api_calls FINAL
WHERE ts >= now() - 3600 AND upstream_target != ''
GROUP BY route_id, upstream_target
ORDER BY route_id, upstream_target
