//! The aggregator: a reader loop and a writer task.
//!
//! The **reader** reads `api-calls`, feeds the [`Tracker`] (event time, in-memory aggregates of
//! open minutes) and hands every closed minute to the writer; it stores offsets for commit
//! as the writer reports minutes written, so a committed offset never passes an event whose
//! minute is not written. It also publishes quota states for the minutes written.
//!
//! The **writer** writes closed minutes in order, batching what is queued into one INSERT: a
//! minute the tracker saw whole is written from memory; a reopened minute (late events), or
//! consumers an earlier run already wrote for that minute, are recomputed from
//! `api_calls FINAL` once ingest has committed past everything read so far. It retries while
//! ClickHouse fails (the reader stops when the queue is full: bounded memory, nothing lost).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tollgate_common::backoff::Backoff;
use tollgate_common::kafka::GroupConsumer;
use tollgate_common::kafka::{StallWatch, Stalled};
use tollgate_schemas::Decoder;

use crate::config::{Config, KafkaConfig};
use crate::metrics::Metrics;
use crate::progress::IngestProgress;
use crate::quota::{self, Quotas};
use crate::store::{self, UsageRow};
use crate::tracker::{Arrival, Pending, Tracker};

/// While events flow, closed minutes are looked for this often.
const CLOSE_CHECK_EVERY: Duration = Duration::from_millis(200);
/// Closed minutes queued for the writer at most (then the reader waits).
const QUEUE: usize = 64;
/// Minutes written in one INSERT at most.
const BATCH: usize = 16;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The group consumer (static membership). Offsets are stored by the reader once the minutes
/// before them are written, and committed by librdkafka every `kafka.commit_interval_ms` and
/// at shutdown.
fn consumer(
    cfg: &KafkaConfig,
    assigned: &Arc<std::sync::atomic::AtomicI64>,
) -> Result<GroupConsumer, rdkafka::error::KafkaError> {
    tollgate_common::kafka::group_consumer(&tollgate_common::kafka::GroupMember {
        brokers: &cfg.brokers,
        topic: &cfg.topic,
        group_id: &cfg.group_id,
        instance_id: &cfg.instance_id,
        commit_interval: cfg.commit_interval,
        properties: &cfg.properties,
        assigned,
    })
}

/// A closed minute for the writer.
struct Job {
    id: u64,
    minute: i64,
    pending: Pending,
    /// The reader's position in the minute's partitions when it closed: before recomputing
    /// from the raw table, ingest must have committed up to there.
    positions: BTreeMap<i32, i64>,
}

/// A minute the writer wrote.
struct Done {
    id: u64,
    minute: i64,
    consumers: BTreeSet<String>,
}

/// Runs until `shutdown` completes; then commits what is written and returns.
pub async fn run(cfg: Config, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    // The SLO evaluator lives across restarts of the reader; the reader tells it the end of
    // the last closed minute while it reads partition 0.
    let (slo_tx, slo_rx) = watch::channel(None);
    let slo_task = cfg.slo.enabled().then(|| {
        tokio::spawn(crate::slo::run(
            Arc::clone(&cfg.slo),
            tollgate_schemas::store::client(&cfg.clickhouse),
            Arc::clone(&metrics),
            slo_rx,
            stop_rx.clone(),
            (cfg.initial_backoff, cfg.max_backoff),
        ))
    });
    let slo_tx = slo_task.is_some().then_some(slo_tx);
    // A stalled consumer (see `kafka.stall_timeout_ms`) ends the run as a shutdown would
    // (written minutes committed, open ones read again) and a new run starts.
    let work = tollgate_common::kafka::restart_while_stalled(cfg.kafka.stall_timeout, |stall_timeout| {
        start(cfg.clone(), Arc::clone(&metrics), stall_timeout, stop_rx.clone(), slo_tx.clone())
    });
    tokio::pin!(work);
    let result = tokio::select! {
        r = &mut work => r,
        () = shutdown => {
            let _ = stop_tx.send(true);
            work.await
        }
    };
    let _ = stop_tx.send(true);
    if let Some(task) = slo_task
        && let Err(e) = task.await
    {
        tracing::error!(error = %e, "SLO task failed");
    }
    result
}

async fn start(
    cfg: Config,
    metrics: Arc<Metrics>,
    stall_timeout: Option<Duration>,
    stop: watch::Receiver<bool>,
    slo: Option<watch::Sender<Option<i64>>>,
) -> anyhow::Result<Option<Stalled>> {
    if cfg.clickhouse.migrate_on_start {
        let mut backoff = Backoff::new(cfg.initial_backoff, cfg.max_backoff);
        loop {
            match tollgate_schemas::store::prepare(&cfg.clickhouse).await {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ClickHouse not ready for migrations");
                    if *stop.borrow() {
                        return Ok(None);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    let consumer = Arc::new(consumer(&cfg.kafka, &metrics.partitions_assigned)?);
    let client = tollgate_schemas::store::client(&cfg.clickhouse);
    let w = &cfg.windows;
    let tracker =
        Tracker::new(i64::from(w.allowed_lateness_s), i64::from(w.max_clock_skew_s), w.idle_close.as_millis() as i64);
    let quotas = Quotas::new(cfg.quota.clone(), &cfg.kafka.brokers, &cfg.kafka.properties)?;
    tracing::info!(
        topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, ingest_group = %cfg.kafka.ingest_group_id,
        allowed_lateness_s = w.allowed_lateness_s, quota_plans = cfg.quota.plans.len(), "aggregator started"
    );
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(QUEUE);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let writer = Writer {
        cfg: cfg.clone(),
        metrics: Arc::clone(&metrics),
        client: client.clone(),
        progress: IngestProgress::new(&cfg.kafka)?,
        stop: stop.clone(),
    };
    let writer_task = tokio::spawn(writer.run(jobs_rx, done_tx));
    let mut reader =
        Reader { cfg, metrics, consumer, client, tracker, quotas, stop, jobs: Some(jobs_tx), done: done_rx, slo };
    let result = reader.consume(stall_timeout).await;
    // Let the writer finish what it has (it gives up on shutdown if ClickHouse fails), then
    // commit what is written.
    reader.jobs = None;
    if let Err(e) = writer_task.await {
        tracing::error!(error = %e, "writer task failed");
    }
    reader.drain_done();
    // The quota states of the last minutes written: once, without waiting for Kafka. If that
    // fails, their offsets are not stored, so the next start writes and publishes them again.
    let published = reader.publish_quotas_once().await;
    reader.commit_final(published).await;
    let consumer = Arc::clone(&reader.consumer);
    drop(reader);
    tollgate_common::kafka::close(consumer).await;
    result
}

struct Reader {
    cfg: Config,
    metrics: Arc<Metrics>,
    consumer: Arc<GroupConsumer>,
    client: clickhouse::Client,
    tracker: Tracker,
    quotas: Quotas,
    stop: watch::Receiver<bool>,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::UnboundedReceiver<Done>,
    /// The end of the last closed minute, for the SLO evaluator (`None` when this instance
    /// does not read partition 0).
    slo: Option<watch::Sender<Option<i64>>>,
}

impl Reader {
    /// Reads until shutdown (`None`) or until the consumer stalls.
    async fn consume(&mut self, stall_timeout: Option<Duration>) -> anyhow::Result<Option<Stalled>> {
        let decoder = Decoder::new()?;
        let mut last_check = Instant::now();
        let mut stop = self.stop.clone();
        let consumer = Arc::clone(&self.consumer);
        let mut tick = tokio::time::interval(CLOSE_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = StallWatch::new(&self.cfg.kafka.topic, stall_timeout);
        let mut stall_check = tokio::time::interval(watchdog.period());
        stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_any = false;
        loop {
            let check = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(None),
                _ = tick.tick() => true,
                _ = stall_check.tick() => {
                    if let Some(why) = watchdog.check(&consumer).await {
                        return Ok(Some(Stalled { why, read_any }));
                    }
                    false
                }
                msg = consumer.recv() => {
                    match msg {
                        Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code)) => {
                            return Ok(Some(Stalled { why: format!("fatal consumer error: {code}"), read_any }));
                        }
                        Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
                        Ok(msg) => {
                            watchdog.progressed();
                            read_any = true;
                            self.observe(&decoder, msg.partition(), msg.offset(), msg.payload());
                        }
                    }
                    last_check.elapsed() >= CLOSE_CHECK_EVERY
                }
            };
            if check {
                last_check = Instant::now();
                if !self.close_due().await {
                    return Ok(None);
                }
                // Waiting for the writer (ClickHouse down, ingest behind) is not a stall.
                if last_check.elapsed() >= CLOSE_CHECK_EVERY {
                    watchdog.progressed();
                }
            }
        }
    }

    fn observe(&mut self, decoder: &Decoder, partition: i32, offset: i64, payload: Option<&[u8]>) {
        let event = payload.map(|p| decoder.summarize(p));
        // Same acceptance as ingest: what ingest dead-letters is not aggregated either.
        let Some(Ok(event)) = event else {
            self.metrics.skipped_messages.fetch_add(1, Ordering::Relaxed);
            self.tracker.mark_read(partition, offset);
            return;
        };
        let ts_s = event.start_time_us.div_euclid(1_000_000);
        if !(0..=i64::from(u32::MAX)).contains(&ts_s) {
            self.metrics.skipped_messages.fetch_add(1, Ordering::Relaxed);
            self.tracker.mark_read(partition, offset);
            return;
        }
        self.metrics.events.fetch_add(1, Ordering::Relaxed);
        let consumer = event.consumer_id.as_deref().unwrap_or("");
        self.quotas.observe(consumer, ts_s, event.plan_id.as_deref());
        if self.tracker.observe(partition, offset, &event, now_ms()) == Arrival::Late {
            self.metrics.late_events.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(partition, offset, ts_s, consumer, "late event: its minute is rewritten");
        }
    }

    /// Hands every closed minute to the writer, takes note of what it wrote, publishes the
    /// quota states that changed and stores the offsets that are now safe. False when
    /// shutdown interrupted it.
    async fn close_due(&mut self) -> bool {
        let mut reads_partition_0 = false;
        if let Ok(tpl) = self.consumer.assignment() {
            let parts: Vec<i32> = tpl.elements_for_topic(&self.cfg.kafka.topic).iter().map(|e| e.partition()).collect();
            reads_partition_0 = parts.contains(&0);
            self.tracker.assigned(&parts, now_ms());
        }
        for minute in self.tracker.due(now_ms()) {
            let Some((id, pending)) = self.tracker.take(minute) else { continue };
            let positions =
                pending.last_offset.keys().filter_map(|&p| self.tracker.position(p).map(|o| (p, o - 1))).collect();
            let Some(jobs) = &self.jobs else { return false };
            let mut stop = self.stop.clone();
            tokio::select! {
                biased;
                _ = stop.changed() => return false,
                sent = jobs.send(Job { id, minute, pending, positions }) => {
                    if sent.is_err() {
                        return false; // the writer stopped (shutdown)
                    }
                }
            }
        }
        if self.drain_done() > 0 && !self.publish_quotas().await {
            return false;
        }
        self.metrics.open_minutes.store(self.tracker.open_minutes() as i64, Ordering::Relaxed);
        if let Some(c) = self.tracker.clock() {
            self.metrics.clock_seconds.store(c, Ordering::Relaxed);
        }
        self.store_offsets();
        if let Some(slo) = &self.slo {
            let end = if reads_partition_0 { self.slo_end() } else { None };
            slo.send_if_modified(|v| {
                let changed = *v != end;
                *v = end;
                changed
            });
        }
        true
    }

    /// Where the SLO windows end: the end of the last closed and written minute; in a quiet
    /// period (nothing read, nothing open) the wall clock moves it on, as it would close
    /// minutes, so an alert resolves when the calls stop.
    fn slo_end(&self) -> Option<i64> {
        let covered = self.covered();
        let now = now_ms();
        if !self.tracker.quiet(now) {
            return covered;
        }
        let wall = quota::covered_until(now / 1000, i64::from(self.cfg.windows.allowed_lateness_s));
        Some(covered.map_or(wall, |c| c.max(wall)))
    }

    /// The end of the last minute that is closed and written (quota states are computed up
    /// to it).
    fn covered(&self) -> Option<i64> {
        let clock = self.tracker.clock()?;
        let covered = quota::covered_until(clock, i64::from(self.cfg.windows.allowed_lateness_s));
        // Minutes still with the writer are not covered yet.
        Some(self.tracker.oldest_in_flight().map_or(covered, |m| covered.min(m)))
    }

    /// Takes note of the minutes written; returns how many.
    fn drain_done(&mut self) -> usize {
        let mut n = 0;
        while let Ok(d) = self.done.try_recv() {
            self.tracker.finished(d.id);
            self.quotas.touch(d.minute, d.consumers.iter());
            n += 1;
        }
        n
    }

    /// Publishes the quota states the written minutes changed, retrying until it works. The
    /// offsets are stored only afterwards, so a crash before publication recomputes them.
    async fn publish_quotas(&mut self) -> bool {
        let Some(covered) = self.covered() else { return true };
        let mut backoff = Backoff::new(self.cfg.initial_backoff, self.cfg.max_backoff);
        loop {
            match self.quotas.publish(&self.client, covered, now_us() as i64).await {
                Ok(n) => {
                    self.metrics.quota_states.fetch_add(n as u64, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot publish quota states");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = stop.changed() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn publish_quotas_once(&mut self) -> bool {
        let Some(covered) = self.covered() else { return true };
        match self.quotas.publish(&self.client, covered, now_us() as i64).await {
            Ok(n) => {
                self.metrics.quota_states.fetch_add(n as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the last quota states; their minutes are read again next start");
                false
            }
        }
    }

    fn offsets(&self) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in self.tracker.commit_offsets() {
            tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(o)).ok()?;
        }
        (tpl.count() > 0).then_some(tpl)
    }

    fn store_offsets(&self) {
        if let Some(tpl) = self.offsets()
            && let Err(e) = self.consumer.store_offsets(&tpl)
        {
            tracing::debug!(error = %e, "cannot store offsets (partition revoked?)");
        }
    }

    async fn commit_final(&self, store: bool) {
        if store {
            self.store_offsets();
        }
        let c = Arc::clone(&self.consumer);
        match tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await {
            Ok(Ok(())) => tracing::info!(
                open_minutes = self.tracker.open_minutes() + self.tracker.in_flight(),
                "offsets committed; unwritten minutes are read again next start"
            ),
            Ok(Err(e)) => tracing::info!(error = %e, "no final commit (nothing stored since the last one)"),
            Err(e) => tracing::warn!(error = %e, "final commit task failed"),
        }
    }
}

struct Writer {
    cfg: Config,
    metrics: Arc<Metrics>,
    client: clickhouse::Client,
    progress: IngestProgress,
    stop: watch::Receiver<bool>,
}

impl Writer {
    /// Writes jobs in order until the reader closes the queue (or shutdown interrupts a
    /// failing write).
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, done: mpsc::UnboundedSender<Done>) {
        let mut batch = Vec::with_capacity(BATCH);
        while jobs.recv_many(&mut batch, BATCH).await > 0 {
            let Some(written) = self.write(&batch).await else { return };
            self.metrics.minutes_written.fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.metrics.minutes_recomputed.fetch_add(written.recomputed, Ordering::Relaxed);
            self.metrics.rows_written.fetch_add(written.rows as u64, Ordering::Relaxed);
            for job in batch.drain(..) {
                tracing::debug!(
                    minute = job.minute,
                    events = job.pending.events,
                    reopened = job.pending.reopened,
                    "minute written"
                );
                let _ = done.send(Done { id: job.id, minute: job.minute, consumers: job.pending.consumers });
            }
        }
    }

    /// Writes a batch of minutes as one INSERT, retrying until it works; `None` when shutdown
    /// interrupted it (the minutes stay uncommitted and are read again next start).
    async fn write(&mut self, batch: &[Job]) -> Option<Written> {
        let mut backoff = Backoff::new(self.cfg.initial_backoff, self.cfg.max_backoff);
        loop {
            match self.try_write(batch).await {
                Ok(Some(w)) => return Some(w),
                Ok(None) => return None,
                Err(e) => {
                    self.metrics.clickhouse_errors.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, minutes = batch.len(), retry_in_ms = delay.as_millis() as u64, "cannot write minutes");
                    if !self.sleep_unless_stopped(delay).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn try_write(&mut self, batch: &[Job]) -> Result<Option<Written>, clickhouse::error::Error> {
        let version = now_us();
        let mut rows: Vec<UsageRow> = Vec::new();
        let mut recomputed = 0;
        for job in batch {
            let p = &job.pending;
            let recompute = if p.reopened {
                p.consumers.clone()
            } else {
                store::written_consumers(&self.client, job.minute, &p.consumers).await?
            };
            rows.extend(store::rows_from_memory(job.minute, &p.agg, |c| !recompute.contains(c), version));
            if !recompute.is_empty() {
                // Everything read so far must be in the raw table first.
                if !self.wait_for_ingest(&job.positions).await {
                    return Ok(None);
                }
                rows.extend(store::recompute(&self.client, job.minute, &recompute, version).await?);
                recomputed += 1;
            }
        }
        store::write(&self.client, &rows).await?;
        Ok(Some(Written { rows: rows.len(), recomputed }))
    }

    async fn wait_for_ingest(&mut self, last_offset: &BTreeMap<i32, i64>) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(1000));
        let mut since: Option<Instant> = None;
        while !self.progress.covers(last_offset) {
            if since.is_none() {
                self.metrics.ingest_waits.fetch_add(1, Ordering::Relaxed);
            }
            let waited = since.get_or_insert_with(Instant::now).elapsed();
            if let Err(e) = self.progress.refresh(last_offset.keys().copied()).await {
                tracing::warn!(error = %e, "cannot read ingest's committed offsets");
            }
            if self.progress.covers(last_offset) {
                break;
            }
            if waited > Duration::from_secs(10) {
                tracing::warn!(
                    group = self.progress.group(),
                    waited_s = waited.as_secs(),
                    "waiting for ingest to commit past what was read; is ingest running?"
                );
                since = Some(Instant::now());
            }
            if !self.sleep_unless_stopped(backoff.next_delay()).await {
                return false;
            }
        }
        true
    }

    async fn sleep_unless_stopped(&mut self, d: Duration) -> bool {
        if *self.stop.borrow() {
            return false;
        }
        tokio::select! {
            _ = self.stop.changed() => false,
            () = tokio::time::sleep(d) => true,
        }
    }
}

struct Written {
    rows: usize,
    recomputed: u64,
}
