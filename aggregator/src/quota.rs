//! Monthly quotas: month-to-date usage per consumer → [`QuotaState`], written to ClickHouse
//! (`quota_state`) and to the compacted topic `quota-state` that every edge reads.
//!
//! - The plan of a consumer is the `plan_id` of its latest event (by event time), so a plan
//!   change applies from the consumer's next call.
//! - Counted calls: outcome `forwarded` with a status below 500 (what billing bills); the
//!   edge counts the same ones locally between updates.
//! - Periods: calendar months UTC, or months starting on `quota.period_anchor_day`; a state
//!   carries its period's start and end, and an edge chains the next periods from the end.
//! - A state is recomputed from `usage_minute FINAL` whenever minutes of the consumer are
//!   written; `covered_until` is the end of the last closed minute, so an edge adds exactly
//!   the calls it admitted since.
//! - A consumer's states go to Kafka in period order: once a period's state is published, a
//!   late event of an earlier period updates ClickHouse only, so it cannot replace the
//!   consumer's current state in the compacted topic. (Edges also ignore a state of an
//!   earlier period than the one they hold.) ClickHouse keeps every period.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tollgate_common::time;
use tollgate_schemas::quota::{Enforcement, QuotaCodec, QuotaState, QuotaStatus};

use crate::config::QuotaConfig;
use crate::store::USAGE_TABLE;
use crate::tracker::minute_of;

#[derive(Debug, clickhouse::Row, Serialize)]
struct QuotaRow {
    consumer_id: String,
    period: String,
    plan_id: String,
    quota: u64,
    used: u64,
    status: i8,
    enforcement: i8,
    warning_percent: u8,
    period_start: u32,
    period_end: u32,
    covered_until: u32,
    computed_at_us: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Used {
    consumer_id: String,
    used: u64,
}

/// Why publishing failed (retried by the caller).
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("encoding: {0}")]
    Encode(#[from] tollgate_schemas::EncodeError),
}

pub struct Quotas {
    cfg: QuotaConfig,
    producer: Option<FutureProducer>,
    codec: QuotaCodec,
    /// consumer → (event time, plan) of its latest event.
    plan_of: HashMap<String, (i64, String)>,
    /// (consumer, period start) whose usage changed since the last publication.
    touched: BTreeSet<(String, i64)>,
    /// consumer → the latest period published to Kafka.
    published: HashMap<String, i64>,
}

impl Quotas {
    pub fn new(cfg: QuotaConfig, brokers: &str, properties: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let producer = if cfg.plans.is_empty() {
            None
        } else {
            let mut cc = ClientConfig::new();
            cc.set("bootstrap.servers", brokers)
                .set("acks", "all")
                .set("linger.ms", "5")
                .set("message.timeout.ms", "10000");
            for (k, v) in properties {
                // Consumer-only properties would make the producer refuse to start.
                if !k.starts_with("group.") && !k.starts_with("auto.") && !k.starts_with("fetch.") {
                    cc.set(k, v);
                }
            }
            Some(cc.create()?)
        };
        Ok(Self {
            cfg,
            producer,
            codec: QuotaCodec::new()?,
            plan_of: HashMap::new(),
            touched: BTreeSet::new(),
            published: HashMap::new(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.producer.is_some()
    }

    /// Remembers the plan of a consumer's event.
    pub fn observe(&mut self, consumer: &str, ts_s: i64, plan: Option<&str>) {
        let (Some(plan), false, true) = (plan, consumer.is_empty(), self.enabled()) else { return };
        match self.plan_of.get_mut(consumer) {
            Some((t, p)) => {
                if ts_s >= *t {
                    *t = ts_s;
                    if p != plan {
                        plan.clone_into(p);
                    }
                }
            }
            None => {
                self.plan_of.insert(consumer.to_owned(), (ts_s, plan.to_owned()));
            }
        }
    }

    /// The usage of `consumers` in `minute` was (re)written.
    pub fn touch<'a>(&mut self, minute: i64, consumers: impl Iterator<Item = &'a String>) {
        if !self.enabled() {
            return;
        }
        let period = time::period_start(minute, self.cfg.period_anchor_day);
        for c in consumers {
            if self.plan_of.get(c).is_some_and(|(_, p)| self.cfg.plans.contains_key(p)) {
                self.touched.insert((c.clone(), period));
            }
        }
    }

    /// Recomputes and publishes the state of every touched consumer. `covered_until_s` is the
    /// end of the last closed minute (every earlier minute is written).
    pub async fn publish(&mut self, client: &Client, covered_until_s: i64, now_us: i64) -> Result<usize, QuotaError> {
        let Some(producer) = &self.producer else { return Ok(0) };
        if self.touched.is_empty() {
            return Ok(0);
        }
        let mut by_period: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for (c, p) in &self.touched {
            by_period.entry(*p).or_default().push(c.clone());
        }
        let mut states = Vec::new();
        for (start, consumers) in by_period {
            let end = time::add_month(start);
            let used = used_in(client, &consumers, start, end).await?;
            for c in consumers {
                let Some((_, plan_id)) = self.plan_of.get(&c) else { continue };
                let Some(plan) = self.cfg.plans.get(plan_id) else { continue };
                let used = used.get(&c).copied().unwrap_or(0);
                states.push(QuotaState {
                    period: time::month_label(start),
                    period_start_us: start * 1_000_000,
                    period_end_us: end * 1_000_000,
                    quota: plan.monthly_calls,
                    used,
                    status: QuotaStatus::of(used, plan.monthly_calls, plan.warning_percent),
                    enforcement: plan.enforcement,
                    warning_percent: plan.warning_percent,
                    covered_until_us: covered_until_s.clamp(start, end) * 1_000_000,
                    computed_at_us: now_us,
                    plan_id: plan_id.clone(),
                    consumer_id: c,
                });
            }
        }
        let mut insert = client.insert::<QuotaRow>("quota_state").await?;
        for s in &states {
            let secs = |us: i64| u32::try_from(us / 1_000_000).unwrap_or(0);
            insert
                .write(&QuotaRow {
                    consumer_id: s.consumer_id.clone(),
                    period: s.period.clone(),
                    plan_id: s.plan_id.clone(),
                    quota: s.quota,
                    used: s.used,
                    status: s.status as i8 + 1,
                    enforcement: s.enforcement as i8 + 1,
                    warning_percent: s.warning_percent,
                    period_start: secs(s.period_start_us),
                    period_end: secs(s.period_end_us),
                    covered_until: secs(s.covered_until_us),
                    computed_at_us: u64::try_from(s.computed_at_us).unwrap_or(0),
                })
                .await?;
        }
        insert.end().await?;
        let mut payloads = Vec::new();
        let mut latest: HashMap<&str, i64> = HashMap::new();
        for s in &states {
            let start = s.period_start_us / 1_000_000;
            if self.published.get(&s.consumer_id).is_some_and(|&p| p > start) {
                continue; // an earlier period than the one already published
            }
            payloads.push((s.consumer_id.as_str(), self.codec.encode(s)?));
            let l = latest.entry(s.consumer_id.as_str()).or_insert(start);
            *l = (*l).max(start);
        }
        // Enqueue all (send_result does not wait), then wait for every acknowledgement.
        let mut deliveries = Vec::with_capacity(payloads.len());
        for (key, payload) in &payloads {
            let record = FutureRecord::to(&self.cfg.topic).key(*key).payload(payload);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        let sent = deliveries.len();
        for d in deliveries {
            d.await.map_err(|_| rdkafka::error::KafkaError::Canceled)?.map_err(|(e, _)| e)?;
        }
        for (c, p) in latest {
            self.published.insert(c.to_owned(), p);
        }
        self.touched.clear();
        Ok(sent)
    }
}

/// Counted calls (forwarded, status < 500) of `consumers` in `[start, end)`.
async fn used_in(
    client: &Client,
    consumers: &[String],
    start: i64,
    end: i64,
) -> Result<HashMap<String, u64>, clickhouse::error::Error> {
    let mut out = HashMap::new();
    for chunk in consumers.chunks(500) {
        let sql = format!(
            "SELECT consumer_id, sum(requests) AS used FROM {USAGE_TABLE} FINAL \
             WHERE minute >= toDateTime(?) AND minute < toDateTime(?) AND outcome = 'forwarded' AND status_class < 5 \
             AND consumer_id IN ({}) GROUP BY consumer_id",
            vec!["?"; chunk.len()].join(", ")
        );
        let clamp = |s: i64| u32::try_from(s.max(0)).unwrap_or(u32::MAX);
        let mut q = client.query(&sql).bind(clamp(start)).bind(clamp(end));
        for c in chunk {
            q = q.bind(c.as_str());
        }
        for row in q.fetch_all::<Used>().await? {
            out.insert(row.consumer_id, row.used);
        }
    }
    Ok(out)
}

/// The end of the last minute closed by `clock_s` with `lateness_s`: every minute before it
/// is written.
pub fn covered_until(clock_s: i64, lateness_s: i64) -> i64 {
    minute_of(clock_s - 60 - lateness_s) + 60
}

/// A plan's quota settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaPlan {
    pub monthly_calls: u64,
    pub enforcement: Enforcement,
    pub warning_percent: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_until_is_the_end_of_the_last_closed_minute() {
        let m = 1_795_651_200; // a minute start
        // Minute m closes at m + 70 with 10 s lateness.
        assert_eq!(covered_until(m + 69, 10), m);
        assert_eq!(covered_until(m + 70, 10), m + 60);
        assert_eq!(covered_until(m + 129, 10), m + 60);
    }
}
