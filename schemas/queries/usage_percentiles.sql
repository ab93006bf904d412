-- Calls, errors and P50/P95/P99 latency (ms) per consumer over a window, from the per-minute
-- histograms the aggregator writes. Buckets of every minute and route are merged first
-- (sumMap), then the nearest-rank percentile is read from the merged buckets: exact below
-- 256 us, never below the true percentile and less than 0.79 % above it. Change the window
-- (Grafana: `minute >= $__fromTime AND minute < $__toTime`) or add `AND route_id = '...'`.
SELECT
    if(consumer_id = '', '(unauthenticated)', consumer_id) AS consumer,
    sum(requests) AS calls,
    sum(errors_4xx) AS errors_4xx,
    sum(errors_5xx) AS errors_5xx,
    sumMap(latency_le_us, latency_count) AS buckets,
    arrayCumSum(tupleElement(buckets, 2)) AS cumulative,
    round(tupleElement(buckets, 1)[arrayFirstIndex(c -> c >= greatest(1, ceil(0.50 * calls)), cumulative)] / 1000, 2) AS p50_ms,
    round(tupleElement(buckets, 1)[arrayFirstIndex(c -> c >= greatest(1, ceil(0.95 * calls)), cumulative)] / 1000, 2) AS p95_ms,
    round(tupleElement(buckets, 1)[arrayFirstIndex(c -> c >= greatest(1, ceil(0.99 * calls)), cumulative)] / 1000, 2) AS p99_ms
FROM usage_minute_final
WHERE minute >= toStartOfMonth(now()) AND minute < now()
GROUP BY consumer
ORDER BY consumer
