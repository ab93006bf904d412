-- SLO alerts firing now: alerts whose latest notification in `slo_alerts` (every delivered
-- change, docs/ARCHITECTURE.md "SLOs and alerts") is `firing`, most severe first. The burn
-- rates are those of the evaluation that fired the alert; `slo_burn_rate` has the current
-- ones.
SELECT
    alert_id,
    argMax(slo_id, at_us) AS slo,
    argMax(consumer_id, at_us) AS consumer,
    argMax(severity, at_us) AS severity,
    argMax(window_end, at_us) AS firing_since,
    round(argMax(long_burn_rate, at_us), 2) AS long_burn_rate,
    round(argMax(short_burn_rate, at_us), 2) AS short_burn_rate,
    argMax(delivered, at_us) AS delivered
FROM slo_alerts
GROUP BY alert_id
HAVING argMax(status, at_us) = 'firing'
ORDER BY severity, firing_since, alert_id
