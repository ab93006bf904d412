//! Reading a period's usage from ClickHouse: the aggregator's `usage_minute` (counts per
//! route, outcome and status class; latency histograms) and, for each consumer, its plan
//! (the `plan_id` of its latest call in the period, from `api_calls`).

use std::collections::BTreeMap;

use clickhouse::Client;
use serde::Deserialize;
use tollgate_aggregator::histogram::Latencies;

use crate::pricing::{PeriodUsage, Plan};

#[derive(Debug, clickhouse::Row, Deserialize)]
struct PlanRow {
    consumer_id: String,
    plan_id: String,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageRow {
    consumer_id: String,
    route_id: String,
    outcome: String,
    status_class: u8,
    requests: u64,
    errors_5xx: u64,
    bounds: Vec<u64>,
    counts: Vec<u64>,
}

/// Outcomes where the edge tried an upstream: they make the availability measurement.
const ATTEMPTED: [&str; 3] = ["forwarded", "upstream_error", "upstream_timeout"];

/// Every consumer's plan in `[start, end)` (Unix seconds).
pub async fn plans(
    client: &Client,
    start: i64,
    end: i64,
) -> Result<BTreeMap<String, String>, clickhouse::error::Error> {
    let rows = client
        .query(
            "SELECT consumer_id, argMax(plan_id, start_time_us) AS plan_id FROM api_calls \
             WHERE ts >= toDateTime(?) AND ts < toDateTime(?) AND consumer_id != '' GROUP BY consumer_id",
        )
        .bind(start)
        .bind(end)
        .fetch_all::<PlanRow>()
        .await?;
    Ok(rows.into_iter().map(|r| (r.consumer_id, r.plan_id)).collect())
}

/// The usage in `[start, end)` of every consumer in `plans` whose plan is priced, as its plan
/// counts it (billable outcomes and statuses, availability, P99 of forwarded calls).
pub async fn period_usage(
    client: &Client,
    start: i64,
    end: i64,
    plan_of: &BTreeMap<String, &Plan>,
) -> Result<BTreeMap<String, PeriodUsage>, clickhouse::error::Error> {
    let rows = client
        .query(
            "SELECT consumer_id, route_id, toString(outcome) AS outcome, status_class, sum(requests), sum(errors_5xx), \
             tupleElement(sumMap(latency_le_us, latency_count), 1), tupleElement(sumMap(latency_le_us, latency_count), 2) \
             FROM usage_minute FINAL WHERE minute >= toDateTime(?) AND minute < toDateTime(?) AND consumer_id != '' \
             GROUP BY consumer_id, route_id, outcome, status_class ORDER BY consumer_id, route_id, outcome, status_class",
        )
        .bind(start)
        .bind(end)
        .fetch_all::<UsageRow>()
        .await?;
    let mut out: BTreeMap<String, PeriodUsage> = BTreeMap::new();
    let mut latencies: BTreeMap<String, Latencies> = BTreeMap::new();
    for r in rows {
        let Some(plan) = plan_of.get(&r.consumer_id) else { continue };
        let u = out.entry(r.consumer_id.clone()).or_default();
        if plan.billable_outcomes.contains(&r.outcome) && u16::from(r.status_class) * 100 < plan.billable_below_status {
            *u.billable_calls.entry(r.route_id.clone()).or_default() += r.requests;
        }
        if ATTEMPTED.contains(&r.outcome.as_str()) {
            u.attempted += r.requests;
            u.failed += r.errors_5xx;
        }
        if r.outcome == "forwarded" {
            latencies.entry(r.consumer_id.clone()).or_default().add_buckets(&r.bounds, &r.counts);
        }
    }
    for (c, h) in latencies {
        if let Some(u) = out.get_mut(&c) {
            u.p99_us = h.quantile(0.99);
        }
    }
    Ok(out)
}
