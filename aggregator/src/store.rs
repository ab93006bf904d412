//! ClickHouse side: recomputing a minute's usage rows from the deduplicated raw table, writing
//! them, and reading usage back for the CLI.
//!
//! A usage row is a pure function of the raw events of its key in `api_calls FINAL`. Writing
//! it again (after a restart, a late event, a second instance) replaces it: `usage_minute` is a
//! `ReplacingMergeTree(version)` and reads are `FINAL`. Because the raw table only grows, a
//! later recomputation (higher `version`) is never less complete than an earlier one.

use std::collections::BTreeSet;

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::histogram::Latencies;
use crate::tracker::{GroupAgg, MinuteAgg};

pub const RAW_TABLE: &str = "api_calls";
pub const USAGE_TABLE: &str = "usage_minute";

/// Above this many consumers, a minute is read whole and filtered here instead of with an
/// `IN (...)` list in the query.
const MAX_IN_LIST: usize = 500;

/// The columns of one raw event that usage needs.
#[derive(Debug, clickhouse::Row, Deserialize)]
struct RawCall {
    consumer_id: String,
    route_id: String,
    outcome: i8,
    status: u16,
    latency_us: u64,
    request_bytes: u64,
    response_bytes: u64,
}

/// One row of `usage_minute` (column order as in `schemas/migrations/0002_usage_minute.sql`).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct UsageRow {
    pub minute: u32,
    pub consumer_id: String,
    pub route_id: String,
    pub outcome: i8,
    pub status_class: u8,
    pub requests: u64,
    pub errors_4xx: u64,
    pub errors_5xx: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency_sum_us: u64,
    pub latency_le_us: Vec<u64>,
    pub latency_count: Vec<u64>,
    pub version: u64,
}

/// One key's counts while the raw events stream in key order.
struct Group {
    key: (String, String, i8, u8),
    agg: GroupAgg,
    latencies: Latencies,
}

impl Group {
    fn key_matches(&self, c: &RawCall) -> bool {
        self.key.0 == c.consumer_id
            && self.key.1 == c.route_id
            && self.key.2 == c.outcome
            && self.key.3 == status_class(c.status)
    }

    fn finish(&mut self, minute: u32, version: u64, out: &mut Vec<UsageRow>) {
        out.push(row(minute, &self.key.0, &self.key.1, (self.key.2, self.key.3), &self.agg, &self.latencies, version));
        self.latencies.reset();
    }
}

/// A usage row from a group's counts and its latency histogram.
fn row(
    minute: u32,
    consumer: &str,
    route: &str,
    (outcome, class): (i8, u8),
    g: &GroupAgg,
    h: &Latencies,
    version: u64,
) -> UsageRow {
    let (latency_le_us, latency_count) = h.buckets();
    UsageRow {
        minute,
        consumer_id: consumer.to_owned(),
        route_id: route.to_owned(),
        outcome,
        status_class: class,
        requests: g.requests,
        errors_4xx: g.errors_4xx,
        errors_5xx: g.errors_5xx,
        request_bytes: g.request_bytes,
        response_bytes: g.response_bytes,
        latency_sum_us: g.latency_sum_us,
        latency_le_us,
        latency_count,
        version,
    }
}

/// `status / 100`: 2 for 2xx, ..., 0 when no status was sent.
pub fn status_class(status: u16) -> u8 {
    u8::try_from(status / 100).unwrap_or(u8::MAX)
}

/// Recomputes the usage rows of `minute` (Unix seconds, a minute start) for `consumers` from
/// `api_calls FINAL`. `version` goes into every row.
pub async fn recompute(
    client: &Client,
    minute: i64,
    consumers: &BTreeSet<String>,
    version: u64,
) -> Result<Vec<UsageRow>, clickhouse::error::Error> {
    let from = u32::try_from(minute).unwrap_or(0);
    let filter = consumers.len() <= MAX_IN_LIST;
    let mut sql = format!(
        "SELECT consumer_id, route_id, outcome, status, latency_us, request_bytes, response_bytes \
         FROM {RAW_TABLE} FINAL WHERE ts >= toDateTime(?) AND ts < toDateTime(?)"
    );
    if filter {
        sql.push_str(" AND consumer_id IN (");
        sql.push_str(&vec!["?"; consumers.len()].join(", "));
        sql.push(')');
    }
    sql.push_str(" ORDER BY consumer_id, route_id, outcome, intDiv(status, 100)");
    let mut query = client.query(&sql).bind(from).bind(from.saturating_add(60));
    if filter {
        for c in consumers {
            query = query.bind(c.as_str());
        }
    }
    let mut cursor = query.fetch::<RawCall>()?;
    let mut rows = Vec::new();
    let mut group: Option<Group> = None;
    while let Some(call) = cursor.next().await? {
        if !filter && !consumers.contains(&call.consumer_id) {
            continue;
        }
        if !group.as_ref().is_some_and(|g| g.key_matches(&call)) {
            if let Some(g) = &mut group {
                g.finish(from, version, &mut rows);
            }
            let key = (call.consumer_id.clone(), call.route_id.clone(), call.outcome, status_class(call.status));
            match &mut group {
                Some(g) => (g.key, g.agg) = (key, GroupAgg::default()),
                None => group = Some(Group { key, agg: GroupAgg::default(), latencies: Latencies::new() }),
            }
        }
        if let Some(g) = &mut group {
            g.agg.count(call.status, call.latency_us, call.request_bytes, call.response_bytes);
            g.latencies.record(call.latency_us);
        }
    }
    if let Some(g) = &mut group {
        g.finish(from, version, &mut rows);
    }
    Ok(rows)
}

/// The usage rows of `minute` from its in-memory aggregates, for the consumers in `only`,
/// sorted by key. One histogram is reused for every group.
pub fn rows_from_memory(minute: i64, agg: &MinuteAgg, only: impl Fn(&str) -> bool, version: u64) -> Vec<UsageRow> {
    let from = u32::try_from(minute).unwrap_or(0);
    let mut h = Latencies::new();
    let mut rows = Vec::new();
    for (consumer, routes) in &agg.consumers {
        if !only(consumer) {
            continue;
        }
        for (route, groups) in routes {
            for (key, g) in groups {
                for &l in &g.latencies_us {
                    h.record(l);
                }
                rows.push(row(from, consumer, route, *key, g, &h, version));
                h.reset();
            }
        }
    }
    rows.sort_by(|a, b| {
        (&a.consumer_id, &a.route_id, a.outcome, a.status_class).cmp(&(
            &b.consumer_id,
            &b.route_id,
            b.outcome,
            b.status_class,
        ))
    });
    rows
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ConsumerId {
    consumer_id: String,
}

/// The consumers among `consumers` that already have rows for `minute` (written by an
/// earlier run): their in-memory aggregates may miss events read before the restart, so they
/// are recomputed from the raw table instead.
pub async fn written_consumers(
    client: &Client,
    minute: i64,
    consumers: &BTreeSet<String>,
) -> Result<BTreeSet<String>, clickhouse::error::Error> {
    let at = u32::try_from(minute).unwrap_or(0);
    let filter = consumers.len() <= MAX_IN_LIST;
    let mut sql = format!("SELECT DISTINCT consumer_id FROM {USAGE_TABLE} WHERE minute = toDateTime(?)");
    if filter {
        sql.push_str(" AND consumer_id IN (");
        sql.push_str(&vec!["?"; consumers.len()].join(", "));
        sql.push(')');
    }
    let mut q = client.query(&sql).bind(at);
    if filter {
        for c in consumers {
            q = q.bind(c.as_str());
        }
    }
    let rows = q.fetch_all::<ConsumerId>().await?;
    Ok(rows.into_iter().map(|r| r.consumer_id).filter(|c| consumers.contains(c)).collect())
}

/// Writes `rows` as one INSERT (retrying it is safe: rows replace rows of the same key).
pub async fn write(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<UsageRow>(USAGE_TABLE).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// Usage of one consumer (or all) over a window, from merged minute rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub consumer_id: String,
    pub requests: u64,
    pub errors_4xx: u64,
    pub errors_5xx: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub p50_us: Option<u64>,
    pub p95_us: Option<u64>,
    pub p99_us: Option<u64>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageAgg {
    consumer_id: String,
    requests: u64,
    errors_4xx: u64,
    errors_5xx: u64,
    request_bytes: u64,
    response_bytes: u64,
    bounds: Vec<u64>,
    counts: Vec<u64>,
}

/// What to read with [`usage`].
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub consumer: Option<String>,
    pub route: Option<String>,
    /// Unix seconds, inclusive; minute rows starting in `[from, to)` are read.
    pub from: i64,
    pub to: i64,
}

/// Per consumer: counts and P50/P95/P99 from the merged buckets of every minute row in the
/// window (never an average of percentiles).
pub async fn usage(client: &Client, f: &UsageFilter) -> Result<Vec<Usage>, clickhouse::error::Error> {
    let mut sql = format!(
        "SELECT consumer_id, sum(requests), sum(errors_4xx), sum(errors_5xx), sum(request_bytes), \
         sum(response_bytes), tupleElement(sumMap(latency_le_us, latency_count), 1), \
         tupleElement(sumMap(latency_le_us, latency_count), 2) \
         FROM {USAGE_TABLE} FINAL WHERE minute >= toDateTime(?) AND minute < toDateTime(?)"
    );
    if f.consumer.is_some() {
        sql.push_str(" AND consumer_id = ?");
    }
    if f.route.is_some() {
        sql.push_str(" AND route_id = ?");
    }
    sql.push_str(" GROUP BY consumer_id ORDER BY consumer_id");
    let clamp = |s: i64| u32::try_from(s.max(0)).unwrap_or(u32::MAX);
    let mut q = client.query(&sql).bind(clamp(f.from)).bind(clamp(f.to));
    if let Some(c) = &f.consumer {
        q = q.bind(c.as_str());
    }
    if let Some(r) = &f.route {
        q = q.bind(r.as_str());
    }
    let rows = q.fetch_all::<UsageAgg>().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut h = Latencies::new();
            h.add_buckets(&r.bounds, &r.counts);
            Usage {
                consumer_id: r.consumer_id,
                requests: r.requests,
                errors_4xx: r.errors_4xx,
                errors_5xx: r.errors_5xx,
                request_bytes: r.request_bytes,
                response_bytes: r.response_bytes,
                p50_us: h.quantile(0.5),
                p95_us: h.quantile(0.95),
                p99_us: h.quantile(0.99),
            }
        })
        .collect())
}
