//! The Kafka producer task: drains the queue of encoded events (Avro single-object messages,
//! encoded on the request path, see [`super::EventSink`]) and hands them to librdkafka
//! (acks=all, not idempotent: `event_id` deduplication downstream). Nothing here waits on Kafka:
//! - librdkafka's queue full → the event goes to the on-disk [`Spool`];
//! - Kafka not answering the probe task's metadata requests (every 2 s), or answering without
//!   the event topic → new events go straight to the spool, and those waiting in librdkafka's
//!   queue are purged into it, so that an outage's events are on disk (a `kill -9` keeps them)
//!   within seconds rather than in memory for `kafka.message_timeout_ms`;
//! - a delivery that fails (e.g. Kafka down longer than `kafka.message_timeout_ms`) → the
//!   delivery callback puts the message in the spool;
//! - a replay task sends closed spool segments back, oldest first, while the broker answers
//!   the probe task's metadata requests and has the topic, and deletes a segment once every
//!   record in it was acknowledged or spooled again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::EncodedEvent;
use super::spool::{self, Spool};
use crate::config::KafkaConfig;
use crate::metrics::{KafkaState, Metrics};

/// Events taken from the queue at once.
const BATCH: usize = 1024;

/// How often the probe asks Kafka for the event topic's metadata, and how long it waits.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Delivery opaque of a live event.
const LIVE: usize = 0;
/// Delivery opaque of a replayed spool record.
const REPLAY: usize = 1;

/// Counts delivery reports and spools failed messages (runs on librdkafka's polling thread).
pub struct Delivery {
    metrics: Arc<Metrics>,
    spool: Spool,
    /// Replayed records whose delivery report has not arrived yet.
    replay_pending: AtomicU64,
    /// Failed deliveries not logged yet, and when the last log line was written (only the
    /// polling thread touches it): one line per [`FAILURE_LOG_INTERVAL`], not one per event.
    failures: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
}

/// At most one log line about failed deliveries per this interval.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, origin: usize) {
        match result {
            Ok(_) => {
                self.metrics.events_produced.fetch_add(1, Ordering::Relaxed);
                if origin == REPLAY {
                    self.metrics.events_replayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, msg)) => {
                self.metrics.events_delivery_failed.fetch_add(1, Ordering::Relaxed);
                self.log_failure(e);
                self.spool.append(msg.key().unwrap_or_default(), msg.payload().unwrap_or_default());
            }
        }
        if origin == REPLAY {
            self.replay_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Delivery {
    /// Says why deliveries fail (the metric only says how many): the first failure at once,
    /// then a count and the latest error at most every [`FAILURE_LOG_INTERVAL`].
    fn log_failure(&self, e: &KafkaError) {
        let mut guard = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (unlogged, last) = &mut *guard;
        *unlogged += 1;
        if last.is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL) {
            tracing::warn!(error = %e, failed = *unlogged, "event deliveries failed; the events were spooled");
            (*unlogged, *last) = (0, Some(std::time::Instant::now()));
        }
    }
}

type KafkaProducer = ThreadedProducer<Delivery>;

/// The running producer and replay tasks.
pub struct ProducerTask {
    task: JoinHandle<()>,
    replay: JoinHandle<()>,
    close: oneshot::Sender<()>,
}

impl ProducerTask {
    /// Stops taking new events (senders still alive, e.g. in connections that outlived the
    /// shutdown grace, see their events dropped and counted), produces what is queued,
    /// flushes librdkafka; what Kafka did not take by then is spooled for the next start.
    pub async fn close(self) -> Result<(), tokio::task::JoinError> {
        self.replay.abort();
        let _ = self.close.send(());
        self.task.await
    }
}

/// Starts the producer and replay tasks. Returns the queue's sender and the tasks.
pub fn start(
    cfg: &KafkaConfig,
    spool: Spool,
    metrics: Arc<Metrics>,
    flush_timeout: Duration,
) -> Result<(mpsc::Sender<EncodedEvent>, ProducerTask), KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("acks", "all")
        // Not idempotent: duplicates (retries) are removed downstream by `event_id`, and order
        // does not matter (event time), so idempotence would buy nothing here, and it costs:
        // librdkafka then caps a partition at 5 produce requests in flight and its broker
        // thread spins while the cap is reached (with the local Tansu: 20–27 µs of CPU per event,
        // against 0.6–1.1 without; docs/benchmarks.md), and Tansu 0.6's SQLite storage fails an
        // idempotent producer's first batch after a broker restart (docs/ARCHITECTURE.md).
        .set("enable.idempotence", "false")
        // Batches of 20 ms: a quarter of the produce requests of librdkafka's 5 ms default, so a
        // quarter of the broker's per-request work (docs/benchmarks.md); +15 ms to freshness.
        .set("linger.ms", "20")
        .set("message.timeout.ms", cfg.message_timeout.as_millis().to_string())
        .set("queue.buffering.max.messages", "200000")
        // Events are keyed by consumer so that each aggregator replica owns whole consumers.
        // Unauthenticated calls have an empty key, which librdkafka's default partitioner
        // (`consistent_random`) spreads at random: two replicas would then each write a part
        // of the anonymous usage rows of a minute, and one part would replace the other.
        // `consistent` hashes keys the same way (CRC32) and puts empty keys in one partition.
        .set("partitioner", "consistent");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    let context = Delivery {
        metrics: Arc::clone(&metrics),
        spool: spool.clone(),
        replay_pending: AtomicU64::new(0),
        failures: std::sync::Mutex::new((0, None)),
    };
    let producer: Arc<KafkaProducer> = Arc::new(cc.create_with_context(context)?);
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let (close, close_rx) = oneshot::channel();
    let topic = cfg.topic.clone();
    let replay = tokio::spawn(replay(Arc::clone(&producer), spool.clone(), topic.clone(), Arc::clone(&metrics)));
    tokio::spawn(probe(Arc::clone(&producer), topic.clone(), Arc::clone(&metrics)));
    let task = tokio::spawn(run(producer, topic, rx, close_rx, spool, metrics, flush_timeout));
    Ok((tx, ProducerTask { task, replay, close }))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    producer: Arc<KafkaProducer>,
    topic: String,
    mut rx: mpsc::Receiver<EncodedEvent>,
    mut close: oneshot::Receiver<()>,
    spool: Spool,
    metrics: Arc<Metrics>,
    flush_timeout: Duration,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            biased;
            // After close, recv_many() still yields what is queued, then 0.
            _ = &mut close, if !close.is_terminated() => {
                rx.close();
                continue;
            }
            n = rx.recv_many(&mut batch, BATCH) => n,
        };
        if n == 0 {
            break;
        }
        let mut refused = Vec::new();
        if metrics.kafka_state().spool_directly() {
            refused.append(&mut batch);
        }
        for event in batch.drain(..) {
            let record = BaseRecord::with_opaque_to(&topic, LIVE).key(event.key()).payload(&event.payload);
            let sent = producer.send(record).map_err(|(e, _)| e);
            if let Err(e) = sent {
                // Queue full (Kafka slow or down) or any other refusal: the disk takes it.
                if !matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) {
                    tracing::warn!(error = %e, "producer refused an event; spooling it");
                }
                refused.push(event);
            }
        }
        if !refused.is_empty() {
            // The spool may make its caller wait (a burst): off this runtime's thread. Events
            // meanwhile gather in the queue, which the request path never waits on.
            let spool = spool.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for event in &refused {
                    spool.append(event.key().as_bytes(), &event.payload);
                }
            })
            .await;
        }
        metrics.events_queued_now.store(rx.len() as u64, Ordering::Relaxed);
        // Let events gather: under load one wake-up per millisecond instead of one per event
        // (each a cross-thread wake-up of this task from the request path). librdkafka lingers
        // 20 ms anyway.
        if n < BATCH && !close.is_terminated() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let flushed = tokio::task::spawn_blocking(move || {
        let result = producer.flush(flush_timeout);
        if result.is_err() {
            // Fail what is still queued so the delivery callback spools it, then let the
            // callbacks run.
            producer.purge(PurgeConfig::default().queue().inflight());
            let _ = producer.flush(Duration::from_secs(1));
        }
        result
    })
    .await;
    match flushed {
        Ok(Ok(())) => tracing::info!("event producer flushed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete; the rest was spooled"),
        Err(e) => tracing::error!(error = %e, "event producer flush task failed"),
    }
    // The spool's last segment written, synced and closed before the process exits.
    let closed = tokio::task::spawn_blocking(move || spool.close(Duration::from_secs(10))).await;
    if !matches!(closed, Ok(true)) {
        tracing::error!("the spool writer did not close its segment; the next start replays it all the same");
    }
}

/// The state a metadata answer gives: the topic's entry (its error, if any), or `None` when
/// the answer does not list the topic.
fn topic_state(entry: Option<Option<RDKafkaErrorCode>>) -> KafkaState {
    match entry {
        None | Some(Some(RDKafkaErrorCode::UnknownTopicOrPartition)) => KafkaState::TopicMissing,
        // Other topic errors (no leader yet, ...) are librdkafka's to retry.
        Some(_) => KafkaState::Usable,
    }
}

/// Asks Kafka for the topic's metadata every [`PROBE_INTERVAL`] and records the answer in the
/// metrics ([`Metrics::kafka_state`]), for `/readyz`, the replay task and the producer task.
/// While Kafka is not usable, events waiting in librdkafka's queue are purged into the spool
/// (the delivery callback writes them) rather than left in memory for the message timeout.
async fn probe(producer: Arc<KafkaProducer>, topic: String, metrics: Arc<Metrics>) {
    loop {
        let (p, t) = (Arc::clone(&producer), topic.clone());
        let now = tokio::task::spawn_blocking(move || match p.client().fetch_metadata(Some(&t), PROBE_TIMEOUT) {
            Err(_) => KafkaState::Unreachable,
            Ok(md) => {
                topic_state(md.topics().iter().find(|x| x.name() == t).map(|x| x.error().map(RDKafkaErrorCode::from)))
            }
        })
        .await
        .unwrap_or(KafkaState::Unreachable);
        let before = metrics.set_kafka_state(now);
        if now != before {
            match now {
                KafkaState::Unreachable => {
                    tracing::warn!("Kafka does not answer (kafka.brokers); new events go to the spool until it does")
                }
                KafkaState::TopicMissing => tracing::error!(
                    topic = %topic,
                    "the event topic does not exist on the brokers (kafka.topic); events go to the spool until it is created"
                ),
                KafkaState::Usable if before != KafkaState::Unknown => {
                    tracing::info!(topic = %topic, "Kafka usable again; events go to it and the spool is replayed")
                }
                _ => {}
            }
        }
        // At every probe while Kafka is unusable, not only at the change: a batch the producer
        // task was handing over meanwhile, or a retry, may have entered the queue since.
        if now.spool_directly() {
            let p = Arc::clone(&producer);
            let _ = tokio::task::spawn_blocking(move || p.purge(PurgeConfig::default().queue())).await;
        }
        // Ends with the producer: the last Arc holder besides this task is gone.
        if Arc::strong_count(&producer) == 1 {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Replays closed spool segments, oldest first, while the broker answers.
async fn replay(producer: Arc<KafkaProducer>, spool: Spool, topic: String, metrics: Arc<Metrics>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = match tokio::task::spawn_blocking({
            let spool = spool.clone();
            move || spool.oldest_closed()
        })
        .await
        {
            Ok(Ok(Some(seg))) => seg,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot list spool segments");
                continue;
            }
            Err(_) => return,
        };
        // Only replay when the broker answers and has the topic (the probe task asks every
        // 2 s): otherwise every record would wait out the message timeout and be spooled again.
        if metrics.kafka_state() != KafkaState::Usable {
            continue;
        }
        let (seq, path) = next;
        let opened = tokio::task::spawn_blocking({
            let path = path.clone();
            move || spool::SegmentReader::open(&path)
        })
        .await;
        let mut reader = match opened {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, segment = seq, "cannot read spool segment");
                continue;
            }
            Err(_) => return,
        };
        // A batch at a time: memory holds one batch, not the segment (librdkafka copies what
        // it is given, and a failed delivery is spooled again from librdkafka's copy).
        let mut records = 0;
        let ended = loop {
            let Ok((r, batch)) = tokio::task::spawn_blocking(move || {
                let batch = reader.next_batch(REPLAY_BATCH);
                (reader, batch)
            })
            .await
            else {
                return;
            };
            reader = r;
            let batch = match batch {
                Ok(b) => b,
                Err(e) => break Err(e),
            };
            records += batch.records.len();
            send_replayed(&producer, &spool, &topic, &batch.records).await;
            if let Some(lost) = batch.end {
                break Ok(lost);
            }
        };
        match ended {
            Ok(0) => {}
            Ok(lost) => {
                spool.stats().corrupt.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(segment = seq, "spool segment has a torn tail; the record there is lost");
            }
            Err(e) => {
                // Kept for a later attempt; the records sent already then reach Kafka twice,
                // which ingest's `event_id` deduplication absorbs.
                tracing::error!(error = %e, segment = seq, records, "cannot read spool segment; it is replayed again later");
                continue;
            }
        }
        let context = producer.context();
        // Every record is now acknowledged or spooled again by the delivery callback.
        while context.replay_pending.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(segment = seq, records, "spool segment replayed");
        metrics.spool_segments_replayed.fetch_add(1, Ordering::Relaxed);
        let remove = tokio::task::spawn_blocking({
            let spool = spool.clone();
            move || spool.remove(&path)
        })
        .await;
        if !matches!(remove, Ok(Ok(()))) {
            tracing::error!(segment = seq, "cannot delete a replayed spool segment; it will be replayed again");
        }
    }
}

/// Records read from a spool segment at once by the replay task.
const REPLAY_BATCH: usize = 1024;

/// Hands replayed records to librdkafka, waiting while its queue is full; a record it refuses
/// otherwise is written to the spool again.
async fn send_replayed(producer: &KafkaProducer, spool: &Spool, topic: &str, records: &[spool::Record]) {
    let context = producer.context();
    for r in records {
        context.replay_pending.fetch_add(1, Ordering::Relaxed);
        let mut record = BaseRecord::with_opaque_to(topic, REPLAY).key(&r.key[..]).payload(&r.payload[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    // Not sent: keep it in the spool by writing it again.
                    tracing::warn!(error = %e, "replay refused; spooling the record again");
                    context.replay_pending.fetch_sub(1, Ordering::Relaxed);
                    let (spool, r) = (spool.clone(), r.clone());
                    let _ = tokio::task::spawn_blocking(move || spool.append(&r.key, &r.payload)).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The scale-out contract (docs/ARCHITECTURE.md): an aggregator replica owns whole
    /// consumers, so all the events of one key — and all the unauthenticated calls, whose key
    /// is empty — go to one partition. Produced through the edge's own producer to librdkafka's
    /// mock cluster with 4 partitions, then read back by partition.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_key_and_all_anonymous_events_land_in_one_partition() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
        mock.create_topic("calls", 4, 1).unwrap();
        let dir = std::env::temp_dir().join(format!("tollgate-partitions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spool = Spool::open(&spool::SpoolConfig {
            dir: dir.clone(),
            max_bytes: 64 << 20,
            fsync: spool::FsyncPolicy::Always,
        })
        .unwrap();
        let metrics = Arc::new(Metrics::new(["r"], 1));
        let cfg = crate::config::KafkaConfig {
            enabled: true,
            brokers: mock.bootstrap_servers(),
            topic: "calls".into(),
            queue_capacity: 1000,
            message_timeout: Duration::from_secs(30),
            quota_topic: String::new(),
            properties: Default::default(),
        };
        let (tx, task) = start(&cfg, spool, Arc::clone(&metrics), Duration::from_secs(5)).unwrap();
        let keys = ["", "acme", "globex", "initech", "umbrella", "hooli"];
        let n = 120;
        for i in 0..n {
            let key = keys[i % keys.len()];
            let event =
                EncodedEvent { key: (!key.is_empty()).then(|| Arc::from(key)), payload: i.to_string().into_bytes() };
            tx.send(event).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while metrics.events_produced.load(Ordering::Relaxed) < n as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} produced",
                metrics.events_produced.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(tx);
        task.close().await.unwrap();

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "partition-check")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        for p in 0..4 {
            assignment.add_partition_offset("calls", p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let mut partitions: std::collections::BTreeMap<String, std::collections::BTreeSet<i32>> = Default::default();
        let mut read = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read < n && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                partitions.entry(key).or_default().insert(m.partition());
                read += 1;
            }
        }
        assert_eq!(read, n, "events read back");
        for key in keys {
            assert_eq!(partitions[key].len(), 1, "key {key:?} spread over partitions {:?}", partitions[key]);
        }
        let used: std::collections::BTreeSet<i32> = partitions.values().flatten().copied().collect();
        assert!(used.len() > 1, "the keys should spread over the partitions: {partitions:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_topic_missing_from_the_answer_or_unknown_to_it_sends_events_to_the_spool() {
        assert_eq!(topic_state(None), KafkaState::TopicMissing);
        assert_eq!(topic_state(Some(Some(RDKafkaErrorCode::UnknownTopicOrPartition))), KafkaState::TopicMissing);
        assert_eq!(topic_state(Some(None)), KafkaState::Usable);
        // Transient topic errors are librdkafka's to retry, not a reason to spool.
        assert_eq!(topic_state(Some(Some(RDKafkaErrorCode::LeaderNotAvailable))), KafkaState::Usable);
        let m = Metrics::new(["r"], 1);
        for (state, spool) in [
            (KafkaState::Unknown, false),
            (KafkaState::Usable, false),
            (KafkaState::Unreachable, true),
            (KafkaState::TopicMissing, true),
        ] {
            m.set_kafka_state(state);
            assert_eq!(m.kafka_state(), state);
            assert_eq!(state.spool_directly(), spool, "{state:?}");
        }
    }
}
