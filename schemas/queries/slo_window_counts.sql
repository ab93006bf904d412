-- What the aggregator's SLO evaluator reads (aggregator/src/slo/; a unit test keeps this file
-- equal to what it generates, and the migrations test runs it on current ClickHouse).
--
-- The first two are the reference: per consumer (c = '' for an objective over all calls),
-- the calls an objective counts (`totals`) and the bad ones (`bads`) in each window of its
-- alert rules, here 5 and 60 minutes ending at the current minute, in one read of the longest
-- window. Burn rate of a window = (bads[i] / totals[i]) / (1 - objective). Availability:
-- counted are forwarded calls, upstream errors and timeouts and calls cut by an edge's
-- shutdown; bad are those and forwarded 5xx. Latency (threshold 250 ms here): counted are
-- forwarded calls; bad are those in histogram buckets whose upper bound is above the threshold.

-- An availability objective over all calls.
SELECT c AS consumer_id, [sumIf(t, minute >= toStartOfMinute(now()) - 300), sumIf(t, minute >= toStartOfMinute(now()) - 3600)] AS totals, [sumIf(b, minute >= toStartOfMinute(now()) - 300), sumIf(b, minute >= toStartOfMinute(now()) - 3600)] AS bads
FROM (SELECT '' AS c, minute, if(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout', 'edge_shutdown'), requests, 0) AS t, if(outcome IN ('upstream_error', 'upstream_timeout', 'edge_shutdown') OR (outcome = 'forwarded' AND status_class = 5), requests, 0) AS b FROM usage_minute FINAL
WHERE minute >= toStartOfMinute(now()) - 3600 AND minute < toStartOfMinute(now()))
GROUP BY c;

-- A latency objective per consumer.
SELECT c AS consumer_id, [sumIf(t, minute >= toStartOfMinute(now()) - 300), sumIf(t, minute >= toStartOfMinute(now()) - 3600)] AS totals, [sumIf(b, minute >= toStartOfMinute(now()) - 300), sumIf(b, minute >= toStartOfMinute(now()) - 3600)] AS bads
FROM (SELECT consumer_id AS c, minute, if(outcome = 'forwarded', requests, 0) AS t, if(outcome = 'forwarded', arraySum(arrayFilter((n, le) -> le > 250000, latency_count, latency_le_us)), 0) AS b FROM usage_minute FINAL
WHERE minute >= toStartOfMinute(now()) - 3600 AND minute < toStartOfMinute(now()))
GROUP BY c;

-- The evaluator gets the same numbers incrementally (docs/ARCHITECTURE.md, "SLOs and
-- alerts"); here for windows of 5 minutes, 60 minutes and 3 days ending at 2026-11-26 20:25
-- UTC. Each evaluation: the fingerprint (row count, sum of versions) of every whole hour, to
-- find the hours rewritten since they were cached...
SELECT toUInt32(intDiv(toUInt32(minute), 3600) * 3600) AS hour, count() AS rows, sum(version) AS versions FROM usage_minute PREWHERE minute >= toDateTime(1795467600) AND minute < toDateTime(1795723200) GROUP BY hour;

-- ...the counts of such hours (all of them the first time), per consumer and hour
-- (availability on route `echo`)...
SELECT c AS consumer_id, h AS hour, sum(t) AS total, sum(b) AS bad FROM (SELECT '' AS c, toUInt32(intDiv(toUInt32(minute), 3600) * 3600) AS h, if(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout', 'edge_shutdown'), requests, 0) AS t, if(outcome IN ('upstream_error', 'upstream_timeout', 'edge_shutdown') OR (outcome = 'forwarded' AND status_class = 5), requests, 0) AS b FROM usage_minute FINAL PREWHERE minute >= toDateTime(1795467600) AND minute < toDateTime(1795723200) AND route_id = 'echo') GROUP BY c, h;

-- ...and the partial hours at the windows' ends, every time (latency per consumer).
SELECT c AS consumer_id, [sumIf(t, minute >= toDateTime(1795724400) AND minute < toDateTime(1795724700)), sumIf(t, minute >= toDateTime(1795721100) AND minute < toDateTime(1795723200)), sumIf(t, minute >= toDateTime(1795723200) AND minute < toDateTime(1795724700)), sumIf(t, minute >= toDateTime(1795465500) AND minute < toDateTime(1795467600))] AS totals, [sumIf(b, minute >= toDateTime(1795724400) AND minute < toDateTime(1795724700)), sumIf(b, minute >= toDateTime(1795721100) AND minute < toDateTime(1795723200)), sumIf(b, minute >= toDateTime(1795723200) AND minute < toDateTime(1795724700)), sumIf(b, minute >= toDateTime(1795465500) AND minute < toDateTime(1795467600))] AS bads FROM (SELECT consumer_id AS c, minute, if(outcome = 'forwarded', requests, 0) AS t, if(outcome = 'forwarded', arraySum(arrayFilter((n, le) -> le > 250000, latency_count, latency_le_us)), 0) AS b FROM usage_minute FINAL PREWHERE ((minute >= toDateTime(1795724400) AND minute < toDateTime(1795724700)) OR (minute >= toDateTime(1795721100) AND minute < toDateTime(1795723200)) OR (minute >= toDateTime(1795723200) AND minute < toDateTime(1795724700)) OR (minute >= toDateTime(1795465500) AND minute < toDateTime(1795467600)))) GROUP BY c;
