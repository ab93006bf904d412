-- Calls per outcome and HTTP status, each event counted once.
SELECT outcome, status, count() AS calls
FROM api_calls FINAL
GROUP BY outcome, status
ORDER BY outcome, status
