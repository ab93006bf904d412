//! The consumer-group client every pipeline stage uses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientConfig, ClientContext};

/// A pipeline stage's group consumer.
pub type GroupConsumer = StreamConsumer<GroupContext>;

/// Logs each rebalance (which partitions came and went) and keeps the number of partitions
/// the member holds in a gauge, so an operator sees how the replicas share the topic.
#[derive(Debug, Clone, Default)]
pub struct GroupContext {
    /// Partitions assigned to this member now.
    pub assigned: Arc<AtomicI64>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &rdkafka::TopicPartitionList| -> Vec<i32> {
            tpl.elements().iter().map(rdkafka::topic_partition_list::TopicPartitionListElem::partition).collect()
        };
        let held = consumer.assignment().map(|tpl| list(&tpl)).unwrap_or_default();
        self.assigned.store(held.len() as i64, Ordering::Relaxed);
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(assigned = ?list(tpl), held = ?held, "partitions assigned"),
            Rebalance::Revoke(tpl) => tracing::info!(revoked = ?list(tpl), held = ?held, "partitions revoked"),
            Rebalance::Error(e) => tracing::warn!(error = %e, held = ?held, "rebalance failed"),
        }
    }
}

/// Where and how a stage reads its topic.
#[derive(Debug, Clone, Copy)]
pub struct GroupMember<'a> {
    pub brokers: &'a str,
    pub topic: &'a str,
    pub group_id: &'a str,
    /// Static membership (`group.instance.id`): a restarted replica takes its partitions back
    /// at once instead of waiting out the dead session (and Tansu needs it after a kill -9).
    pub instance_id: &'a str,
    /// How often librdkafka commits the offsets the stage stored.
    pub commit_interval: Duration,
    /// Extra librdkafka properties, applied last.
    pub properties: &'a BTreeMap<String, String>,
    /// Set to the number of partitions the member holds after each rebalance.
    pub assigned: &'a Arc<AtomicI64>,
}

/// The group session timeout: Kafka's default since 3.0, and what static membership wants.
/// A broker outage shorter than this leaves the membership intact: the member resumes its
/// partitions without a rebalance. It also keeps Tansu 0.6 out of a state it cannot leave by
/// itself: when a member's session expires during an outage, Tansu drops the member but keeps
/// it as the group's leader, and the member rejoins under a new id as a follower of that ghost,
/// with no partitions, until Tansu restarts (reproduced with a plain librdkafka consumer: 1 of 8
/// outages of ~15 s with a 10 s session, 0 of 10 with 45 s). With Apache Kafka, partitions of a replica
/// that is gone for good move after this long. `kafka.properties` can override it.
pub const SESSION_TIMEOUT_MS: &str = "45000";

/// A subscribed group consumer whose offsets are *stored by the stage* once what precedes
/// them is durably written (`enable.auto.offset.store=false`) and committed by librdkafka in
/// the background every `commit_interval`, and by the stage at shutdown.
pub fn group_consumer(m: &GroupMember<'_>) -> Result<GroupConsumer, rdkafka::error::KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", m.brokers)
        .set("group.id", m.group_id)
        .set("group.instance.id", m.instance_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", m.commit_interval.as_millis().to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", SESSION_TIMEOUT_MS);
    for (k, v) in m.properties {
        cc.set(k, v);
    }
    let consumer: GroupConsumer = cc.create_with_context(GroupContext { assigned: Arc::clone(m.assigned) })?;
    consumer.subscribe(&[m.topic])?;
    Ok(consumer)
}

/// One partition of a member's topic, as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// The group's committed offset (`None`: never committed).
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl PartitionState {
    /// Where the group resumes: its committed offset, or the start (also when retention
    /// removed what it committed).
    fn resume_at(&self) -> i64 {
        self.committed.unwrap_or(self.low).max(self.low)
    }

    /// Messages the group has yet to read.
    fn unread(&self) -> i64 {
        self.high - self.resume_at()
    }
}

/// Where a group member stands on its topic: what a stall watchdog looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Standing {
    /// This member's partitions and its position in each (`None`: nothing read yet).
    pub assigned: BTreeMap<i32, Option<i64>>,
    /// Every partition of the topic.
    pub partitions: BTreeMap<i32, PartitionState>,
}

impl Standing {
    /// Why a member that has received nothing for a while is stuck rather than idle: one of its
    /// partitions has messages past its position, or it has no partition at all while the
    /// group has messages it has not committed and its committed offset has not moved since
    /// `previous` (the partitions were revoked and nobody reads them; a replica that is idle
    /// because the others own every partition sees them move). `None`: nothing to read.
    pub fn stuck(&self, previous: Option<&Standing>) -> Option<String> {
        for (&p, &position) in &self.assigned {
            let Some(state) = self.partitions.get(&p) else { continue };
            let at = position.map_or_else(|| state.resume_at(), |o| o.max(state.low));
            if at < state.high {
                return Some(format!("partition {p} has {} unread messages but none arrive", state.high - at));
            }
        }
        if self.assigned.is_empty() {
            let stalled = |p: &i32, s: &PartitionState| {
                s.unread() > 0
                    && previous.and_then(|prev| prev.partitions.get(p)).is_some_and(|b| b.committed == s.committed)
            };
            if let Some((p, state)) = self.partitions.iter().find(|(p, s)| stalled(p, s)) {
                return Some(format!(
                    "no partition assigned while partition {p} has {} messages the group has not committed, and nobody commits",
                    state.unread()
                ));
            }
        }
        None
    }
}

/// Reads `consumer`'s [`Standing`] on `topic` from the broker. Blocking (metadata, watermarks
/// and committed offsets are requests): call it from a blocking thread.
pub fn standing(consumer: &GroupConsumer, topic: &str, timeout: Duration) -> rdkafka::error::KafkaResult<Standing> {
    use rdkafka::{Offset, TopicPartitionList};
    let offset = |o: Offset| match o {
        Offset::Offset(n) => Some(n),
        _ => None,
    };
    let mut assigned = BTreeMap::new();
    let positions = consumer.position()?;
    for e in consumer.assignment()?.elements_for_topic(topic) {
        let pos = positions.find_partition(topic, e.partition()).and_then(|p| offset(p.offset()));
        assigned.insert(e.partition(), pos);
    }
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &ids {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut partitions = BTreeMap::new();
    for p in ids {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let committed = committed.find_partition(topic, p).and_then(|e| offset(e.offset()));
        partitions.insert(p, PartitionState { committed, low, high });
    }
    Ok(Standing { assigned, partitions })
}

/// A consumer's stall watchdog: when nothing has arrived for `timeout`, it asks the broker
/// ([`standing`]) whether there is something to read, and names the stall when there is
/// ([`Standing::stuck`]), or when the broker could not be asked for 3× `timeout`. The owner
/// calls [`StallWatch::progressed`] whenever it got a message or waited on something other
/// than Kafka, and [`StallWatch::check`] every [`StallWatch::period`].
#[derive(Debug)]
pub struct StallWatch {
    topic: String,
    timeout: Option<Duration>,
    last_progress: tokio::time::Instant,
    previous: Option<Standing>,
    unanswered_since: Option<tokio::time::Instant>,
}

impl StallWatch {
    /// `timeout`: `None` turns the watchdog off.
    pub fn new(topic: &str, timeout: Option<Duration>) -> Self {
        Self {
            topic: topic.to_owned(),
            timeout,
            last_progress: tokio::time::Instant::now(),
            previous: None,
            unanswered_since: None,
        }
    }

    /// How often to call [`StallWatch::check`].
    pub fn period(&self) -> Duration {
        self.timeout.map_or(Duration::from_secs(3600), |t| (t / 3).max(Duration::from_millis(100)))
    }

    pub fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
    }

    /// Why `consumer` is stalled, if it is. Asks the broker (in a blocking thread) only once
    /// nothing has arrived for the timeout.
    pub async fn check(&mut self, consumer: &Arc<GroupConsumer>) -> Option<String> {
        let t = self.timeout.filter(|&t| self.last_progress.elapsed() >= t)?;
        let (c, topic) = (Arc::clone(consumer), self.topic.clone());
        let standing = tokio::task::spawn_blocking(move || standing(&c, &topic, Duration::from_secs(5))).await;
        let unknown = match standing {
            Ok(Ok(standing)) => {
                let stuck = standing.stuck(self.previous.as_ref());
                self.previous = Some(standing);
                if stuck.is_none() {
                    self.progressed();
                    self.unanswered_since = None;
                }
                return stuck;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        // An outage, or a client too wedged to ask: after a while a new consumer is worth a
        // try either way.
        tracing::debug!(error = %unknown, "stall check: the broker does not answer");
        let since = *self.unanswered_since.get_or_insert_with(tokio::time::Instant::now);
        (since.elapsed() >= 3 * t).then(|| {
            format!("nothing arrived and the stall check has failed for {} s: {unknown}", since.elapsed().as_secs())
        })
    }
}

/// Why a consumer's run ended before shutdown: it stalled (see [`StallWatch`]) or hit a fatal
/// error.
#[derive(Debug)]
pub struct Stalled {
    pub why: String,
    /// Whether the consumer read anything before it stalled.
    pub read_any: bool,
}

/// Runs `run` (one consumer's life, given its stall timeout) until it ends for a reason other
/// than a stall, starting it again after each stall. Each restart in a row without a message
/// waits twice as long (up to 8× `stall_timeout`), so a coordinator that is slow to settle is
/// not disturbed again and again.
pub async fn restart_while_stalled<F, Fut, E>(stall_timeout: Option<Duration>, mut run: F) -> Result<(), E>
where
    F: FnMut(Option<Duration>) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Stalled>, E>>,
{
    let mut patience = 1u32;
    loop {
        match run(stall_timeout.map(|t| t * patience)).await? {
            None => return Ok(()),
            Some(Stalled { why, read_any }) => {
                patience = if read_any { 1 } else { (patience * 2).min(8) };
                tracing::warn!(reason = %why, "Kafka consumer stalled; starting again with a new one (it rejoins the group)");
            }
        }
    }
}

/// Closes a consumer (which waits for the broker) off the runtime, giving up after 10 s: a
/// stalled one may never manage.
pub async fn close(consumer: Arc<GroupConsumer>) {
    let close = tokio::task::spawn_blocking(move || drop(consumer));
    if tokio::time::timeout(Duration::from_secs(10), close).await.is_err() {
        tracing::warn!("the consumer did not close within 10 s; going on without it");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(committed: Option<i64>, low: i64, high: i64) -> PartitionState {
        PartitionState { committed, low, high }
    }

    #[test]
    fn stuck_only_when_something_is_left_to_read() {
        let partitions: BTreeMap<i32, PartitionState> = [(0, state(Some(10), 0, 10)), (1, state(Some(4), 0, 9))].into();
        let idle_owner = Standing { assigned: [(0, Some(10))].into(), partitions: partitions.clone() };
        assert_eq!(idle_owner.stuck(None), None, "its own partition is read to the end");
        let lagging = Standing { assigned: [(1, Some(4))].into(), partitions: partitions.clone() };
        assert!(lagging.stuck(None).unwrap().contains("partition 1 has 5 unread"), "{:?}", lagging.stuck(None));
        let not_started = Standing { assigned: [(1, None)].into(), partitions: partitions.clone() };
        assert!(not_started.stuck(None).unwrap().contains("partition 1 has 5 unread"));
        // No partition: stuck only once the group's commits on a lagging partition stopped.
        let orphan = Standing { assigned: BTreeMap::new(), partitions: partitions.clone() };
        assert_eq!(orphan.stuck(None), None, "one look is not enough");
        assert!(orphan.stuck(Some(&orphan)).unwrap().contains("no partition assigned"), "{:?}", orphan.stuck(None));
        let mut moved = orphan.clone();
        moved.partitions.insert(1, state(Some(2), 0, 9));
        assert_eq!(orphan.stuck(Some(&moved)), None, "another replica reads partition 1");
        let nothing_left: BTreeMap<i32, PartitionState> = [(0, state(Some(10), 0, 10)), (1, state(None, 3, 3))].into();
        let idle = Standing { assigned: BTreeMap::new(), partitions: nothing_left };
        assert_eq!(idle.stuck(Some(&idle)), None);
        // Retention removed what was committed: reading resumes at the low watermark.
        let trimmed = Standing { assigned: [(0, Some(2))].into(), partitions: [(0, state(Some(2), 7, 7))].into() };
        assert_eq!(trimmed.stuck(None), None);
    }
}
