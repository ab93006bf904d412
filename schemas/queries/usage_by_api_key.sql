-- This month's calls per consumer and credential (API key id, certificate id or jwt:<issuer>),
-- for a per-key breakdown beside the consumer's invoice: all calls, and the ones billing's
-- default rule bills (forwarded with a status below 500; a plan's billable_outcomes and
-- billable_below_status may differ), with the days each key was first and last used. Reads
-- `api_calls FINAL` so a redelivered event never counts twice. Another month: replace the
-- two bounds (UTC), e.g. ts >= toDateTime('2026-10-01 00:00:00', 'UTC').
SELECT
    consumer_id,
    credential_id,
    count() AS calls,
    countIf(outcome = 'forwarded' AND status < 500) AS billable_calls,
    toDate(min(ts)) AS first_used,
    toDate(max(ts)) AS last_used
FROM api_calls FINAL
WHERE consumer_id != ''
    AND ts >= toStartOfMonth(now())
    AND ts < addMonths(toStartOfMonth(now()), 1)
GROUP BY consumer_id, credential_id
ORDER BY consumer_id, credential_id
