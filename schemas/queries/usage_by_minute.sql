-- Calls per minute and consumer over the last hour (a Grafana time series reads the same).
SELECT
    toStartOfMinute(ts) AS minute,
    consumer_id,
    count() AS calls,
    countIf(status >= 500) AS errors_5xx
FROM api_calls_unique
WHERE ts >= now() - 3600
GROUP BY minute, consumer_id
ORDER BY minute, consumer_id
