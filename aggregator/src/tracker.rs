//! Event-time bookkeeping and the in-memory aggregates of open minutes.
//!
//! For every minute with unwritten events the tracker keeps the consumers that changed, the
//! Kafka offsets the changes came from, and, for a minute seen complete, its aggregates: per
//! (consumer, route, outcome, status class) the counts and the latencies, with the event ids
//! seen so a duplicate within the minute counts once. It is pure (no I/O) and unit-tested;
//! `pipeline` decides how a closed minute is written (see `docs/ARCHITECTURE.md`):
//!
//! - Each partition has a **watermark**: the largest event time read from it (clamped to the
//!   wall clock plus `max_skew`, so one event from a broken clock cannot close every window).
//! - The **clock** is the smallest watermark of the partitions that delivered something in
//!   the last `idle` interval, so a partition that is behind (a replay reads partitions at
//!   different speeds) holds windows open instead of making its events late. An assigned
//!   partition that has not delivered yet holds the clock too. When every partition is idle,
//!   the wall clock moves the clock on, so the last minute before a quiet period closes too.
//!   The clock never goes back.
//! - Minute `m` **closes** when the clock reaches `m + 60 s + lateness`.
//! - An event whose minute already closed is **late**: it is not dropped, its minute is
//!   opened again as *reopened* (no in-memory aggregates: the pipeline recomputes the changed
//!   consumers from the deduplicated raw table, so the late event counts exactly once). Late
//!   events are counted.
//! - The **commit offset** of a partition is the first offset of the oldest unwritten minute
//!   with events from it, or the offset after the last message read when none is pending.
//!   So every event before a committed offset belongs to a minute written for its consumer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tollgate_schemas::CallSummary;
use uuid::Uuid;

/// Counts of one (consumer, route, outcome, status class) in one minute, and its latencies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GroupAgg {
    pub requests: u64,
    pub errors_4xx: u64,
    pub errors_5xx: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency_sum_us: u64,
    pub latencies_us: Vec<u64>,
}

impl GroupAgg {
    /// Counts one call (the caller keeps its latency).
    pub fn count(&mut self, status: u16, latency_us: u64, request_bytes: u64, response_bytes: u64) {
        self.requests += 1;
        self.errors_4xx += u64::from((400..500).contains(&status));
        self.errors_5xx += u64::from(status >= 500);
        self.request_bytes = self.request_bytes.saturating_add(request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(response_bytes);
        self.latency_sum_us = self.latency_sum_us.saturating_add(latency_us);
    }
}

/// One consumer's groups in a minute: route → [((outcome, status class), counts)].
pub type ConsumerGroups = HashMap<String, Vec<((i8, u8), GroupAgg)>>;

/// The aggregates of a minute seen from its first event on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MinuteAgg {
    /// Event ids counted (a duplicate within the minute counts once).
    pub seen: HashSet<Uuid>,
    pub consumers: HashMap<String, ConsumerGroups>,
}

impl MinuteAgg {
    /// Adds an event unless its id was already counted; returns whether it was new.
    pub fn add(&mut self, e: &CallSummary<'_>) -> bool {
        if !self.seen.insert(e.event_id) {
            return false;
        }
        let consumer = e.consumer_id.as_deref().unwrap_or("");
        let route = e.route_id.as_deref().unwrap_or("");
        let routes = match self.consumers.get_mut(consumer) {
            Some(r) => r,
            None => self.consumers.entry(consumer.to_owned()).or_default(),
        };
        let groups = match routes.get_mut(route) {
            Some(g) => g,
            None => routes.entry(route.to_owned()).or_default(),
        };
        let key = (e.outcome.clickhouse_value(), crate::store::status_class(e.status));
        let g = match groups.iter().position(|(k, _)| *k == key) {
            Some(i) => &mut groups[i].1,
            None => {
                groups.push((key, GroupAgg::default()));
                let last = groups.len() - 1;
                &mut groups[last].1
            }
        };
        g.count(e.status, e.latency_us, e.request_bytes, e.response_bytes);
        g.latencies_us.push(e.latency_us);
        true
    }
}

/// Unwritten changes of one minute.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Consumers with new events in this minute.
    pub consumers: BTreeSet<String>,
    /// Per partition: the first offset with an event of this minute (holds the commit back).
    pub first_offset: BTreeMap<i32, i64>,
    /// Per partition: the last offset with an event of this minute (ingest must be past it
    /// before the minute is recomputed from the raw table).
    pub last_offset: BTreeMap<i32, i64>,
    /// Events (including duplicates) seen for this minute since it was last written.
    pub events: u64,
    /// The minute had closed before (late events): its changed consumers are recomputed from
    /// the raw table; no aggregates are kept.
    pub reopened: bool,
    /// Aggregates of every event of the minute read since its first one (not reopened).
    pub agg: MinuteAgg,
}

/// Whether an event arrived before its minute closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    OnTime,
    Late,
}

#[derive(Debug)]
pub struct Tracker {
    lateness_s: i64,
    max_skew_s: i64,
    idle_ms: i64,
    /// Per assigned partition: largest (clamped) event time read, seconds (none yet after
    /// the assignment), and when it last delivered or was assigned (wall clock, ms).
    watermarks: BTreeMap<i32, (Option<i64>, i64)>,
    /// The clock of the last close check (never decreases).
    clock_s: Option<i64>,
    pending: BTreeMap<i64, Pending>,
    /// Minutes handed to the writer and not written yet, by job id: their first offsets
    /// still hold the commit back.
    in_flight: BTreeMap<u64, BTreeMap<i32, i64>>,
    in_flight_minutes: BTreeMap<u64, i64>,
    next_job: u64,
    next_offset: BTreeMap<i32, i64>,
}

/// The start of the minute holding `ts_s`.
pub fn minute_of(ts_s: i64) -> i64 {
    ts_s - ts_s.rem_euclid(60)
}

impl Tracker {
    pub fn new(lateness_s: i64, max_skew_s: i64, idle_ms: i64) -> Self {
        Self {
            lateness_s,
            max_skew_s,
            idle_ms,
            watermarks: BTreeMap::new(),
            clock_s: None,
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            in_flight_minutes: BTreeMap::new(),
            next_job: 0,
            next_offset: BTreeMap::new(),
        }
    }

    fn close_time(&self, minute: i64) -> i64 {
        minute + 60 + self.lateness_s
    }

    /// Records the event at (partition, offset), read at wall-clock `now_ms`. Its event time
    /// must be within ClickHouse's DateTime range (the caller skips others, as ingest does).
    pub fn observe(&mut self, partition: i32, offset: i64, e: &CallSummary<'_>, now_ms: i64) -> Arrival {
        let ts_s = e.start_time_us.div_euclid(1_000_000);
        let consumer = e.consumer_id.as_deref().unwrap_or("");
        let minute = minute_of(ts_s);
        let arrival = match self.clock_s {
            Some(clock) if self.close_time(minute) <= clock => Arrival::Late,
            _ => Arrival::OnTime,
        };
        let clamped = ts_s.min((now_ms / 1000).saturating_add(self.max_skew_s));
        let w = self.watermarks.entry(partition).or_insert((None, now_ms));
        *w = (Some(w.0.map_or(clamped, |w| w.max(clamped))), now_ms);
        let p = self
            .pending
            .entry(minute)
            .or_insert_with(|| Pending { reopened: arrival == Arrival::Late, ..Pending::default() });
        if !p.consumers.contains(consumer) {
            p.consumers.insert(consumer.to_owned());
        }
        if !p.reopened {
            p.agg.add(e);
        }
        p.first_offset.entry(partition).or_insert(offset);
        let last = p.last_offset.entry(partition).or_insert(offset);
        *last = (*last).max(offset);
        p.events += 1;
        self.mark_read(partition, offset);
        arrival
    }

    /// Records a message that carries no event to aggregate (it was dead-lettered by ingest):
    /// it only moves the partition's read position.
    pub fn mark_read(&mut self, partition: i32, offset: i64) {
        let next = self.next_offset.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// The partitions currently assigned: a partition assigned but not read from yet holds
    /// the clock (for up to the idle interval), so a replay that happens to fetch one
    /// partition first does not make the others' events late.
    ///
    /// Partitions no longer assigned (a rebalance) are forgotten: they stop holding the clock,
    /// and their offsets are no longer committed from here (their pending minutes are still
    /// written, which is harmless: a rewrite is idempotent).
    pub fn assigned(&mut self, partitions: &[i32], now_ms: i64) {
        self.watermarks.retain(|p, _| partitions.contains(p));
        self.next_offset.retain(|p, _| partitions.contains(p));
        for &p in partitions {
            self.watermarks.entry(p).or_insert((None, now_ms));
        }
    }

    /// The minutes that are closed at wall-clock `now_ms`, oldest first.
    pub fn due(&mut self, now_ms: i64) -> Vec<i64> {
        let mut waiting = false;
        let mut slowest: Option<i64> = None;
        for &(w, seen) in self.watermarks.values() {
            if now_ms - seen < self.idle_ms {
                match w {
                    None => waiting = true,
                    Some(w) => slowest = Some(slowest.map_or(w, |s| s.min(w))),
                }
            }
        }
        let clock = match slowest {
            _ if waiting => None,
            Some(w) => Some(w),
            // Every partition idle: the wall clock moves on.
            None if self.pending.is_empty() => None,
            None => Some(now_ms / 1000),
        };
        let Some(clock) = clock.max(self.clock_s) else { return Vec::new() };
        self.clock_s = Some(clock);
        self.pending.keys().copied().filter(|&m| self.close_time(m) <= clock).collect()
    }

    pub fn pending(&self, minute: i64) -> Option<&Pending> {
        self.pending.get(&minute)
    }

    /// Takes a closed minute to write it: returns a job id and its changes. Its first offsets
    /// hold the commit back until [`Tracker::finished`] says the job was written.
    pub fn take(&mut self, minute: i64) -> Option<(u64, Pending)> {
        let p = self.pending.remove(&minute)?;
        let id = self.next_job;
        self.next_job += 1;
        self.in_flight.insert(id, p.first_offset.clone());
        self.in_flight_minutes.insert(id, minute);
        Some((id, p))
    }

    /// The job was written.
    pub fn finished(&mut self, job: u64) {
        self.in_flight.remove(&job);
        self.in_flight_minutes.remove(&job);
    }

    /// Minutes handed to the writer and not written yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The oldest minute with the writer.
    pub fn oldest_in_flight(&self) -> Option<i64> {
        self.in_flight_minutes.values().min().copied()
    }

    /// The read position (next offset) of a partition.
    pub fn position(&self, partition: i32) -> Option<i64> {
        self.next_offset.get(&partition).copied()
    }

    /// Offsets safe to commit (the next offset to read after a restart), per partition.
    pub fn commit_offsets(&self) -> BTreeMap<i32, i64> {
        let mut out = self.next_offset.clone();
        for first_offsets in self.pending.values().map(|p| &p.first_offset).chain(self.in_flight.values()) {
            for (&partition, &first) in first_offsets {
                if let Some(o) = out.get_mut(&partition) {
                    *o = (*o).min(first);
                }
            }
        }
        out
    }

    /// Whether nothing is happening at wall-clock `now_ms`: partitions assigned, none read
    /// within the idle interval, no minute open or with the writer. (The clock does not move
    /// then; the SLO evaluator still needs time to pass, so that a quiet period resolves.)
    pub fn quiet(&self, now_ms: i64) -> bool {
        !self.watermarks.is_empty()
            && self.pending.is_empty()
            && self.in_flight.is_empty()
            && self.watermarks.values().all(|&(_, seen)| now_ms - seen >= self.idle_ms)
    }

    /// The clock of the last close check (seconds).
    pub fn clock(&self) -> Option<i64> {
        self.clock_s
    }

    pub fn open_minutes(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const T0: i64 = 1_795_651_200; // 2026-11-25T22:40:00Z, a minute start
    const IDLE_MS: i64 = 1_000;

    fn ev(ts_s: i64, consumer: &'static str) -> CallSummary<'static> {
        CallSummary {
            event_id: Uuid::now_v7(),
            start_time_us: ts_s * 1_000_000,
            consumer_id: Some(std::borrow::Cow::Borrowed(consumer)),
            route_id: Some(std::borrow::Cow::Borrowed("r")),
            status: 200,
            outcome: tollgate_schemas::Outcome::Forwarded,
            latency_us: 1000,
            request_bytes: 1,
            response_bytes: 2,
            plan_id: None,
        }
    }

    fn ms(s: i64) -> i64 {
        s * 1000
    }

    #[test]
    fn a_minute_closes_after_the_lateness_and_holds_the_commit_until_written() {
        let mut t = Tracker::new(10, 5, IDLE_MS);
        assert_eq!(t.observe(0, 100, &ev(T0 + 5, "a"), ms(T0 + 5)), Arrival::OnTime);
        assert_eq!(t.observe(0, 101, &ev(T0 + 59, "b"), ms(T0 + 59)), Arrival::OnTime);
        assert_eq!(t.observe(0, 102, &ev(T0 + 61, "a"), ms(T0 + 61)), Arrival::OnTime);
        assert!(t.due(ms(T0 + 61)).is_empty());
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 100)]));
        // The watermark reaches minute 0's close time (60 + 10 s).
        t.observe(0, 103, &ev(T0 + 70, "c"), ms(T0 + 70));
        assert_eq!(t.due(ms(T0 + 70)), vec![T0]);
        let p = t.pending(T0).unwrap();
        assert_eq!(p.consumers, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        assert_eq!((p.first_offset[&0], p.last_offset[&0], p.events), (100, 101, 2));
        let (job, _) = t.take(T0).unwrap();
        t.finished(job);
        // Minute 1 (offsets 102, 103) still holds the commit back.
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 102)]));
        // An event for minute 0 now is late, reopens it, and is due at once.
        assert_eq!(t.observe(0, 104, &ev(T0 + 30, "d"), ms(T0 + 70) + 500), Arrival::Late);
        assert_eq!(t.due(ms(T0 + 71)), vec![T0]);
        assert_eq!(t.pending(T0).unwrap().consumers, BTreeSet::from(["d".to_owned()]));
        let (job, _) = t.take(T0).unwrap();
        t.finished(job);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 102)]));
        // Idle (nothing read for a second): the wall clock closes minute 1 at 60 + 60 + 10 s.
        assert!(t.due(ms(T0 + 129)).is_empty());
        assert_eq!(t.due(ms(T0 + 130)), vec![T0 + 60]);
        let (job, _) = t.take(T0 + 60).unwrap();
        t.finished(job);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 105)]));
        assert_eq!(t.open_minutes(), 0);
        assert_eq!(t.clock(), Some(T0 + 130));
        // Nothing open, nothing read for the idle interval: quiet. A new event ends it, and
        // its minute, open until written, keeps it ended after the idle interval.
        assert!(t.quiet(ms(T0 + 130)));
        t.observe(0, 105, &ev(T0 + 131, "e"), ms(T0 + 131));
        assert!(!t.quiet(ms(T0 + 131)));
        assert!(!t.quiet(ms(T0 + 131) + IDLE_MS));
        assert!(!Tracker::new(10, 5, IDLE_MS).quiet(ms(T0)), "no partition assigned yet");
    }

    #[test]
    fn a_partition_that_is_behind_holds_the_windows_open() {
        let mut t = Tracker::new(2, 5, IDLE_MS);
        let now = ms(T0 + 3600);
        // Replay: partition 0 is read up to minute 3 while partition 1 is still in minute 0.
        t.observe(0, 1, &ev(T0 + 10, "a"), now);
        t.observe(1, 1, &ev(T0 + 20, "b"), now);
        t.observe(0, 2, &ev(T0 + 200, "a"), now);
        assert!(t.due(now).is_empty(), "partition 1 is at minute 0");
        assert_eq!(t.observe(1, 2, &ev(T0 + 50, "b"), now), Arrival::OnTime);
        t.observe(1, 3, &ev(T0 + 65, "b"), now);
        assert_eq!(t.due(now), vec![T0]);
        // Once partition 1 goes quiet, only partition 0 counts.
        assert_eq!(t.due(now + IDLE_MS - 1), vec![T0]);
        let (job, _) = t.take(T0).unwrap();
        t.finished(job);
        t.observe(0, 3, &ev(T0 + 201, "a"), now + IDLE_MS);
        assert_eq!(t.due(now + IDLE_MS), vec![T0 + 60]);
    }

    #[test]
    fn an_assigned_partition_not_read_yet_holds_the_clock() {
        let mut t = Tracker::new(2, 5, IDLE_MS);
        let now = ms(T0 + 3600);
        t.assigned(&[0, 1], now);
        t.observe(0, 1, &ev(T0 + 10, "a"), now);
        t.observe(0, 2, &ev(T0 + 200, "a"), now);
        assert!(t.due(now + 10).is_empty(), "partition 1 has not delivered yet");
        assert_eq!(t.observe(1, 1, &ev(T0 + 20, "b"), now + 20), Arrival::OnTime);
        t.observe(1, 2, &ev(T0 + 200, "b"), now + 20);
        assert_eq!(t.due(now + 30), vec![T0]);
        // Revoked partitions stop counting.
        t.assigned(&[0], now + 40);
        t.observe(0, 3, &ev(T0 + 300, "a"), now + 40);
        assert_eq!(t.due(now + 50), vec![T0, T0 + 180]);
    }

    #[test]
    fn open_minutes_aggregate_in_memory_and_count_a_duplicate_once() {
        let mut t = Tracker::new(2, 5, IDLE_MS);
        let now = ms(T0 + 3600);
        let a = ev(T0 + 1, "a");
        let mut b = ev(T0 + 2, "a");
        (b.status, b.latency_us) = (503, 7000);
        t.observe(0, 1, &a, now);
        t.observe(0, 2, &b, now);
        t.observe(0, 3, &a, now); // a redelivery
        t.observe(0, 4, &ev(T0 + 3, "c"), now);
        let p = t.pending(T0).unwrap();
        assert_eq!((p.events, p.agg.seen.len(), p.reopened), (4, 3, false));
        let groups = &p.agg.consumers["a"]["r"];
        assert_eq!(groups.len(), 2, "2xx and 5xx");
        let ok = &groups.iter().find(|(k, _)| k.1 == 2).unwrap().1;
        let err = &groups.iter().find(|(k, _)| k.1 == 5).unwrap().1;
        assert_eq!((ok.requests, ok.latencies_us.clone()), (1, vec![1000]));
        assert_eq!((err.requests, err.errors_5xx, err.latency_sum_us), (1, 1, 7000));
        // Closed and written, then a late event reopens it without aggregates.
        t.observe(0, 5, &ev(T0 + 70, "a"), now);
        assert_eq!(t.due(now), vec![T0]);
        let (job, taken) = t.take(T0).unwrap();
        assert_eq!(taken.agg.consumers.len(), 2);
        t.observe(0, 6, &b, now);
        let p = t.pending(T0).unwrap();
        assert!(p.reopened);
        assert!(p.agg.consumers.is_empty());
        // Until the writer is done, the commit stays before the minute's first offset.
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 1)]));
        t.finished(job);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 5)]));
        let (job2, _) = t.take(T0).unwrap();
        assert_eq!(t.in_flight(), 1);
        t.finished(job2);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 5)]));
        assert_eq!(t.position(0), Some(7));
    }

    #[test]
    fn partitions_commit_independently() {
        let mut t = Tracker::new(0, 5, IDLE_MS);
        t.observe(0, 10, &ev(T0, "a"), ms(T0));
        t.observe(1, 50, &ev(T0 + 60, "b"), ms(T0 + 60));
        t.mark_read(2, 7);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 10), (1, 50), (2, 8)]));
        assert_eq!(t.due(ms(T0 + 60)), vec![T0]);
        let (job, _) = t.take(T0).unwrap();
        t.finished(job);
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 11), (1, 50), (2, 8)]));
        t.assigned(&[0, 2], ms(T0 + 61));
        assert_eq!(t.commit_offsets(), BTreeMap::from([(0, 11), (2, 8)]));
    }

    #[test]
    fn a_future_timestamp_cannot_close_every_window() {
        let mut t = Tracker::new(10, 5, IDLE_MS);
        t.observe(0, 1, &ev(T0 + 1, "a"), ms(T0 + 1));
        t.observe(0, 2, &ev(T0 + 86_400, "broken-clock"), ms(T0 + 2));
        assert!(t.due(ms(T0 + 2)).is_empty());
        assert_eq!(t.clock(), Some(T0 + 7));
    }
}
