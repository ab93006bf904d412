//! Counters and gauges of the aggregator, rendered for Prometheus on the admin port.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub events: AtomicU64,
    pub late_events: AtomicU64,
    pub skipped_messages: AtomicU64,
    pub minutes_written: AtomicU64,
    pub minutes_recomputed: AtomicU64,
    pub rows_written: AtomicU64,
    pub clickhouse_errors: AtomicU64,
    pub ingest_waits: AtomicU64,
    pub quota_states: AtomicU64,
    pub slo_evaluations: AtomicU64,
    pub alerts_fired: AtomicU64,
    pub alerts_resolved: AtomicU64,
    pub clock_seconds: AtomicI64,
    pub open_minutes: AtomicI64,
    /// Partitions of the events topic this replica holds now.
    pub partitions_assigned: std::sync::Arc<AtomicI64>,
    /// Per objective (not per consumer): the share of the error budget left over the budget
    /// period, from the last evaluation.
    pub slo_budget_remaining: std::sync::Mutex<Vec<(String, f64)>>,
    /// Each alert receiver's deliveries, by its name (registered when the evaluator starts).
    pub receivers: std::sync::Mutex<Vec<(String, std::sync::Arc<ReceiverStats>)>>,
}

/// A per-receiver metric: name, type, help, value.
type Family = (&'static str, &'static str, &'static str, fn(&ReceiverStats) -> i64);

/// One alert receiver's deliveries.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Notifications it took (2xx), repeats to Alertmanager included.
    pub delivered: AtomicU64,
    /// Failed attempts (retried with backoff until delivered, unless rejected).
    pub failures: AtomicU64,
    /// Notifications it rejected for good (a 4xx other than 408, 425, 429): not retried.
    pub rejected: AtomicU64,
    /// Notifications waiting for it, the one being sent included.
    pub queued: AtomicI64,
}

impl Metrics {
    /// The counters of receiver `name`, registered for rendering.
    pub fn receiver(&self, name: &str) -> std::sync::Arc<ReceiverStats> {
        let mut all = self.receivers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, s)) = all.iter().find(|(n, _)| n == name) {
            return std::sync::Arc::clone(s);
        }
        let stats = std::sync::Arc::new(ReceiverStats::default());
        all.push((name.to_owned(), std::sync::Arc::clone(&stats)));
        stats
    }
}

impl tollgate_common::admin::Render for Metrics {
    fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            ("tollgate_aggregator_events_total", "Events read from api-calls (duplicates included).", &self.events),
            (
                "tollgate_aggregator_late_events_total",
                "Events that arrived after their minute had closed; they still count (the minute is rewritten).",
                &self.late_events,
            ),
            (
                "tollgate_aggregator_skipped_messages_total",
                "Messages that are not valid events (ingest dead-letters them); not aggregated.",
                &self.skipped_messages,
            ),
            (
                "tollgate_aggregator_minutes_written_total",
                "Minutes written to usage_minute (first writes and rewrites).",
                &self.minutes_written,
            ),
            (
                "tollgate_aggregator_minutes_recomputed_total",
                "Minute writes that recomputed some consumers from api_calls FINAL (late events, or minutes an earlier run had written).",
                &self.minutes_recomputed,
            ),
            ("tollgate_aggregator_rows_written_total", "Rows written to usage_minute.", &self.rows_written),
            (
                "tollgate_aggregator_clickhouse_errors_total",
                "Failed ClickHouse reads or writes (retried).",
                &self.clickhouse_errors,
            ),
            (
                "tollgate_aggregator_ingest_waits_total",
                "Times a closed minute waited for ingest to commit past its events.",
                &self.ingest_waits,
            ),
            (
                "tollgate_aggregator_quota_states_total",
                "Quota states published to the quota-state topic.",
                &self.quota_states,
            ),
            (
                "tollgate_aggregator_slo_evaluations_total",
                "SLO evaluations (every objective, once per closed minute, on the instance reading partition 0).",
                &self.slo_evaluations,
            ),
            (
                "tollgate_aggregator_slo_alerts_fired_total",
                "SLO alerts that started firing (handed to their receivers and recorded in slo_alerts).",
                &self.alerts_fired,
            ),
            (
                "tollgate_aggregator_slo_alerts_resolved_total",
                "SLO alerts that stopped firing (handed to their receivers and recorded).",
                &self.alerts_resolved,
            ),
        ];
        let counters = counters.map(|(name, help, v)| (name, help, v.load(Ordering::Relaxed).to_string()));
        tollgate_common::admin::write_family(&mut out, "counter", &counters);
        let gauges = [
            (
                "tollgate_aggregator_clock_seconds",
                "Event-time clock that closes minutes: the slowest active partition's watermark (Unix seconds).",
                &self.clock_seconds,
            ),
            ("tollgate_aggregator_open_minutes", "Minutes with events not yet written.", &self.open_minutes),
            (
                "tollgate_aggregator_partitions_assigned",
                "Partitions of the events topic this replica holds now.",
                &*self.partitions_assigned,
            ),
        ];
        let gauges = gauges.map(|(name, help, v)| (name, help, v.load(Ordering::Relaxed).to_string()));
        tollgate_common::admin::write_family(&mut out, "gauge", &gauges);
        let budgets = self.slo_budget_remaining.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !budgets.is_empty() {
            let name = "tollgate_aggregator_slo_budget_remaining";
            let _ = writeln!(
                out,
                "# HELP {name} Share of each SLO's error budget left over slo.budget_period_days (1: untouched, 0: spent, below 0: overspent), from the last evaluation; objectives over all calls only.\n# TYPE {name} gauge"
            );
            for (slo, left) in budgets.iter() {
                let _ = writeln!(out, "{name}{{slo=\"{slo}\"}} {left:.6}");
            }
        }
        let receivers = self.receivers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !receivers.is_empty() {
            let families: [Family; 4] = [
                (
                    "tollgate_aggregator_slo_notifications_delivered_total",
                    "counter",
                    "Notifications each alert receiver took (2xx), repeats to Alertmanager included.",
                    |s| s.delivered.load(Ordering::Relaxed) as i64,
                ),
                (
                    "tollgate_aggregator_slo_webhook_failures_total",
                    "counter",
                    "Failed deliveries to each alert receiver (retried with backoff until delivered, unless rejected).",
                    |s| s.failures.load(Ordering::Relaxed) as i64,
                ),
                (
                    "tollgate_aggregator_slo_webhook_rejected_total",
                    "counter",
                    "Notifications each alert receiver rejected with a 4xx other than 408, 425 and 429 (not retried; recorded in slo_alerts with delivered = 0).",
                    |s| s.rejected.load(Ordering::Relaxed) as i64,
                ),
                (
                    "tollgate_aggregator_slo_notifications_queued",
                    "gauge",
                    "Notifications waiting for each alert receiver, the one being sent included (grows while a receiver is down).",
                    |s| s.queued.load(Ordering::Relaxed),
                ),
            ];
            for (name, kind, help, value) in families {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (receiver, stats) in receivers.iter() {
                    let _ = writeln!(out, "{name}{{receiver=\"{receiver}\"}} {}", value(stats));
                }
            }
        }
        out
    }
}
