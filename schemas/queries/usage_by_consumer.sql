-- Usage per consumer over all raw events: calls, forwarded calls, 4xx/5xx counts and exact
-- P99 latency. Reads `api_calls FINAL` so a redelivered event never counts twice.
SELECT
    if(consumer_id = '', '(unauthenticated)', consumer_id) AS consumer,
    count() AS calls,
    countIf(outcome = 'forwarded') AS forwarded,
    countIf(status >= 400 AND status < 500) AS errors_4xx,
    countIf(status >= 500) AS errors_5xx,
    round(quantileExact(0.99)(latency_us) / 1000, 2) AS p99_ms
FROM api_calls FINAL
GROUP BY consumer
ORDER BY consumer
