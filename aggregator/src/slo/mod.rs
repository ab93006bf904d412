//! SLO burn rates and alerts.
//!
//! Whenever the pipeline closes a minute, the evaluator computes, for every objective
//! (`[[slo.objectives]]`) and every window its rules use, the calls the objective counts and
//! the bad ones, from `usage_minute FINAL` up to the end of the last closed minute; writes the
//! burn rates to `slo_burn_rate`; and decides each rule's alert: firing when the burn rate of
//! both its long and its short window is at least the rule's (and the long window holds
//! `min_requests` calls), resolved when that stops. A change is a notification: POSTed to
//! each receiver that takes its severity (`[slo.receivers.<name>]`, or the one of
//! `slo.webhook_url`), in that receiver's format, retried until delivered unless the receiver
//! rejects it with a 4xx (see [`rejects`]); each receiver has its own queue, so one that is
//! down holds up only itself. Once every receiver is done with it, it is recorded in
//! `slo_alerts`, whose latest row per alert is the state a (re)started evaluator starts from.
//!
//! Only the aggregator instance that reads partition 0 of `api-calls` evaluates, so a group
//! of aggregators sends each notification once.

pub mod config;
pub mod windows;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use clickhouse::Client;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tollgate_common::backoff::Backoff;
use tollgate_common::time;

pub use config::{Format, Kind, Objective, Rule, SloConfig, Webhook};

use crate::metrics::{Metrics, ReceiverStats};
use crate::store::USAGE_TABLE;

/// Notifications waiting for one receiver at most (then evaluation waits).
const QUEUE: usize = 1024;

/// How long Alertmanager keeps a firing alert that is not sent again (`endsAt`): five
/// evaluations. An aggregator that stops evaluating (stopped, or ClickHouse unreachable) lets
/// its alerts resolve in Alertmanager after this.
pub const ALERTMANAGER_LIFETIME_S: i64 = 300;

/// The calls an objective counts in one window, and the bad ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub total: u64,
    pub bad: u64,
}

impl Counts {
    /// How many times faster than the objective allows the window spends the error budget.
    pub fn burn_rate(self, budget: f64) -> f64 {
        if self.total == 0 { 0.0 } else { self.bad as f64 / self.total as f64 / budget }
    }
}

/// Whether a rule fires on these windows: both burn at least the rule's rate, with enough
/// calls in the long window to mean something.
/// (A burn rate equal to the rule's, up to floating-point rounding, fires: 5 bad calls of 100
/// against a 99 % objective burn at 5x.)
pub fn fires(o: &Objective, rule: &Rule, long: Counts, short: Counts) -> bool {
    let reaches = |c: Counts| c.burn_rate(o.budget()) >= rule.burn_rate * (1.0 - 1e-9);
    long.total >= o.min_requests.max(1) && reaches(long) && reaches(short)
}

/// `objective/severity/LONGm-SHORTm`, with `/consumer` for per-consumer objectives.
pub fn alert_id(o: &Objective, rule: &Rule, consumer: &str) -> String {
    let mut id = format!("{}/{}/{}m-{}m", o.id, rule.severity, rule.long_minutes, rule.short_minutes);
    if o.per_consumer {
        id.push('/');
        id.push_str(consumer);
    }
    id
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// Why a notification was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The burn rates crossed the rule's threshold (firing) or no longer do (resolved).
    BurnRate,
    /// The alert's objective or rule is no longer in the configuration, so nothing would ever
    /// resolve it (resolved).
    Removed,
}

/// One window of a notification. The counts are absent when the alert was resolved because
/// its objective or rule was removed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowReport {
    pub minutes: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burn_rate: Option<f64>,
}

impl WindowReport {
    fn uncounted(minutes: u32) -> Self {
        Self { minutes, calls: None, bad_calls: None, burn_rate: None }
    }
}

/// What the webhook receives (JSON) for an alert that starts or stops firing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Notification {
    pub version: u32,
    pub id: String,
    pub status: Status,
    pub reason: Reason,
    pub slo: String,
    /// Absent (with `objective_percent`) when the objective was removed from the
    /// configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective_percent: Option<f64>,
    /// Set when the objective is per consumer (or for one consumer).
    pub consumer_id: Option<String>,
    pub route_id: Option<String>,
    pub latency_threshold_ms: Option<f64>,
    pub severity: String,
    pub burn_rate_threshold: f64,
    pub long_window: WindowReport,
    pub short_window: WindowReport,
    /// End (exclusive) of both windows, UTC.
    pub window_end: String,
    pub summary: String,
    #[serde(skip)]
    pub window_end_s: i64,
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct BurnRow {
    minute: u32,
    slo_id: String,
    consumer_id: String,
    window_minutes: u32,
    total: u64,
    bad: u64,
    burn_rate: f64,
    evaluated_at_us: u64,
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct AlertRow {
    at: u32,
    at_us: u64,
    alert_id: String,
    slo_id: String,
    consumer_id: String,
    severity: String,
    status: i8,
    window_end: u32,
    long_window_minutes: u32,
    short_window_minutes: u32,
    burn_rate_threshold: f64,
    long_burn_rate: f64,
    short_burn_rate: f64,
    delivered: u8,
}

/// An alert's latest notification in `slo_alerts`.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct StateRow {
    alert_id: String,
    firing: u8,
    slo_id: String,
    consumer_id: String,
    severity: String,
    long_window_minutes: u32,
    short_window_minutes: u32,
    burn_rate_threshold: f64,
}

impl StateRow {
    /// Whether the configuration still evaluates this alert: its objective is there, with a
    /// rule of its severity and windows, and the same id (an objective that stopped or started
    /// being per consumer names its alerts differently).
    fn configured(&self, objectives: &[Objective]) -> bool {
        objectives.iter().filter(|o| o.id == self.slo_id).any(|o| {
            o.rules.iter().any(|r| {
                (r.severity.as_str(), r.long_minutes, r.short_minutes)
                    == (self.severity.as_str(), self.long_window_minutes, self.short_window_minutes)
                    && alert_id(o, r, &self.consumer_id) == self.alert_id
            })
        })
    }

    /// The notification that resolves this alert because the configuration no longer has it.
    fn removed(&self, objectives: &[Objective], end_s: i64) -> Notification {
        let o = objectives.iter().find(|o| o.id == self.slo_id);
        let who =
            if self.consumer_id.is_empty() { String::new() } else { format!(" for consumer {}", self.consumer_id) };
        let what = if o.is_some() { "rule" } else { "objective" };
        Notification {
            version: 1,
            id: self.alert_id.clone(),
            status: Status::Resolved,
            reason: Reason::Removed,
            slo: self.slo_id.clone(),
            kind: o.map(|o| kind_name(o.kind)),
            objective_percent: o.map(|o| o.objective * 100.0),
            consumer_id: (!self.consumer_id.is_empty()).then(|| self.consumer_id.clone()),
            route_id: o.and_then(|o| o.route.clone()),
            latency_threshold_ms: o.and_then(latency_threshold_ms),
            severity: self.severity.clone(),
            burn_rate_threshold: self.burn_rate_threshold,
            long_window: WindowReport::uncounted(self.long_window_minutes),
            short_window: WindowReport::uncounted(self.short_window_minutes),
            window_end: time::format_utc(end_s),
            summary: format!(
                "SLO {}{who}: alert {} resolved because its {what} is no longer configured",
                self.slo_id, self.alert_id
            ),
            window_end_s: end_s,
        }
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Availability => "availability",
        Kind::Latency { .. } => "latency",
    }
}

fn latency_threshold_ms(o: &Objective) -> Option<f64> {
    match o.kind {
        Kind::Latency { threshold_us } => Some(threshold_us as f64 / 1000.0),
        Kind::Availability => None,
    }
}

/// SQL expressions of what an objective counts in a `usage_minute` row: (calls, bad calls,
/// the consumer column: the consumer id when per consumer, else '').
pub(crate) fn counted_exprs(o: &Objective) -> (String, String, &'static str) {
    let (total, bad) = match o.kind {
        Kind::Availability => (
            "if(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout', 'edge_shutdown'), requests, 0)"
                .to_owned(),
            "if(outcome IN ('upstream_error', 'upstream_timeout', 'edge_shutdown') \
             OR (outcome = 'forwarded' AND status_class = 5), requests, 0)"
                .to_owned(),
        ),
        // A bucket whose upper bound is above the threshold counts as slow: calls within the
        // bucket width (< 0.8 %) below the threshold may count as slow, never the reverse.
        Kind::Latency { threshold_us } => (
            "if(outcome = 'forwarded', requests, 0)".to_owned(),
            format!(
                "if(outcome = 'forwarded', arraySum(arrayFilter((n, le) -> le > {threshold_us}, latency_count, latency_le_us)), 0)"
            ),
        ),
    };
    (total, bad, if o.per_consumer { "consumer_id" } else { "''" })
}

/// The objective's route and consumer conditions (` AND …`), with a `?` each for
/// [`bind_filters`].
pub(crate) fn filters(o: &Objective) -> String {
    let mut f = String::new();
    if o.route.is_some() {
        f.push_str(" AND route_id = ?");
    }
    if o.consumer.is_some() {
        f.push_str(" AND consumer_id = ?");
    }
    f
}

/// Binds the values of [`filters`].
pub(crate) fn bind_filters(mut q: clickhouse::query::Query, o: &Objective) -> clickhouse::query::Query {
    for v in [&o.route, &o.consumer].into_iter().flatten() {
        q = q.bind(v.as_str());
    }
    q
}

/// SQL: per consumer (or one row, consumer '', for all), the calls the objective counts and
/// the bad ones in each window ending at `end` (an SQL DateTime expression; `windows` in
/// minutes, ascending), in one read of the longest window. The evaluator gets the same
/// numbers incrementally ([`windows::Cache`]); this is the reference it is tested against,
/// and `schemas/queries/slo_window_counts.sql` holds two of them (checked on current
/// ClickHouse).
pub fn window_sql(o: &Objective, windows: &[u32], end: &str) -> String {
    let (total, bad, consumer) = counted_exprs(o);
    let longest = windows.last().copied().unwrap_or(1);
    let sums = |col: &str| {
        windows.iter().map(|w| format!("sumIf({col}, minute >= {end} - {})", w * 60)).collect::<Vec<_>>().join(", ")
    };
    let filter = filters(o);
    format!(
        "SELECT c AS consumer_id, [{}] AS totals, [{}] AS bads\n\
         FROM (SELECT {consumer} AS c, minute, {total} AS t, {bad} AS b FROM {USAGE_TABLE} FINAL\n\
         WHERE minute >= {end} - {} AND minute < {end}{filter})\n\
         GROUP BY c",
        sums("t"),
        sums("b"),
        longest * 60,
    )
}

/// Decides the alerts of one objective from its window counts per consumer; updates `firing`
/// and returns the notifications of the alerts that changed. Alerts that keep firing are
/// pushed to `still`, if given (with their current counts), for receivers that need them
/// repeated.
pub fn decide(
    o: &Objective,
    rules: &[Rule],
    windows: &[u32],
    counts: &HashMap<String, Vec<Counts>>,
    firing: &mut HashMap<String, bool>,
    end_s: i64,
    mut still: Option<&mut Vec<Notification>>,
) -> Vec<Notification> {
    let idx = |m: u32| windows.iter().position(|&w| w == m);
    let mut out = Vec::new();
    let zero = vec![Counts::default(); windows.len()];
    // Consumers without calls in any window are evaluated too when one of their alerts fires
    // (so that it resolves).
    let mut consumers: Vec<&str> = counts.keys().map(String::as_str).collect();
    if o.per_consumer {
        let prefix = format!("{}/", o.id);
        for (id, &on) in firing.iter() {
            if let (true, Some(rest)) = (on, id.strip_prefix(&prefix)) {
                // objective/severity/windows/consumer
                if let Some(c) = rest.splitn(3, '/').nth(2)
                    && !counts.contains_key(c)
                {
                    consumers.push(c);
                }
            }
        }
    } else if consumers.is_empty() {
        consumers.push("");
    }
    consumers.sort_unstable();
    consumers.dedup();
    let consumers: Vec<String> = consumers.into_iter().map(str::to_owned).collect();
    for c in &consumers {
        let per = counts.get(c).unwrap_or(&zero);
        for rule in rules {
            let (Some(l), Some(s)) = (idx(rule.long_minutes), idx(rule.short_minutes)) else { continue };
            let (long, short) = (per[l], per[s]);
            let now = fires(o, rule, long, short);
            let id = alert_id(o, rule, c);
            let was = firing.get(&id).copied().unwrap_or(false);
            if now == was {
                if let (true, Some(still)) = (now, still.as_deref_mut()) {
                    still.push(notification(o, rule, c, id, true, long, short, end_s));
                }
                continue;
            }
            firing.insert(id.clone(), now);
            out.push(notification(o, rule, c, id, now, long, short, end_s));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn notification(
    o: &Objective,
    rule: &Rule,
    consumer: &str,
    id: String,
    firing: bool,
    long: Counts,
    short: Counts,
    end_s: i64,
) -> Notification {
    let report = |minutes, c: Counts| WindowReport {
        minutes,
        calls: Some(c.total),
        bad_calls: Some(c.bad),
        burn_rate: Some(c.burn_rate(o.budget())),
    };
    let (long_rate, short_rate) = (long.burn_rate(o.budget()), short.burn_rate(o.budget()));
    let (long_w, short_w) = (report(rule.long_minutes, long), report(rule.short_minutes, short));
    let percent = o.objective * 100.0;
    let who = match (o.per_consumer, &o.consumer) {
        (true, _) => format!(" for consumer {consumer}"),
        (false, Some(c)) => format!(" for consumer {c}"),
        _ => String::new(),
    };
    let summary = if firing {
        format!(
            "SLO {}{who} ({percent} %) burns its error budget {:.1}x over {} min and {:.1}x over {} min (alert at {}x)",
            o.id, long_rate, rule.long_minutes, short_rate, rule.short_minutes, rule.burn_rate
        )
    } else {
        format!(
            "SLO {}{who} ({percent} %) no longer burns its error budget {}x over both {} and {} min ({:.1}x and {:.1}x)",
            o.id, rule.burn_rate, rule.long_minutes, rule.short_minutes, long_rate, short_rate
        )
    };
    Notification {
        version: 1,
        id,
        status: if firing { Status::Firing } else { Status::Resolved },
        reason: Reason::BurnRate,
        slo: o.id.clone(),
        kind: Some(kind_name(o.kind)),
        objective_percent: Some(percent),
        consumer_id: if o.per_consumer { Some(consumer.to_owned()) } else { o.consumer.clone() },
        route_id: o.route.clone(),
        latency_threshold_ms: latency_threshold_ms(o),
        severity: rule.severity.clone(),
        burn_rate_threshold: rule.burn_rate,
        long_window: long_w,
        short_window: short_w,
        window_end: time::format_utc(end_s),
        summary,
        window_end_s: end_s,
    }
}

/// Evaluates the objectives; owns the alerts' states.
pub struct Evaluator {
    cfg: Arc<SloConfig>,
    client: Client,
    /// The objectives over all calls (their windows include the budget period), then those
    /// per consumer: each group with its windows and its hour cache.
    groups: [Group; 2],
    firing: HashMap<String, bool>,
    /// The alerts' latest notifications as loaded, for those the configuration dropped.
    loaded: Vec<StateRow>,
}

struct Group {
    objectives: Vec<Objective>,
    windows: Vec<u32>,
    cache: windows::Cache,
    /// Per consumer: the budget period (minutes) and its reader, apart from the rules' windows
    /// (whose hour cache would otherwise hold a period's hours of every consumer).
    period: Option<(u32, windows::PeriodCache)>,
}

impl Group {
    fn new(cfg: &SloConfig, per_consumer: bool) -> Self {
        Self {
            objectives: cfg.objectives.iter().filter(|o| o.per_consumer == per_consumer).cloned().collect(),
            windows: cfg.windows_for(per_consumer),
            cache: windows::Cache::default(),
            period: (per_consumer && cfg.budget_period_minutes > 0)
                .then(|| (cfg.budget_period_minutes, windows::PeriodCache::default())),
        }
    }
}

/// What one evaluation decided.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// The alerts that started or stopped firing.
    pub changes: Vec<Notification>,
    /// The alerts that keep firing, when the webhook needs them repeated
    /// ([`SloConfig::repeats_firing`]; empty otherwise).
    pub still_firing: Vec<Notification>,
    /// Per objective over all calls (not per consumer): the share of its error budget left
    /// over the budget period (`slo.budget_period_days`), 1 − the period window's burn rate;
    /// negative once overspent.
    pub budget_remaining: Vec<(String, f64)>,
}

impl Evaluator {
    pub fn new(cfg: Arc<SloConfig>, client: Client) -> Self {
        let groups = [Group::new(&cfg, false), Group::new(&cfg, true)];
        Self { cfg, client, groups, firing: HashMap::new(), loaded: Vec::new() }
    }

    /// Whole hours read with `FINAL` so far (the rest came from the cache).
    pub fn hours_read(&self) -> u64 {
        self.groups.iter().map(|g| g.cache.hours_read).sum()
    }

    /// Takes the alerts' states from `slo_alerts` (the latest notification of each). A firing
    /// alert the configuration no longer evaluates is resolved by the next evaluation.
    pub async fn load_state(&mut self) -> Result<usize, clickhouse::error::Error> {
        let rows = self
            .client
            .query(
                "SELECT alert_id, argMax(status = 'firing', at_us) AS firing, argMax(slo_id, at_us) AS slo_id, \
                 argMax(consumer_id, at_us) AS consumer_id, argMax(severity, at_us) AS severity, \
                 argMax(long_window_minutes, at_us) AS long_window_minutes, \
                 argMax(short_window_minutes, at_us) AS short_window_minutes, \
                 argMax(burn_rate_threshold, at_us) AS burn_rate_threshold \
                 FROM slo_alerts GROUP BY alert_id",
            )
            .fetch_all::<StateRow>()
            .await?;
        self.firing = rows.iter().map(|r| (r.alert_id.clone(), r.firing == 1)).collect();
        self.loaded = rows.into_iter().filter(|r| r.firing == 1 && !r.configured(&self.cfg.objectives)).collect();
        Ok(self.firing.values().filter(|&&f| f).count())
    }

    /// Resolves the firing alerts the configuration no longer evaluates.
    fn removed(&self, firing: &mut HashMap<String, bool>, end_s: i64) -> Vec<Notification> {
        let mut out = Vec::new();
        for r in &self.loaded {
            if firing.get(&r.alert_id) == Some(&true) {
                firing.insert(r.alert_id.clone(), false);
                out.push(r.removed(&self.cfg.objectives, end_s));
            }
        }
        out
    }

    /// Evaluates every objective over the windows ending at `end_s`; writes the burn rates and
    /// returns the notifications. The states change only when all of it worked.
    pub async fn evaluate(&mut self, end_s: i64, now_us: u64) -> Result<Evaluation, clickhouse::error::Error> {
        let mut firing = self.firing.clone();
        let mut notes = self.removed(&mut firing, end_s);
        let mut still = Vec::new();
        let repeats = self.cfg.repeats_firing();
        let mut burn = Vec::new();
        let mut budget_remaining = Vec::new();
        for group in &mut self.groups {
            if group.objectives.is_empty() {
                continue;
            }
            let windows = &group.windows;
            let period = windows.iter().position(|&w| w == self.cfg.budget_period_minutes);
            let all = group.cache.counts(&self.client, &group.objectives, windows, end_s).await?;
            for (o, mut counts) in group.objectives.iter().zip(all) {
                if !o.per_consumer && counts.is_empty() {
                    counts.insert(String::new(), vec![Counts::default(); windows.len()]);
                }
                for (consumer, per) in &counts {
                    for (w, c) in windows.iter().zip(per) {
                        burn.push(BurnRow {
                            minute: u32::try_from(end_s).unwrap_or(0),
                            slo_id: o.id.clone(),
                            consumer_id: consumer.clone(),
                            window_minutes: *w,
                            total: c.total,
                            bad: c.bad,
                            burn_rate: c.burn_rate(o.budget()),
                            evaluated_at_us: now_us,
                        });
                    }
                }
                if let (false, Some(p)) = (o.per_consumer, period) {
                    let spent = counts.get("").and_then(|per| per.get(p)).map_or(0.0, |c| c.burn_rate(o.budget()));
                    budget_remaining.push((o.id.clone(), 1.0 - spent));
                }
                let still = repeats.then_some(&mut still);
                notes.extend(decide(o, &o.rules, windows, &counts, &mut firing, end_s, still));
            }
            if let Some((minutes, cache)) = &mut group.period {
                let all = cache.counts(&self.client, &group.objectives, *minutes, end_s).await?;
                for (o, counts) in group.objectives.iter().zip(all) {
                    for (consumer, c) in counts {
                        burn.push(BurnRow {
                            minute: u32::try_from(end_s).unwrap_or(0),
                            slo_id: o.id.clone(),
                            consumer_id: consumer,
                            window_minutes: *minutes,
                            total: c.total,
                            bad: c.bad,
                            burn_rate: c.burn_rate(o.budget()),
                            evaluated_at_us: now_us,
                        });
                    }
                }
            }
        }
        let mut insert = self.client.insert::<BurnRow>("slo_burn_rate").await?;
        for row in &burn {
            insert.write(row).await?;
        }
        insert.end().await?;
        self.firing = firing;
        self.loaded.clear();
        Ok(Evaluation { changes: notes, still_firing: still, budget_remaining })
    }
}

/// The evaluation task: evaluates at each end of closed minutes `ends` announces (`None`:
/// this instance does not evaluate), hands notifications to the delivery task. Runs until
/// `stop`.
pub async fn run(
    cfg: Arc<SloConfig>,
    client: Client,
    metrics: Arc<Metrics>,
    mut ends: watch::Receiver<Option<i64>>,
    mut stop: watch::Receiver<bool>,
    retry: (Duration, Duration),
) {
    // One delivery task per receiver, each with its own queue (a receiver that is down holds
    // up only its own notifications), and one task that records each notification once its
    // receivers are done with it.
    let (record_tx, record_rx) = mpsc::channel::<Arc<Pending>>(QUEUE);
    let recorder = tokio::spawn(record(client.clone(), Arc::clone(&metrics), record_rx, stop.clone(), retry));
    let mut routes = Vec::new();
    let mut deliveries = Vec::new();
    for hook in &cfg.receivers {
        let (tx, rx) = mpsc::channel::<Message>(QUEUE);
        let route = Route {
            hook: Arc::new(hook.clone()),
            tx,
            firing: Arc::new(StillFiring::default()),
            stats: metrics.receiver(&hook.name),
        };
        deliveries.push(tokio::spawn(deliver(
            Arc::clone(&route.hook),
            (rx, Arc::clone(&route.firing)),
            record_tx.clone(),
            Arc::clone(&route.stats),
            stop.clone(),
            retry,
        )));
        routes.push(route);
    }
    let mut evaluator = Evaluator::new(Arc::clone(&cfg), client);
    let mut leading = false;
    let mut last_end = i64::MIN;
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            changed = ends.changed() => if changed.is_err() { break },
        }
        let Some(end) = *ends.borrow_and_update() else {
            leading = false;
            continue;
        };
        if !leading {
            match evaluator.load_state().await {
                Ok(n) => {
                    tracing::info!(firing = n, "evaluating SLOs (this instance reads partition 0)");
                    leading = true;
                }
                Err(e) => {
                    metrics.clickhouse_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot read the SLO alerts' states; retried at the next minute");
                    continue;
                }
            }
        }
        if !due(end, last_end, (now_us() / 1_000_000) as i64, cfg.stale_after_s) {
            continue;
        }
        match evaluator.evaluate(end, now_us()).await {
            Ok(Evaluation { changes, still_firing, budget_remaining }) => {
                last_end = end;
                metrics.slo_evaluations.fetch_add(1, Ordering::Relaxed);
                *metrics.slo_budget_remaining.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    budget_remaining;
                for n in changes {
                    tracing::info!(alert = %n.id, status = ?n.status, summary = %n.summary, "SLO alert");
                    if !dispatch(n, &routes, &record_tx, &mut stop).await {
                        break;
                    }
                }
                for r in routes.iter().filter(|r| r.hook.format == Format::Alertmanager) {
                    let mine = still_firing.iter().filter(|n| r.hook.takes(&n.severity)).cloned().collect();
                    if r.firing.set(mine) {
                        r.stats.queued.fetch_add(1, Ordering::Relaxed);
                        tokio::select! {
                            _ = stop.wait_for(|s| *s) => break,
                            sent = r.tx.send(Message::Repeat) => if sent.is_err() { break },
                        }
                    }
                }
            }
            Err(e) => {
                metrics.clickhouse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, end = %time::format_utc(end), "cannot evaluate the SLOs; retried at the next minute");
            }
        }
    }
    drop(routes);
    drop(record_tx);
    for d in deliveries {
        let _ = d.await;
    }
    let _ = recorder.await;
}

/// A receiver's delivery task, as the evaluation task sees it.
struct Route {
    hook: Arc<Webhook>,
    tx: mpsc::Sender<Message>,
    /// Its alerts that keep firing (Alertmanager receivers).
    firing: Arc<StillFiring>,
    stats: Arc<ReceiverStats>,
}

/// Hands notification `n` to the receivers that take its severity, or straight to the
/// recorder when none does. False when the tasks are stopping.
async fn dispatch(
    n: Notification,
    routes: &[Route],
    record_tx: &mpsc::Sender<Arc<Pending>>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let targets: Vec<&Route> = routes.iter().filter(|r| r.hook.takes(&n.severity)).collect();
    let pending = Arc::new(Pending {
        left: std::sync::atomic::AtomicUsize::new(targets.len()),
        delivered: std::sync::atomic::AtomicBool::new(!targets.is_empty()),
        n,
    });
    if targets.is_empty() {
        return tokio::select! {
            _ = stop.wait_for(|s| *s) => false,
            sent = record_tx.send(pending) => sent.is_ok(),
        };
    }
    for r in targets {
        r.stats.queued.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return false,
            sent = r.tx.send(Message::Change(Arc::clone(&pending))) => if sent.is_err() { return false },
        }
    }
    true
}

/// Whether windows ending at `end_s` are evaluated: later than the last evaluation, and not
/// stale (a catch-up or a replay evaluates only once it is within `stale_after_s` of now).
fn due(end_s: i64, last_end_s: i64, now_s: i64, stale_after_s: i64) -> bool {
    end_s > last_end_s && end_s >= now_s - stale_after_s
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn http_client(tls: &tollgate_common::tls::ClientConfig) -> HttpClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// A notification on its way to its receivers. Each receiver's task takes its notifications in
/// order, and the one that finishes with a notification last hands it to the recorder before
/// it goes on: so two notifications of one alert (which go to the same receivers, by its
/// severity) are recorded in the order they were decided.
#[derive(Debug)]
struct Pending {
    n: Notification,
    /// Receivers not done with it yet (delivered, rejected).
    left: std::sync::atomic::AtomicUsize,
    /// Every receiver done so far took it (2xx); false when it had no receiver.
    delivered: std::sync::atomic::AtomicBool,
}

/// What a delivery task sends.
#[derive(Debug)]
enum Message {
    /// An alert that started or stopped firing: delivered, then recorded once every receiver
    /// of its severity is done with it.
    Change(Arc<Pending>),
    /// Send the alerts that keep firing ([`StillFiring`]) to Alertmanager again (not recorded).
    Repeat,
}

/// The alerts that kept firing at the latest evaluation, for the delivery task to send again.
/// At most one [`Message::Repeat`] waits in the queue: while a webhook is down the queue does
/// not fill with repeats (which would stop the evaluations), and the repeat sends the latest
/// alerts when it is delivered.
#[derive(Default)]
struct StillFiring {
    alerts: std::sync::Mutex<Vec<Notification>>,
    queued: std::sync::atomic::AtomicBool,
}

impl StillFiring {
    /// Keeps the latest alerts; true when a repeat must be queued (there are alerts and none
    /// is queued yet).
    fn set(&self, alerts: Vec<Notification>) -> bool {
        let any = !alerts.is_empty();
        *self.alerts.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = alerts;
        any && !self.queued.swap(true, Ordering::AcqRel)
    }

    /// The alerts to send now (the queued repeat is taken).
    fn take(&self) -> Vec<Notification> {
        self.queued.store(false, Ordering::Release);
        self.alerts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The body the webhook receives for `n` in its format.
pub fn render(n: &Notification, format: &Format) -> serde_json::Result<Vec<u8>> {
    match format {
        Format::Alertmanager => render_alertmanager(std::slice::from_ref(n)),
        Format::Json => serde_json::to_vec(n),
        Format::Slack => serde_json::to_vec(&serde_json::json!({ "text": slack_text(n) })),
        Format::PagerDuty { routing_key } => {
            let mut event = serde_json::json!({
                "routing_key": routing_key,
                "dedup_key": n.id,
                "client": "tollgate",
            });
            match n.status {
                Status::Firing => {
                    event["event_action"] = "trigger".into();
                    event["payload"] = serde_json::json!({
                        // PagerDuty's limit.
                        "summary": n.summary.chars().take(1024).collect::<String>(),
                        "source": "tollgate-aggregator",
                        "severity": pagerduty_severity(&n.severity),
                        "timestamp": n.window_end,
                        "group": n.slo,
                        "class": n.kind,
                        "component": n.route_id,
                        "custom_details": n,
                    });
                }
                Status::Resolved => event["event_action"] = "resolve".into(),
            }
            serde_json::to_vec(&event)
        }
    }
}

/// Alertmanager's `POST /api/v2/alerts` body for `alerts`, now.
fn render_alertmanager(alerts: &[Notification]) -> serde_json::Result<Vec<u8>> {
    let now_s = now_us() as i64 / 1_000_000;
    serde_json::to_vec(&alerts.iter().map(|n| alertmanager_alert(n, now_s)).collect::<Vec<_>>())
}

/// One alert of Alertmanager's `POST /api/v2/alerts` for `n` at `now_s`. The labels identify
/// the alert and are the same for its firing and its resolved notification (so Alertmanager
/// matches them); what changes goes into the annotations. Firing: `startsAt` = the end of the
/// windows that fired it (Alertmanager keeps the earliest), `endsAt` = now + the lifetime.
/// Resolved: `endsAt` = the end of the windows that resolved it.
pub fn alertmanager_alert(n: &Notification, now_s: i64) -> serde_json::Value {
    let mut labels = serde_json::json!({
        "alertname": "TollgateSLOBurnRate",
        "alert_id": n.id,
        "slo": n.slo,
        "severity": n.severity,
        "windows": format!("{}m-{}m", n.long_window.minutes, n.short_window.minutes),
    });
    if let Some(c) = &n.consumer_id {
        labels["consumer_id"] = c.as_str().into();
    }
    let mut annotations = serde_json::json!({ "summary": n.summary, "window_end": n.window_end });
    if let Some(r) = &n.route_id {
        annotations["route_id"] = r.as_str().into();
    }
    for (name, w) in [("long_window_burn_rate", &n.long_window), ("short_window_burn_rate", &n.short_window)] {
        if let Some(rate) = w.burn_rate {
            annotations[name] = format!("{rate:.2}").into();
        }
    }
    let mut alert = serde_json::json!({ "labels": labels, "annotations": annotations });
    match n.status {
        Status::Firing => {
            alert["startsAt"] = n.window_end.as_str().into();
            alert["endsAt"] = time::format_utc(now_s + ALERTMANAGER_LIFETIME_S).into();
        }
        Status::Resolved => alert["endsAt"] = n.window_end.as_str().into(),
    }
    alert
}

/// A rule's severity as PagerDuty's: `page` → critical, `ticket` → warning, PagerDuty's own
/// names as they are, anything else → error.
fn pagerduty_severity(severity: &str) -> &str {
    match severity {
        "page" => "critical",
        "ticket" => "warning",
        s @ ("critical" | "error" | "warning" | "info") => s,
        _ => "error",
    }
}

/// One line of Slack mrkdwn: status, severity, id, then the summary (`&`, `<`, `>` escaped
/// as Slack requires).
fn slack_text(n: &Notification) -> String {
    let status = match n.status {
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    };
    let text = format!("*[{status}] {}* `{}`: {}", n.severity, n.id, n.summary);
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Why a delivery attempt failed, and whether trying again can help.
trait Failure: std::fmt::Display {
    /// True when the receiver refused the request itself: the same request would be refused
    /// again, so it is not retried.
    fn permanent(&self) -> bool {
        false
    }
}

impl Failure for clickhouse::error::Error {}

/// A failed webhook POST.
#[derive(Debug)]
struct PostError {
    message: String,
    /// A 4xx other than 408, 425 and 429: the receiver refused this notification (a wrong
    /// routing key, a malformed payload for its format, a revoked token).
    rejected: bool,
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure for PostError {
    fn permanent(&self) -> bool {
        self.rejected
    }
}

/// Whether a webhook's answer `status` refuses the request for good. 408 (timeout), 425 (too
/// early) and 429 (rate limited) ask for a retry, as do 5xx.
fn rejects(status: http::StatusCode) -> bool {
    status.is_client_error()
        && ![http::StatusCode::REQUEST_TIMEOUT, http::StatusCode::TOO_EARLY, http::StatusCode::TOO_MANY_REQUESTS]
            .contains(&status)
}

/// The start of an error answer's body, for the log (receivers explain rejections there).
const ANSWER_EXCERPT: usize = 300;

/// POSTs one notification; Err names what failed, with the start of the receiver's answer.
async fn post(client: &HttpClient, hook: &Webhook, body: Bytes) -> Result<(), PostError> {
    let failed = |message: String| PostError { message, rejected: false };
    let mut req = http::Request::post(hook.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("tollgate-aggregator/", env!("CARGO_PKG_VERSION")));
    for (k, v) in &hook.headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(body)).map_err(|e| failed(e.to_string()))?;
    let answer = async {
        let resp = client.request(req).await.map_err(|e| failed(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = http_body_util::Limited::new(resp.into_body(), 16 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let text = text.trim();
        let cut = text.char_indices().nth(ANSWER_EXCERPT).map_or(text.len(), |(i, _)| i);
        let mut message = format!("answered {status}");
        if !text.is_empty() {
            message = format!("{message}: {}", &text[..cut]);
        }
        Err(PostError { message, rejected: rejects(status) })
    };
    match tokio::time::timeout(hook.timeout, answer).await {
        Err(_) => Err(failed(format!("no answer within {} ms", hook.timeout.as_millis()))),
        Ok(done) => done,
    }
}

/// Runs `attempt` until it succeeds (`Ok(true)`), fails for good (`Err`, see
/// [`Failure::permanent`]) or `stop` changes (`Ok(false)`), counting each failure in
/// `failures`, logging the retried ones as `what`, and waiting with `backoff` between attempts.
async fn retry<F, Fut, E>(
    mut attempt: F,
    mut backoff: Backoff,
    stop: &mut watch::Receiver<bool>,
    failures: &std::sync::atomic::AtomicU64,
    what: &str,
    (to, alert): (&str, &str),
) -> Result<bool, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Failure,
{
    loop {
        let Err(e) = attempt().await else { return Ok(true) };
        failures.fetch_add(1, Ordering::Relaxed);
        if e.permanent() {
            return Err(e);
        }
        let delay = backoff.next_delay();
        tracing::warn!(error = %e, to, alert, retry_in_ms = delay.as_millis() as u64, "{what}");
        tokio::select! {
            _ = stop.changed() => return Ok(false),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// A receiver's delivery task: each notification in order (retried with backoff until it
/// answers 2xx, or given up at once when it rejects it, see [`rejects`]); then, when no other
/// receiver still has it, to the recorder. What is not delivered at shutdown is not recorded,
/// so the next evaluator finds the alert in its old state and notifies again.
async fn deliver(
    hook: Arc<Webhook>,
    (mut rx, firing): (mpsc::Receiver<Message>, Arc<StillFiring>),
    record_tx: mpsc::Sender<Arc<Pending>>,
    stats: Arc<ReceiverStats>,
    mut stop: watch::Receiver<bool>,
    (initial, max): (Duration, Duration),
) {
    let http = http_client(&hook.tls);
    while let Some(m) = rx.recv().await {
        let (body, alert) = match &m {
            Message::Change(p) => (render(&p.n, &hook.format), p.n.id.as_str()),
            Message::Repeat => {
                let alerts = firing.take();
                if alerts.is_empty() {
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                (render_alertmanager(&alerts), "(firing alerts sent again)")
            }
        };
        let taken = match body {
            Ok(body) => {
                let body = Bytes::from(body);
                let sent = retry(
                    || post(&http, &hook, body.clone()),
                    Backoff::new(initial, max),
                    &mut stop,
                    &stats.failures,
                    "SLO webhook failed",
                    (&hook.name, alert),
                );
                match sent.await {
                    Ok(true) => {
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Ok(false) => return,
                    Err(e) => {
                        stats.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            error = %e,
                            receiver = %hook.name,
                            alert,
                            "the SLO webhook rejected the notification; not retried (check the receiver's \
                             configuration: URL, headers, routing key)"
                        );
                        false
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, receiver = %hook.name, alert, "cannot encode the notification");
                false
            }
        };
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        // Repeats are not changes: nothing to record.
        let Message::Change(p) = m else { continue };
        if !taken {
            p.delivered.store(false, Ordering::Release);
        }
        if p.left.fetch_sub(1, Ordering::AcqRel) == 1 && record_tx.send(p).await.is_err() {
            return;
        }
    }
}

/// The recording task: each notification its receivers are done with into `slo_alerts`
/// (`delivered` = 0 when a receiver rejected it or none takes its severity), retried until
/// written or stopped.
async fn record(
    ch: Client,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Arc<Pending>>,
    mut stop: watch::Receiver<bool>,
    (initial, max): (Duration, Duration),
) {
    while let Some(p) = rx.recv().await {
        let n = &p.n;
        match n.status {
            Status::Firing => metrics.alerts_fired.fetch_add(1, Ordering::Relaxed),
            Status::Resolved => metrics.alerts_resolved.fetch_add(1, Ordering::Relaxed),
        };
        let at_us = now_us();
        let row = AlertRow {
            at: (at_us / 1_000_000) as u32,
            at_us,
            alert_id: n.id.clone(),
            slo_id: n.slo.clone(),
            consumer_id: n.consumer_id.clone().unwrap_or_default(),
            severity: n.severity.clone(),
            status: match n.status {
                Status::Firing => 1,
                Status::Resolved => 2,
            },
            window_end: u32::try_from(n.window_end_s).unwrap_or(0),
            long_window_minutes: n.long_window.minutes,
            short_window_minutes: n.short_window.minutes,
            burn_rate_threshold: n.burn_rate_threshold,
            long_burn_rate: n.long_window.burn_rate.unwrap_or(0.0),
            short_burn_rate: n.short_window.burn_rate.unwrap_or(0.0),
            delivered: u8::from(p.delivered.load(Ordering::Acquire)),
        };
        let written = retry(
            || async {
                let mut insert = ch.insert::<AlertRow>("slo_alerts").await?;
                insert.write(&row).await?;
                insert.end().await
            },
            Backoff::new(initial, max),
            &mut stop,
            &metrics.clickhouse_errors,
            "cannot record the SLO alert",
            ("slo_alerts", &n.id),
        );
        if !matches!(written.await, Ok(true)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn objective(per_consumer: bool) -> Objective {
        Objective {
            id: "avail".into(),
            kind: Kind::Availability,
            objective: 0.99,
            route: None,
            consumer: None,
            per_consumer,
            min_requests: 10,
            rules: vec![rule()],
        }
    }

    fn rule() -> Rule {
        Rule { severity: "page".into(), long_minutes: 10, short_minutes: 2, burn_rate: 5.0 }
    }

    fn c(total: u64, bad: u64) -> Counts {
        Counts { total, bad }
    }

    #[test]
    fn burn_rate_is_the_bad_share_over_the_budget() {
        assert_eq!(c(0, 0).burn_rate(0.01), 0.0);
        assert!((c(1000, 10).burn_rate(0.01) - 1.0).abs() < 1e-12);
        assert!((c(200, 50).burn_rate(0.001) - 250.0).abs() < 1e-9);
    }

    #[test]
    fn a_rule_fires_only_when_both_windows_burn_and_the_long_one_has_enough_calls() {
        let (o, r) = (objective(false), rule());
        // 5 % bad = 5x a 1 % budget: exactly the threshold fires.
        assert!(fires(&o, &r, c(100, 5), c(20, 1)));
        assert!(!fires(&o, &r, c(100, 5), c(20, 0)), "short window recovered");
        assert!(!fires(&o, &r, c(100, 4), c(20, 20)), "long window below the rate");
        assert!(!fires(&o, &r, c(9, 9), c(9, 9)), "below min_requests");
        let mut zero_min = objective(false);
        zero_min.min_requests = 0;
        assert!(!fires(&zero_min, &r, c(0, 0), c(0, 0)), "no calls never fire");
    }

    #[test]
    fn decide_notifies_changes_only_and_resolves_consumers_that_went_quiet() {
        let (o, rules, windows) = (objective(true), vec![rule()], vec![2, 10]);
        let mut firing = HashMap::new();
        let counts: HashMap<String, Vec<Counts>> =
            [("acme".to_owned(), vec![c(20, 10), c(100, 30)]), ("beta".to_owned(), vec![c(20, 0), c(100, 0)])].into();
        let mut still = Vec::new();
        let n = decide(&o, &rules, &windows, &counts, &mut firing, 1_800_000_000, Some(&mut still));
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].id, "avail/page/10m-2m/acme");
        assert_eq!(n[0].status, Status::Firing);
        assert_eq!(n[0].consumer_id.as_deref(), Some("acme"));
        assert_eq!((n[0].long_window.calls, n[0].long_window.bad_calls), (Some(100), Some(30)));
        assert!((n[0].short_window.burn_rate.unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(n[0].reason, Reason::BurnRate);
        assert_eq!(n[0].window_end, "2027-01-15T08:00:00Z");
        assert!(still.is_empty());
        // Same counts: nothing new; it keeps firing (with its current counts).
        assert!(decide(&o, &rules, &windows, &counts, &mut firing, 1_800_000_060, Some(&mut still)).is_empty());
        assert_eq!(still.len(), 1);
        assert_eq!((still[0].id.as_str(), still[0].status), ("avail/page/10m-2m/acme", Status::Firing));
        assert_eq!(still[0].window_end, "2027-01-15T08:01:00Z");
        still.clear();
        // acme has no calls at all any more: its alert resolves.
        let quiet: HashMap<String, Vec<Counts>> = [("beta".to_owned(), vec![c(20, 0), c(100, 0)])].into();
        let n = decide(&o, &rules, &windows, &quiet, &mut firing, 1_800_000_120, Some(&mut still));
        assert!(still.is_empty());
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].id.as_str(), n[0].status), ("avail/page/10m-2m/acme", Status::Resolved));
        assert_eq!(firing.get("avail/page/10m-2m/acme"), Some(&false));
    }

    fn state(alert_id: &str, slo_id: &str, consumer: &str, severity: &str, windows: (u32, u32)) -> StateRow {
        StateRow {
            alert_id: alert_id.into(),
            firing: 1,
            slo_id: slo_id.into(),
            consumer_id: consumer.into(),
            severity: severity.into(),
            long_window_minutes: windows.0,
            short_window_minutes: windows.1,
            burn_rate_threshold: 5.0,
        }
    }

    #[test]
    fn alerts_whose_objective_or_rule_left_the_config_are_resolved_as_removed() {
        let objectives = vec![objective(true)];
        // Still configured: the objective, a rule of that severity and those windows, same id.
        assert!(state("avail/page/10m-2m/acme", "avail", "acme", "page", (10, 2)).configured(&objectives));
        // The rule's windows or severity changed, the objective is gone, or it stopped being
        // per consumer (its alerts are named differently now).
        let gone = [
            state("avail/page/60m-5m/acme", "avail", "acme", "page", (60, 5)),
            state("avail/ticket/10m-2m/acme", "avail", "acme", "ticket", (10, 2)),
            state("old/page/10m-2m", "old", "", "page", (10, 2)),
        ];
        for s in &gone {
            assert!(!s.configured(&objectives), "{}", s.alert_id);
        }
        let mut single = objective(false);
        single.id = "avail".into();
        assert!(!state("avail/page/10m-2m/acme", "avail", "acme", "page", (10, 2)).configured(&[single]));

        let n = gone[0].removed(&objectives, 1_800_000_000);
        assert_eq!((n.id.as_str(), n.status, n.reason), ("avail/page/60m-5m/acme", Status::Resolved, Reason::Removed));
        assert_eq!((n.kind, n.objective_percent), (Some("availability"), Some(99.0)));
        assert_eq!(n.consumer_id.as_deref(), Some("acme"));
        assert_eq!((n.long_window.minutes, n.long_window.calls, n.short_window.minutes), (60, None, 5));
        assert!(n.summary.contains("rule is no longer configured"), "{}", n.summary);
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["reason"], "removed");
        assert_eq!(json["long_window"], serde_json::json!({ "minutes": 60 }));
        // The objective itself is gone: what it was is not known any more.
        let n = gone[2].removed(&objectives, 1_800_000_000);
        assert_eq!((n.kind, n.objective_percent, n.consumer_id.as_deref()), (None, None, None));
        assert!(n.summary.contains("objective is no longer configured"), "{}", n.summary);
        let json = serde_json::to_value(&n).unwrap();
        assert!(json.get("kind").is_none() && json.get("objective_percent").is_none(), "{json}");
        assert_eq!(json["burn_rate_threshold"], 5.0);
    }

    #[test]
    fn notifications_render_as_slack_and_pagerduty_events() {
        let (o, rules, windows) = (objective(true), vec![rule()], vec![2, 10]);
        let mut firing = HashMap::new();
        let burning: HashMap<String, Vec<Counts>> = [("a<b&c".to_owned(), vec![c(20, 10), c(100, 30)])].into();
        let fired = decide(&o, &rules, &windows, &burning, &mut firing, 1_800_000_000, None).remove(0);
        let json = |f: &Format, n: &Notification| -> serde_json::Value {
            serde_json::from_slice(&render(n, f).unwrap()).unwrap()
        };
        // json: the notification itself.
        assert_eq!(json(&Format::Json, &fired), serde_json::to_value(&fired).unwrap());
        // Slack: one escaped mrkdwn line.
        let text = json(&Format::Slack, &fired)["text"].as_str().unwrap().to_owned();
        assert!(
            text.starts_with("*[FIRING] page* `avail/page/10m-2m/a&lt;b&amp;c`: SLO avail for consumer a&lt;b&amp;c"),
            "{text}"
        );
        assert!(!text.contains('<') && !text.contains('>'), "{text}");
        // PagerDuty: trigger, then resolve, with the alert's id as the dedup key.
        let pd = Format::PagerDuty { routing_key: "R0UTING".into() };
        let t = json(&pd, &fired);
        assert_eq!(
            (t["routing_key"].as_str(), t["event_action"].as_str(), t["dedup_key"].as_str()),
            (Some("R0UTING"), Some("trigger"), Some("avail/page/10m-2m/a<b&c"))
        );
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["summary"], fired.summary.as_str());
        assert_eq!(t["payload"]["timestamp"], "2027-01-15T08:00:00Z");
        assert_eq!(t["payload"]["custom_details"]["long_window"]["bad_calls"], 30);
        let quiet: HashMap<String, Vec<Counts>> = HashMap::new();
        let resolved = decide(&o, &rules, &windows, &quiet, &mut firing, 1_800_000_060, None).remove(0);
        let r = json(&pd, &resolved);
        assert_eq!(
            (r["event_action"].as_str(), r["dedup_key"].as_str()),
            (Some("resolve"), Some("avail/page/10m-2m/a<b&c"))
        );
        assert!(r.get("payload").is_none());
        assert!(json(&Format::Slack, &resolved)["text"].as_str().unwrap().starts_with("*[RESOLVED] page*"));
        assert_eq!(
            ["page", "ticket", "info", "sev1"].map(pagerduty_severity),
            ["critical", "warning", "info", "error"]
        );
        // The key never shows in logs.
        assert!(!format!("{pd:?}").contains("R0UTING"));
        // Alertmanager: the same labels firing and resolved; firing until now + the lifetime.
        let now = 1_800_000_100;
        let f = alertmanager_alert(&fired, now);
        let r = alertmanager_alert(&resolved, now);
        assert_eq!(f["labels"], r["labels"]);
        assert_eq!(
            f["labels"],
            serde_json::json!({
                "alertname": "TollgateSLOBurnRate", "alert_id": "avail/page/10m-2m/a<b&c", "slo": "avail",
                "severity": "page", "windows": "10m-2m", "consumer_id": "a<b&c"
            })
        );
        assert_eq!(
            (f["startsAt"].as_str(), f["endsAt"].as_str()),
            (Some("2027-01-15T08:00:00Z"), Some("2027-01-15T08:06:40Z"))
        );
        assert_eq!(f["annotations"]["long_window_burn_rate"], "30.00");
        assert_eq!(f["annotations"]["summary"], fired.summary.as_str());
        assert_eq!((r.get("startsAt"), r["endsAt"].as_str()), (None, Some("2027-01-15T08:01:00Z")));
        let body: serde_json::Value = serde_json::from_slice(&render(&fired, &Format::Alertmanager).unwrap()).unwrap();
        assert_eq!(body.as_array().map(|a| a.len()), Some(1));
        assert_eq!(body[0]["labels"], f["labels"]);
    }

    #[test]
    fn only_4xx_that_refuse_the_request_itself_are_not_retried() {
        let rejected: Vec<u16> = (100..600).filter(|&c| http::StatusCode::from_u16(c).is_ok_and(rejects)).collect();
        let want: Vec<u16> = (400..500).filter(|c| ![408, 425, 429].contains(c)).collect();
        assert_eq!(rejected, want);
    }

    #[test]
    fn at_most_one_repeat_waits_and_it_sends_the_latest_alerts() {
        let (o, rules, windows) = (objective(true), vec![rule()], vec![2, 10]);
        let counts: HashMap<String, Vec<Counts>> =
            ["a", "b"].iter().map(|k| ((*k).to_owned(), vec![c(20, 10), c(100, 30)])).collect();
        let mut firing = HashMap::new();
        let two = decide(&o, &rules, &windows, &counts, &mut firing, 1_800_000_000, None);
        let ids = |v: &[Notification]| v.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
        let s = StillFiring::default();
        assert!(!s.set(Vec::new()), "nothing firing: no repeat");
        assert!(s.set(two[..1].to_vec()), "the first repeat is queued");
        assert!(!s.set(two.clone()), "one is queued already");
        // Delivered: the latest alerts; then the next evaluation queues one again.
        assert_eq!(ids(&s.take()), ids(&two));
        assert!(s.set(two[1..].to_vec()));
        assert!(!s.set(Vec::new()));
        assert!(s.take().is_empty(), "everything resolved meanwhile: nothing to send");
    }

    #[test]
    fn only_new_and_recent_window_ends_are_evaluated() {
        let now = 1_800_000_030;
        assert!(due(1_800_000_000, i64::MIN, now, 600));
        assert!(!due(1_800_000_000, 1_800_000_000, now, 600), "evaluated already");
        assert!(!due(1_799_999_940, 1_800_000_000, now, 600), "earlier than the last");
        assert!(due(1_799_999_430, i64::MIN, now, 600), "exactly stale_after_s old");
        assert!(!due(1_799_999_400, i64::MIN, now, 600), "a catch-up's past minute");
    }

    #[test]
    fn window_sql_sums_each_window_from_its_start() {
        let mut o = objective(false);
        o.route = Some("echo".into());
        let sql = window_sql(&o, &[5, 60], "toDateTime(1800000000)");
        assert!(
            sql.contains(
                "sumIf(t, minute >= toDateTime(1800000000) - 300), sumIf(t, minute >= toDateTime(1800000000) - 3600)"
            ),
            "{sql}"
        );
        assert!(
            sql.contains(
                "minute >= toDateTime(1800000000) - 3600 AND minute < toDateTime(1800000000) AND route_id = ?"
            ),
            "{sql}"
        );
        assert!(sql.contains("SELECT '' AS c,"), "{sql}");
    }

    /// The documented query file is the evaluator's SQL (the migrations test runs the file on
    /// current ClickHouse; the e2e tests run the evaluator on 18.16).
    #[test]
    fn the_documented_window_query_is_the_evaluators() {
        let file = include_str!("../../../schemas/queries/slo_window_counts.sql");
        let statements: Vec<String> = file
            .split(";\n")
            .map(|s| s.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n"))
            .filter(|s| !s.trim().is_empty())
            .collect();
        let end = "toStartOfMinute(now())";
        let mut latency = objective(true);
        latency.kind = Kind::Latency { threshold_us: 250_000 };
        // The incremental reads of windows of 5 and 60 minutes and 3 days ending at 2026-11-26
        // 20:25 (docs/ARCHITECTURE.md).
        let (h, e) = (1_795_723_200, 1_795_723_200 + 25 * 60);
        let mut avail_route = objective(false);
        avail_route.route = Some("echo".into());
        let want = [
            window_sql(&objective(false), &[5, 60], end),
            window_sql(&latency, &[5, 60], end),
            windows::fingerprint_sql(h - 71 * 3600, h),
            windows::hours_sql(&avail_route, h - 71 * 3600, h).replace("route_id = ?", "route_id = 'echo'"),
            windows::ranges_sql(&latency, &windows::plan(&[5, 60, 4320], e).minute_ranges),
        ];
        assert_eq!(statements.len(), want.len(), "{file}");
        for (got, want) in statements.iter().zip(&want) {
            assert_eq!(got.trim().trim_end_matches(';'), want, "update schemas/queries/slo_window_counts.sql");
        }
    }

    #[tokio::test]
    async fn dispatch_routes_by_severity_and_records_directly_what_no_receiver_takes() {
        let tls = tollgate_common::tls::client_config(&[]).unwrap();
        let route = |name: &str, severities: &[&str]| {
            let (tx, rx) = mpsc::channel(8);
            let hook = Webhook {
                name: name.into(),
                url: "http://127.0.0.1:9/".parse().unwrap(),
                format: Format::Json,
                timeout: Duration::from_secs(1),
                headers: Vec::new(),
                tls: Arc::clone(&tls),
                severities: severities.iter().map(|s| (*s).to_owned()).collect(),
            };
            let r = Route { hook: Arc::new(hook), tx, firing: Arc::default(), stats: Arc::default() };
            (r, rx)
        };
        let (oncall, mut oncall_rx) = route("oncall", &["page"]);
        let (chat, mut chat_rx) = route("chat", &[]);
        let routes = [oncall, chat];
        let (record_tx, mut record_rx) = mpsc::channel(8);
        let (_stop_tx, mut stop) = watch::channel(false);
        let (o, mut firing) = (objective(false), HashMap::new());
        let burning: HashMap<String, Vec<Counts>> = [(String::new(), vec![c(20, 10), c(100, 30)])].into();
        let page = decide(&o, &[rule()], &[2, 10], &burning, &mut firing, 1_800_000_000, None).remove(0);
        let mut ticket = page.clone();
        ticket.severity = "ticket".into();
        let pending = |m: Option<Message>| match m {
            Some(Message::Change(p)) => p,
            other => panic!("{other:?}"),
        };
        // A page goes to both, one shared notification that two receivers still have.
        assert!(dispatch(page, &routes, &record_tx, &mut stop).await);
        let (a, b) = (pending(oncall_rx.try_recv().ok()), pending(chat_rx.try_recv().ok()));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((a.left.load(Ordering::Acquire), a.delivered.load(Ordering::Acquire)), (2, true));
        // A ticket only to chat.
        assert!(dispatch(ticket.clone(), &routes, &record_tx, &mut stop).await);
        assert!(oncall_rx.try_recv().is_err());
        let t = pending(chat_rx.try_recv().ok());
        assert_eq!((t.n.severity.as_str(), t.left.load(Ordering::Acquire)), ("ticket", 1));
        assert!(record_rx.try_recv().is_err());
        assert_eq!(routes.iter().map(|r| r.stats.queued.load(Ordering::Relaxed)).collect::<Vec<_>>(), [1, 2]);
        // With only the page receiver, a ticket is recorded at once, as not delivered.
        assert!(dispatch(ticket, &routes[..1], &record_tx, &mut stop).await);
        assert!(oncall_rx.try_recv().is_err());
        let r = record_rx.try_recv().unwrap();
        assert_eq!((r.left.load(Ordering::Acquire), r.delivered.load(Ordering::Acquire)), (0, false));
    }
}
