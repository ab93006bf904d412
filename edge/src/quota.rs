//! Monthly quota enforcement from the aggregator's compacted topic `quota-state`.
//!
//! A thread reads the topic from the beginning (at start) and then continuously, and keeps the
//! latest state of every consumer. A state says how many counted calls (forwarded, status
//! below 500) the consumer made in the period *before* `covered_until` (the end of the last
//! minute the aggregator closed). Between updates the edge counts the calls it admits itself,
//! per minute, so its estimate is `used + calls admitted here since covered_until`:
//!
//! - on one edge, a hard quota is never overshot once a state exists (the check and the count
//!   are one atomic step, so concurrent calls cannot both take the last unit);
//! - with N edges, each only knows the others' calls once they are in a state: the overshoot is
//!   at most what the other edges admit in one enforcement lag (the minute plus the allowed
//!   lateness plus the propagation; docs/ARCHITECTURE.md);
//! - a consumer without any state yet (its first minute) is not limited;
//! - at the end of the period the state's count no longer applies: the edge starts from zero
//!   plus what it admits in the new period, until the aggregator's first state for it.
//!
//! Until the topic is read to its end at start, states are applied as they come (fail open).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tollgate_common::time;
use tollgate_schemas::quota::{Enforcement, QuotaCodec, QuotaState, QuotaStatus};

/// Minutes of local counts kept per consumer; more than the aggregator's usual lag
/// (a minute plus its allowed lateness).
const SLOTS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Compact {
    quota: u64,
    used: u64,
    enforcement: Enforcement,
    warning_percent: u8,
    period_start_s: i64,
    period_end_s: i64,
    covered_until_s: i64,
    computed_at_us: i64,
}

/// One consumer: its latest state and the calls admitted here per minute, under one lock
/// (uncontended but for one consumer's concurrent calls), so checking and counting a call is
/// one step.
#[derive(Debug)]
pub struct Entry(Mutex<Inner>);

#[derive(Debug)]
struct Inner {
    state: Compact,
    /// (minute start, calls admitted here in it), indexed by minute modulo SLOTS.
    slots: [(i64, u64); SLOTS],
}

impl Inner {
    /// Calls admitted here in minutes starting in `[from_s, to_s)`.
    fn local(&self, from_s: i64, to_s: i64) -> u64 {
        self.slots.iter().filter(|(m, _)| *m >= from_s && *m < to_s).map(|(_, n)| n).sum()
    }

    fn count(&mut self, minute: i64) {
        let slot = &mut self.slots[(minute.div_euclid(60) as usize) % SLOTS];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += 1;
    }
}

/// What a call of a consumer with a quota learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub allowed: bool,
    pub quota: u64,
    /// Counted calls in the period, this one included when allowed.
    pub used: u64,
    pub status: QuotaStatus,
    pub enforcement: Enforcement,
    /// When the period ends and the quota resets (Unix seconds).
    pub resets_at: i64,
}

/// Latest quota state per consumer.
#[derive(Debug, Default)]
pub struct QuotaTable {
    entries: RwLock<HashMap<Arc<str>, Arc<Entry>, foldhash::fast::RandomState>>,
    /// The topic was read to its end once (quota states are complete).
    pub loaded: AtomicBool,
    pub states_applied: AtomicU64,
    pub rejected: AtomicU64,
    /// The latest `covered_until` applied (Unix seconds): how far the aggregator's counts
    /// reach (the `tollgate_edge_quota_covered_until_seconds` gauge; benchmarks use it to time
    /// propagation).
    pub covered_until: AtomicI64,
}

impl QuotaTable {
    /// Applies a state read from the topic. A state of an earlier period, or an older
    /// computation of the same period, never replaces the one held.
    pub fn apply(&self, s: &QuotaState) {
        let compact = Compact {
            quota: s.quota,
            used: s.used,
            enforcement: s.enforcement,
            warning_percent: s.warning_percent,
            period_start_s: s.period_start_us.div_euclid(1_000_000),
            period_end_s: s.period_end_us.div_euclid(1_000_000),
            covered_until_s: s.covered_until_us.div_euclid(1_000_000),
            computed_at_us: s.computed_at_us,
        };
        let existing =
            self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(s.consumer_id.as_str()).cloned();
        match existing {
            Some(e) => {
                let mut inner = e.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let held = (inner.state.period_start_s, inner.state.computed_at_us);
                if (compact.period_start_s, compact.computed_at_us) >= held {
                    inner.state = compact;
                }
            }
            None => {
                let mut map = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                map.entry(Arc::from(s.consumer_id.as_str())).or_insert_with(|| {
                    Arc::new(Entry(Mutex::new(Inner { state: compact, slots: [(i64::MIN, 0); SLOTS] })))
                });
            }
        }
        self.states_applied.fetch_add(1, Ordering::Relaxed);
        self.covered_until.fetch_max(compact.covered_until_s, Ordering::Relaxed);
    }

    /// Consumers with a state.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a call of `consumer` starting at `now_s` and, when it is allowed, counts it.
    /// `None`: the consumer has no quota state (no quota, or none computed yet).
    pub fn admit(&self, consumer: &str, now_s: i64) -> Option<Check> {
        let entry = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(consumer).cloned()?;
        let mut inner = entry.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = inner.state;
        // A state of an earlier period: its count does not apply any more. Periods are
        // monthly from the state's end (same day of the month).
        let (used, covered, start, end) = if now_s >= st.period_end_s {
            let (mut start, mut end) = (st.period_end_s, time::add_month(st.period_end_s));
            while now_s >= end {
                (start, end) = (end, time::add_month(end));
            }
            (0, start, start, end)
        } else {
            (st.used, st.covered_until_s, st.period_start_s, st.period_end_s)
        };
        let minute = now_s - now_s.rem_euclid(60);
        let before = used + inner.local(covered.max(start), end);
        let allowed = st.enforcement == Enforcement::Soft || before < st.quota;
        if allowed {
            inner.count(minute);
        } else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        drop(inner);
        let used_now = if allowed { before + 1 } else { before };
        Some(Check {
            allowed,
            quota: st.quota,
            used: used_now,
            status: QuotaStatus::of(used_now, st.quota, st.warning_percent),
            enforcement: st.enforcement,
            resets_at: end,
        })
    }
}

/// Adds `X-Quota-Limit`, `X-Quota-Used`, `X-Quota-Reset` (RFC 3339) and, on a warning or
/// an exceeded soft quota, `X-Quota-Warning`.
pub fn write_headers(headers: &mut http::HeaderMap, c: &Check) {
    let mut pairs = vec![
        ("x-quota-limit", c.quota.to_string()),
        ("x-quota-used", c.used.to_string()),
        ("x-quota-reset", time::format_utc(c.resets_at)),
    ];
    if c.allowed && c.status != QuotaStatus::Ok {
        let what = if c.status == QuotaStatus::Exceeded { "exceeded" } else { "nearly used" };
        pairs.push(("x-quota-warning", format!("monthly quota {what}: {} of {} calls", c.used, c.quota)));
    }
    for (name, value) in pairs {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Reads `topic` into `table` until `stop` is set: from the beginning, then continuously.
pub fn start(
    brokers: String,
    topic: String,
    properties: std::collections::BTreeMap<String, String>,
    instance_id: &str,
    table: Arc<QuotaTable>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let group = format!("tollgate-edge-quota-{instance_id}");
    std::thread::Builder::new().name("quota-state".into()).spawn(move || {
        let codec = match QuotaCodec::new() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "quota-state codec");
                return;
            }
        };
        // One client for the thread's life (re-creating it on every retry would only add
        // connections and log lines while Kafka is down).
        let consumer = match client(&brokers, &properties, &group) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the quota-state consumer; quotas are not enforced");
                table.loaded.store(true, Ordering::Relaxed);
                return;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let wait = match read(&consumer, &topic, &table, &codec, &stop) {
                Ok(()) => return,
                Err(ReadError::NoTopic) => {
                    tracing::debug!(
                        topic,
                        "no quota-state topic yet (no aggregator with quotas); looking again in 10 s"
                    );
                    Duration::from_secs(10)
                }
                Err(ReadError::Kafka(e)) => {
                    tracing::warn!(error = %e, topic, "cannot read quota states; retrying in 2 s");
                    Duration::from_secs(2)
                }
            };
            // Sleep in small steps so that shutdown does not wait.
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
}

#[derive(Debug)]
enum ReadError {
    NoTopic,
    Kafka(rdkafka::error::KafkaError),
}

impl From<rdkafka::error::KafkaError> for ReadError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        ReadError::Kafka(e)
    }
}

fn client(
    brokers: &str,
    properties: &std::collections::BTreeMap<String, String>,
    group: &str,
) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
    let mut cc = ClientConfig::new();
    // Assigned partitions, no group membership and no commits: every edge reads everything.
    cc.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (k, v) in properties {
        if !k.starts_with("acks")
            && !k.starts_with("linger")
            && !k.starts_with("enable.idempotence")
            && !k.starts_with("message.")
        {
            cc.set(k, v);
        }
    }
    cc.create()
}

fn read(
    consumer: &BaseConsumer,
    topic: &str,
    table: &QuotaTable,
    codec: &QuotaCodec,
    stop: &AtomicBool,
) -> Result<(), ReadError> {
    let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let partitions: Vec<i32> = meta
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        // No aggregator has published yet: nothing to enforce; look again later.
        table.loaded.store(true, Ordering::Relaxed);
        return Err(ReadError::NoTopic);
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
        if high > 0 {
            ends.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    if ends.is_empty() {
        table.loaded.store(true, Ordering::Relaxed);
    }
    tracing::info!(topic, partitions = partitions.len(), "reading quota states");
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "quota-state consumer"),
            Some(Ok(msg)) => {
                match msg.payload().map(|p| codec.decode(p)) {
                    Some(Ok(state)) => table.apply(&state),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, offset = msg.offset(), "undecodable quota state skipped")
                    }
                    None => {} // a tombstone: nothing to apply
                }
                if ends.get(&msg.partition()).is_some_and(|&end| msg.offset() + 1 >= end) {
                    ends.remove(&msg.partition());
                    if ends.is_empty() && !table.loaded.swap(true, Ordering::Relaxed) {
                        tracing::info!(consumers = table.len(), "quota states loaded");
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NOV: i64 = 1_793_491_200; // 2026-11-01T00:00:00Z
    const DEC: i64 = 1_796_083_200; // 2026-12-01T00:00:00Z

    fn state(used: u64, covered_until_s: i64, enforcement: Enforcement) -> QuotaState {
        QuotaState {
            consumer_id: "acme".into(),
            plan_id: "free".into(),
            period: "2026-11".into(),
            period_start_us: NOV * 1_000_000,
            period_end_us: DEC * 1_000_000,
            quota: 100,
            used,
            status: QuotaStatus::of(used, 100, 80),
            enforcement,
            warning_percent: 80,
            covered_until_us: covered_until_s * 1_000_000,
            computed_at_us: covered_until_s * 1_000_000 + 1,
        }
    }

    #[test]
    fn hard_quota_counts_locally_between_states_and_never_overshoots() {
        let t = QuotaTable::default();
        let now = NOV + 86_400 + 30; // a minute's 30th second
        assert_eq!(t.admit("acme", now), None, "no state: no quota");
        t.apply(&state(90, now - 30, Enforcement::Hard));
        let checks: Vec<Check> = (0..15).map(|_| t.admit("acme", now).unwrap()).collect();
        assert_eq!(checks.iter().filter(|c| c.allowed).count(), 10);
        assert_eq!(checks[9].used, 100);
        assert_eq!(checks[9].status, QuotaStatus::Exceeded);
        assert!(!checks[10].allowed);
        assert_eq!(checks[10].used, 100);
        assert_eq!(checks[10].resets_at, DEC);
        // The aggregator's next state covers this minute (100 calls): no double count.
        t.apply(&state(100, now + 30, Enforcement::Hard));
        assert!(!t.admit("acme", now + 31).unwrap().allowed);
        // An older computation does not replace it.
        t.apply(&QuotaState { computed_at_us: 0, used: 0, ..state(0, now - 30, Enforcement::Hard) });
        assert!(!t.admit("acme", now + 32).unwrap().allowed);
        // A new month: the November count no longer applies.
        let c = t.admit("acme", DEC + 5).unwrap();
        assert!(c.allowed);
        assert_eq!((c.used, c.resets_at), (1, 1_798_761_600));
        // Two months later, the period is still found from the state's end.
        let feb = 1_801_440_000; // 2027-02-01
        let c = t.admit("acme", feb + 3600).unwrap();
        assert_eq!((c.used, c.resets_at), (1, feb + 28 * 86_400));
    }

    #[test]
    fn anchored_periods_chain_from_the_state() {
        let t = QuotaTable::default();
        let (start, end) = (NOV + 14 * 86_400, DEC + 14 * 86_400); // Nov 15 .. Dec 15
        t.apply(&QuotaState {
            period_start_us: start * 1_000_000,
            period_end_us: end * 1_000_000,
            ..state(100, start + 60, Enforcement::Hard)
        });
        assert!(!t.admit("acme", end - 1).unwrap().allowed);
        let c = t.admit("acme", end + 1).unwrap();
        assert!(c.allowed);
        assert_eq!(tollgate_common::time::format_utc(c.resets_at), "2027-01-15T00:00:00Z");
    }

    #[test]
    fn soft_quota_lets_calls_through_with_a_warning() {
        let t = QuotaTable::default();
        let now = NOV + 3600;
        t.apply(&state(85, now, Enforcement::Soft));
        let c = t.admit("acme", now).unwrap();
        assert!(c.allowed);
        assert_eq!(c.status, QuotaStatus::Warning);
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &c);
        assert_eq!(h["x-quota-limit"], "100");
        assert_eq!(h["x-quota-used"], "86");
        assert_eq!(h["x-quota-reset"], "2026-12-01T00:00:00Z");
        assert!(h["x-quota-warning"].to_str().unwrap().contains("86 of 100"));
        t.apply(&state(150, now + 60, Enforcement::Soft));
        assert!(t.admit("acme", now + 61).unwrap().allowed);
    }

    #[test]
    fn concurrent_calls_cannot_share_the_last_unit() {
        let t = Arc::new(QuotaTable::default());
        let now = NOV + 7200;
        t.apply(&state(0, now, Enforcement::Hard));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || (0..100).filter(|_| t.admit("acme", now).unwrap().allowed).count())
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 100);
    }
}
