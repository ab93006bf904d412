-- What the aggregator's SLO evaluator reads (aggregator/src/slo/mod.rs builds these; a unit
-- test keeps this file equal to its output). Per consumer (c = '' for an objective over all
-- calls), the calls an objective counts (`totals`) and the bad ones (`bads`) in each window
-- of its alert rules, here 5 and 60 minutes ending at the current minute; the evaluator ends
-- them at the end of the last closed minute instead. Burn rate of a window =
-- (bads[i] / totals[i]) / (1 - objective). Availability: counted are forwarded calls, upstream
-- errors and timeouts and calls cut by an edge's shutdown; bad are those and forwarded 5xx.
-- Latency (threshold 250 ms here): counted are forwarded calls; bad are those in histogram
-- buckets whose upper bound is above the threshold.
SELECT c AS consumer_id, [sumIf(t, minute >= toStartOfMinute(now()) - 300), sumIf(t, minute >= toStartOfMinute(now()) - 3600)] AS totals, [sumIf(b, minute >= toStartOfMinute(now()) - 300), sumIf(b, minute >= toStartOfMinute(now()) - 3600)] AS bads
FROM (SELECT '' AS c, minute, if(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout', 'edge_shutdown'), requests, 0) AS t, if(outcome IN ('upstream_error', 'upstream_timeout', 'edge_shutdown') OR (outcome = 'forwarded' AND status_class = 5), requests, 0) AS b FROM usage_minute FINAL
WHERE minute >= toStartOfMinute(now()) - 3600 AND minute < toStartOfMinute(now()))
GROUP BY c;

-- A latency objective per consumer.
SELECT c AS consumer_id, [sumIf(t, minute >= toStartOfMinute(now()) - 300), sumIf(t, minute >= toStartOfMinute(now()) - 3600)] AS totals, [sumIf(b, minute >= toStartOfMinute(now()) - 300), sumIf(b, minute >= toStartOfMinute(now()) - 3600)] AS bads
FROM (SELECT consumer_id AS c, minute, if(outcome = 'forwarded', requests, 0) AS t, if(outcome = 'forwarded', arraySum(arrayFilter((n, le) -> le > 250000, latency_count, latency_le_us)), 0) AS b FROM usage_minute FINAL
WHERE minute >= toStartOfMinute(now()) - 3600 AND minute < toStartOfMinute(now()))
GROUP BY c;
