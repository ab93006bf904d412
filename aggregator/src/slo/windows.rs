//! Window counts read incrementally: whole hours from a cache, only the partial hours at the
//! windows' ends from ClickHouse.
//!
//! A window `[end - w, end)` is split into the minutes before its first whole hour, the whole
//! hours, and the minutes of the current hour. Whole hours come from a per-objective cache of
//! per-hour counts; each evaluation reads, with one cheap scan without `FINAL` (two columns),
//! every hour's row count and sum of row versions in `usage_minute`: a rewritten minute (late
//! events, another aggregator replica) adds a row with a new version, so its hour's
//! fingerprint changes and the hour is read again. The partial hours are read with `FINAL` at
//! every evaluation. With the default rules (longest window 3 days) a steady-state evaluation
//! reads about an hour of `usage_minute` with `FINAL` per objective instead of three days.
//! The result equals [`super::window_sql`]'s over the whole window (tested against it).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use serde::Deserialize;

use super::{Counts, Objective, bind_filters, counted_exprs, filters};
use crate::store::USAGE_TABLE;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn floor_hour(s: i64) -> i64 {
    s - s.rem_euclid(HOUR)
}

fn floor_day(s: i64) -> i64 {
    s - s.rem_euclid(DAY)
}

/// How a long window `[start, end)` (the error budget's period, per consumer) is read: the
/// hours and minutes before its first whole UTC day (`head`, ending at that day), its whole
/// days (`days`), and the hours and minutes after them (`tail`, ending at `end`). Without a
/// whole day inside, it is all `tail`.
#[derive(Debug, PartialEq, Eq)]
pub struct PeriodParts {
    pub head: Option<(i64, i64)>,
    pub days: Option<(i64, i64)>,
    pub tail: Option<(i64, i64)>,
}

pub fn period_parts(start: i64, end: i64) -> PeriodParts {
    let first_day = if start.rem_euclid(DAY) == 0 { start } else { floor_day(start) + DAY };
    let last_day = floor_day(end);
    if first_day >= last_day {
        return PeriodParts { head: None, days: None, tail: (start < end).then_some((start, end)) };
    }
    PeriodParts {
        head: (start < first_day).then_some((start, first_day)),
        days: Some((first_day, last_day)),
        tail: (last_day < end).then_some((last_day, end)),
    }
}

/// How the windows ending at `end` are read: `minute_ranges` (half-open, seconds) read with
/// `FINAL` now, and per window the indexes of its minute ranges and its whole hours.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub minute_ranges: Vec<(i64, i64)>,
    /// Per window: (indexes into `minute_ranges`, whole hours `[from, to)`).
    pub windows: Vec<(Vec<usize>, (i64, i64))>,
}

/// Splits each window (minutes) ending at `end` (a minute boundary) into partial-hour minute
/// ranges and whole hours.
pub fn plan(windows: &[u32], end: i64) -> Plan {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    let idx = |r: (i64, i64), ranges: &mut Vec<(i64, i64)>| match ranges.iter().position(|&x| x == r) {
        Some(i) => i,
        None => {
            ranges.push(r);
            ranges.len() - 1
        }
    };
    let current = floor_hour(end);
    let mut out = Vec::new();
    for &w in windows {
        let start = end - i64::from(w) * 60;
        let mut mine = Vec::new();
        if floor_hour(start) == current || start >= current {
            mine.push(idx((start, end), &mut ranges));
            out.push((mine, (current, current)));
            continue;
        }
        let first_whole = if start.rem_euclid(HOUR) == 0 { start } else { floor_hour(start) + HOUR };
        if start < first_whole {
            mine.push(idx((start, first_whole), &mut ranges));
        }
        if current < end {
            mine.push(idx((current, end), &mut ranges));
        }
        out.push((mine, (first_whole, current)));
    }
    Plan { minute_ranges: ranges, windows: out }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Fingerprint {
    hour: u32,
    rows: u64,
    versions: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct HourRow {
    consumer_id: String,
    hour: u32,
    total: u64,
    bad: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RangeRow {
    consumer_id: String,
    totals: Vec<u64>,
    bads: Vec<u64>,
}

/// Counts per bucket (an hour or a day) of every objective, and the fingerprints they were
/// read at: what [`Cache`] and [`DayCache`] keep.
#[derive(Debug, Default)]
struct Buckets {
    fingerprints: HashMap<i64, (u64, u64)>,
    /// Per objective (config order): bucket start → consumer → counts.
    counts: Vec<BTreeMap<i64, HashMap<String, Counts>>>,
}

impl Buckets {
    /// The fingerprint of every `unit` bucket in `[lo, hi)` now.
    async fn fingerprints_now(
        client: &Client,
        (lo, hi): (i64, i64),
        unit: i64,
    ) -> Result<HashMap<i64, (u64, u64)>, clickhouse::error::Error> {
        Ok(client
            .query(&fingerprint_sql_by(lo, hi, unit))
            .fetch_all::<Fingerprint>()
            .await?
            .into_iter()
            .map(|f| (i64::from(f.hour), (f.rows, f.versions)))
            .collect())
    }

    /// Whether bucket `b` is held, for every objective, at fingerprint `now` (`None`: any).
    fn holds(&self, b: i64, now: Option<(u64, u64)>) -> bool {
        self.fingerprints.get(&b).is_some_and(|fp| now.is_none_or(|n| *fp == n))
            && self.counts.iter().all(|c| c.contains_key(&b))
    }

    /// Reads the `stale` buckets of `unit` with `FINAL` for every objective, and keeps them
    /// with their fingerprints `now`.
    async fn read(
        &mut self,
        client: &Client,
        objectives: &[Objective],
        stale: &BTreeSet<i64>,
        now: &HashMap<i64, (u64, u64)>,
        unit: i64,
    ) -> Result<(), clickhouse::error::Error> {
        let (Some(&first), Some(&last)) = (stale.first(), stale.last()) else { return Ok(()) };
        for (o, cache) in objectives.iter().zip(self.counts.iter_mut()) {
            let sql = buckets_sql(o, first, last + unit, unit);
            for b in stale {
                cache.insert(*b, HashMap::new());
            }
            for row in bind_filters(client.query(&sql), o).fetch_all::<HourRow>().await? {
                let b = i64::from(row.hour);
                if stale.contains(&b) {
                    cache.entry(b).or_default().insert(row.consumer_id, Counts { total: row.total, bad: row.bad });
                }
            }
        }
        for b in stale {
            self.fingerprints.insert(*b, now.get(b).copied().unwrap_or((0, 0)));
        }
        Ok(())
    }

    /// Forgets the buckets before `from`.
    fn retain_from(&mut self, from: i64) {
        self.fingerprints.retain(|&b, _| b >= from);
        for cache in &mut self.counts {
            cache.retain(|&b, _| b >= from);
        }
    }
}

/// Per-hour counts of every objective, and the fingerprints they were read at.
#[derive(Debug, Default)]
pub struct Cache {
    hours: Buckets,
    /// Hours read with `FINAL` since the start (for the metrics and the benchmark).
    pub hours_read: u64,
}

/// Row count and sum of row versions of every hour in `[lo, hi)` (no `FINAL`: any new row of
/// a rewritten minute changes them).
pub fn fingerprint_sql(lo: i64, hi: i64) -> String {
    fingerprint_sql_by(lo, hi, HOUR)
}

/// [`fingerprint_sql`] per `unit` (an hour or a day, seconds); the bucket's start is `hour`.
fn fingerprint_sql_by(lo: i64, hi: i64, unit: i64) -> String {
    format!(
        "SELECT toUInt32(intDiv(toUInt32(minute), {unit}) * {unit}) AS hour, count() AS rows, sum(version) AS versions \
         FROM {USAGE_TABLE} PREWHERE minute >= toDateTime({lo}) AND minute < toDateTime({hi}) GROUP BY hour"
    )
}

// The `FINAL` reads filter in PREWHERE: on ClickHouse 18.16 that is 3-4x faster than WHERE
// (which reads every column before filtering), and exact here because every column filtered
// on (minute, route_id, consumer_id) is part of the sorting key, so all versions of a row pass
// or fail together.

/// Per consumer and hour, what `o` counts in the hours `[first, end)`.
pub fn hours_sql(o: &Objective, first: i64, end: i64) -> String {
    buckets_sql(o, first, end, HOUR)
}

/// [`hours_sql`] per `unit` (an hour or a day, seconds); the bucket's start is `hour`.
fn buckets_sql(o: &Objective, first: i64, end: i64, unit: i64) -> String {
    let (t, b, c) = counted_exprs(o);
    format!(
        "SELECT c AS consumer_id, h AS hour, sum(t) AS total, sum(b) AS bad FROM \
         (SELECT {c} AS c, toUInt32(intDiv(toUInt32(minute), {unit}) * {unit}) AS h, {t} AS t, {b} AS b \
          FROM {USAGE_TABLE} FINAL PREWHERE minute >= toDateTime({first}) AND minute < toDateTime({end}){}) \
         GROUP BY c, h",
        filters(o)
    )
}

/// Per consumer, what `o` counts in each of `ranges` (seconds, half-open).
pub fn ranges_sql(o: &Objective, ranges: &[(i64, i64)]) -> String {
    let (t, b, c) = counted_exprs(o);
    let sums = |col: &str| {
        ranges
            .iter()
            .map(|(a, z)| format!("sumIf({col}, minute >= toDateTime({a}) AND minute < toDateTime({z}))"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let any = ranges
        .iter()
        .map(|(a, z)| format!("(minute >= toDateTime({a}) AND minute < toDateTime({z}))"))
        .collect::<Vec<_>>()
        .join(" OR ");
    format!(
        "SELECT c AS consumer_id, [{}] AS totals, [{}] AS bads FROM \
         (SELECT {c} AS c, minute, {t} AS t, {b} AS b FROM {USAGE_TABLE} FINAL PREWHERE ({any}){}) GROUP BY c",
        sums("t"),
        sums("b"),
        filters(o)
    )
}

impl Cache {
    /// The counts of every window (`windows`, minutes, ascending) ending at `end_s`, per
    /// consumer ('' unless per consumer), for each objective.
    pub async fn counts(
        &mut self,
        client: &Client,
        objectives: &[Objective],
        windows: &[u32],
        end_s: i64,
    ) -> Result<Vec<HashMap<String, Vec<Counts>>>, clickhouse::error::Error> {
        let plan = plan(windows, end_s);
        self.hours.counts.resize_with(objectives.len(), BTreeMap::new);
        let (lo, hi) =
            plan.windows.iter().fold(
                (i64::MAX, i64::MIN),
                |(lo, hi), (_, (a, b))| {
                    if a < b { (lo.min(*a), hi.max(*b)) } else { (lo, hi) }
                },
            );
        if lo < hi {
            let now = Buckets::fingerprints_now(client, (lo, hi), HOUR).await?;
            let stale: BTreeSet<i64> = (0..)
                .map(|i| lo + i * HOUR)
                .take_while(|&h| h < hi)
                .filter(|h| !self.hours.holds(*h, Some(now.get(h).copied().unwrap_or((0, 0)))))
                .collect();
            self.hours.read(client, objectives, &stale, &now, HOUR).await?;
            self.hours_read += stale.len() as u64;
        }
        // Hours no window reaches any more.
        self.hours.retain_from(if lo < hi { lo } else { floor_hour(end_s) });

        let mut out = Vec::with_capacity(objectives.len());
        for (o, cache) in objectives.iter().zip(&self.hours.counts) {
            let mut counts: HashMap<String, Vec<Counts>> = HashMap::new();
            let zero = || vec![Counts::default(); windows.len()];
            if !plan.minute_ranges.is_empty() {
                let sql = ranges_sql(o, &plan.minute_ranges);
                for row in bind_filters(client.query(&sql), o).fetch_all::<RangeRow>().await? {
                    let per = counts.entry(row.consumer_id).or_insert_with(zero);
                    for (w, (ranges, _)) in plan.windows.iter().enumerate() {
                        for &r in ranges {
                            per[w].total += row.totals.get(r).copied().unwrap_or(0);
                            per[w].bad += row.bads.get(r).copied().unwrap_or(0);
                        }
                    }
                }
            }
            for (w, (_, (from, to))) in plan.windows.iter().enumerate() {
                for (_, by_consumer) in cache.range(*from..*to) {
                    for (consumer, c) in by_consumer {
                        let per = counts.entry(consumer.clone()).or_insert_with(zero);
                        per[w].total += c.total;
                        per[w].bad += c.bad;
                    }
                }
            }
            counts.retain(|_, per| per.iter().any(|c| c.total > 0));
            out.push(counts);
        }
        Ok(out)
    }
}

/// Per-day counts of every objective over whole UTC days, for the error budget's period per
/// consumer (an hour cache would hold 720 hours of every consumer). Days are fingerprinted like
/// hours, but all of them at most once an hour (a scan of a month of rows each minute would
/// cost more than the evaluation): a day rewritten after it ended (late events, a spool replay,
/// another replica) is read again within the hour. A day missing from the cache is read at once.
#[derive(Debug, Default)]
pub struct DayCache {
    days: Buckets,
    /// `end` of the evaluation that last fingerprinted every day.
    checked_at: Option<i64>,
    /// Days read with `FINAL` since the start.
    pub days_read: u64,
}

impl DayCache {
    /// Per objective, per consumer, what it counts in the whole days `[from, to)`, for the
    /// evaluation ending at `end_s`.
    pub async fn counts(
        &mut self,
        client: &Client,
        objectives: &[Objective],
        (from, to): (i64, i64),
        end_s: i64,
    ) -> Result<Vec<HashMap<String, Counts>>, clickhouse::error::Error> {
        self.days.counts.resize_with(objectives.len(), BTreeMap::new);
        let wanted: Vec<i64> = (0..).map(|i| from + i * DAY).take_while(|&d| d < to).collect();
        let missing = wanted.iter().any(|d| !self.days.holds(*d, None));
        let due = self.checked_at.is_none_or(|at| end_s - at >= HOUR);
        if missing || due {
            let now = Buckets::fingerprints_now(client, (from, to), DAY).await?;
            let stale: BTreeSet<i64> = wanted
                .into_iter()
                .filter(|d| !self.days.holds(*d, Some(now.get(d).copied().unwrap_or((0, 0)))))
                .collect();
            self.days.read(client, objectives, &stale, &now, DAY).await?;
            self.days_read += stale.len() as u64;
            if due {
                self.checked_at = Some(end_s);
            }
        }
        self.days.retain_from(from);
        let mut out = Vec::with_capacity(objectives.len());
        for cache in &self.days.counts {
            let mut counts: HashMap<String, Counts> = HashMap::new();
            for (_, by_consumer) in cache.range(from..to) {
                for (consumer, c) in by_consumer {
                    let sum = counts.entry(consumer.clone()).or_default();
                    sum.total += c.total;
                    sum.bad += c.bad;
                }
            }
            out.push(counts);
        }
        Ok(out)
    }
}

/// The error budget's period per consumer: its head and tail through hour caches of their
/// own, its whole days through a [`DayCache`] (see [`period_parts`]).
#[derive(Debug, Default)]
pub struct PeriodCache {
    head: Cache,
    tail: Cache,
    days: DayCache,
}

impl PeriodCache {
    /// Per objective, per consumer (with calls), what it counts in the `minutes` ending at
    /// `end_s`.
    pub async fn counts(
        &mut self,
        client: &Client,
        objectives: &[Objective],
        minutes: u32,
        end_s: i64,
    ) -> Result<Vec<HashMap<String, Counts>>, clickhouse::error::Error> {
        let parts = period_parts(end_s - i64::from(minutes) * 60, end_s);
        let mut out: Vec<HashMap<String, Counts>> = vec![HashMap::new(); objectives.len()];
        let mut add = |part: Vec<HashMap<String, Counts>>| {
            for (sum, part) in out.iter_mut().zip(part) {
                for (consumer, c) in part {
                    let s = sum.entry(consumer).or_default();
                    s.total += c.total;
                    s.bad += c.bad;
                }
            }
        };
        let minutes_of = |(a, z): (i64, i64)| u32::try_from((z - a) / 60).unwrap_or(u32::MAX);
        for (cache, part) in [(&mut self.head, parts.head), (&mut self.tail, parts.tail)] {
            if let Some(range) = part {
                let counts = cache.counts(client, objectives, &[minutes_of(range)], range.1).await?;
                add(counts.into_iter().map(|per| per.into_iter().map(|(k, v)| (k, v[0])).collect()).collect());
            }
        }
        if let Some(range) = parts.days {
            add(self.days.counts(client, objectives, range, end_s).await?);
        }
        for counts in &mut out {
            counts.retain(|_, c| c.total > 0);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_period_splits_into_a_head_whole_days_and_a_tail_that_cover_it_once() {
        const D: i64 = 20_000 * DAY;
        // 30 days ending mid-day: a head of the rest of the first day, 29 whole days, a tail.
        let end = D + 10 * HOUR + 25 * 60;
        let p = period_parts(end - 30 * DAY, end);
        assert_eq!(p.head, Some((end - 30 * DAY, D - 29 * DAY)));
        assert_eq!(p.days, Some((D - 29 * DAY, D)));
        assert_eq!(p.tail, Some((D, end)));
        // Ending on a day boundary: whole days only.
        assert_eq!(period_parts(D - 7 * DAY, D), PeriodParts { head: None, days: Some((D - 7 * DAY, D)), tail: None });
        // One day ending mid-day holds no whole day: all tail.
        assert_eq!(period_parts(end - DAY, end), PeriodParts { head: None, days: None, tail: Some((end - DAY, end)) });
        // Every second once, for ends all through two days.
        for end in (D..D + 2 * DAY).step_by(1800) {
            for days in [1, 2, 30] {
                let p = period_parts(end - days * DAY, end);
                let mut at = end - days * DAY;
                for (a, z) in [p.head, p.days, p.tail].into_iter().flatten() {
                    assert_eq!(a, at, "gap or overlap at {end}, {days} days");
                    at = z;
                }
                assert_eq!(at, end);
            }
        }
    }

    const H: i64 = 500_000 * 3600; // an hour boundary

    #[test]
    fn windows_split_into_partial_hours_and_whole_hours() {
        // end = H + 25 min; windows 5 min, 60 min, 3 h.
        let end = H + 25 * 60;
        let p = plan(&[5, 60, 180], end);
        assert_eq!(
            p.minute_ranges,
            vec![
                (end - 300, end),               // 5 min: inside the current hour
                (end - 3600, H),                // 60 min: 35 min of the previous hour...
                (H, end),                       // ...and the current hour's 25
                (end - 3 * 3600, H - 2 * 3600), // 3 h: 35 min of H-3h...
            ]
        );
        assert_eq!(p.windows[0], (vec![0], (H, H)));
        assert_eq!(p.windows[1], (vec![1, 2], (H, H)), "no whole hour in 60 min ending mid-hour");
        assert_eq!(p.windows[2], (vec![3, 2], (H - 2 * 3600, H)), "two whole hours between");
    }

    #[test]
    fn aligned_ends_need_no_partial_hours() {
        let p = plan(&[60, 360], H);
        assert!(p.minute_ranges.is_empty(), "{p:?}");
        assert_eq!(p.windows, vec![(vec![], (H - 3600, H)), (vec![], (H - 6 * 3600, H))]);
        // A window starting on an hour boundary but ending mid-hour.
        let p = plan(&[90], H + 30 * 60);
        assert_eq!(p.minute_ranges, vec![(H, H + 30 * 60)]);
        assert_eq!(p.windows, vec![(vec![0], (H - 3600, H))]);
    }

    #[test]
    fn every_second_of_every_window_is_counted_once() {
        for end in (H..H + 2 * 3600).step_by(60) {
            let windows = [1, 5, 30, 59, 60, 61, 360, 4320];
            let p = plan(&windows, end);
            for (w, (ranges, (from, to))) in windows.iter().zip(&p.windows) {
                let mut covered: Vec<(i64, i64)> = ranges.iter().map(|&r| p.minute_ranges[r]).collect();
                if from < to {
                    covered.push((*from, *to));
                }
                covered.sort_unstable();
                let mut at = end - i64::from(*w) * 60;
                for (a, z) in covered {
                    assert_eq!(a, at, "gap or overlap: end {end}, window {w}");
                    at = z;
                }
                assert_eq!(at, end, "window {w} at {end}");
            }
        }
    }
}
