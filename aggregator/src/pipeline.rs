//! The aggregator loop: read `api-calls`, track which minutes changed, and when a minute
//! closes, wait for ingest to have its events, recompute its rows from the raw table, write
//! them, and only then let its offsets be committed.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tollgate_common::backoff::Backoff;
use tollgate_schemas::Decoder;

use crate::config::{Config, KafkaConfig};
use crate::metrics::Metrics;
use crate::progress::IngestProgress;
use crate::quota::{self, Quotas};
use crate::store;
use crate::tracker::{Arrival, Tracker};

/// While events flow, closed minutes are looked for this often.
const CLOSE_CHECK_EVERY: Duration = Duration::from_millis(200);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The group consumer (static membership). Offsets are stored by the loop once the minutes
/// before them are written, and committed by librdkafka every second and at shutdown.
fn consumer(cfg: &KafkaConfig) -> Result<StreamConsumer, rdkafka::error::KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("group.instance.id", &cfg.instance_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", cfg.commit_interval.as_millis().to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", "10000");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create()?;
    consumer.subscribe(&[&cfg.topic])?;
    Ok(consumer)
}

/// Runs until `shutdown` completes; then commits what is written and returns.
pub async fn run(cfg: Config, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let work = Aggregator::start(cfg, metrics, stop_rx);
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        () = shutdown => {
            let _ = stop_tx.send(true);
            work.await
        }
    }
}

struct Aggregator {
    cfg: Config,
    metrics: Arc<Metrics>,
    consumer: Arc<StreamConsumer>,
    client: clickhouse::Client,
    progress: IngestProgress,
    tracker: Tracker,
    quotas: Quotas,
    stop: watch::Receiver<bool>,
}

impl Aggregator {
    async fn start(cfg: Config, metrics: Arc<Metrics>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        if cfg.clickhouse.migrate_on_start {
            let mut backoff = Backoff::new(cfg.initial_backoff, cfg.max_backoff);
            loop {
                match tollgate_schemas::store::prepare(&cfg.clickhouse).await {
                    Ok(()) => break,
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ClickHouse not ready for migrations");
                        if *stop.borrow() {
                            return Ok(());
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        let consumer = Arc::new(consumer(&cfg.kafka)?);
        let progress = IngestProgress::new(&cfg.kafka)?;
        let client = tollgate_schemas::store::client(&cfg.clickhouse);
        let w = &cfg.windows;
        let tracker = Tracker::new(i64::from(w.allowed_lateness_s), i64::from(w.max_clock_skew_s), w.idle_close.as_millis() as i64);
        tracing::info!(
            topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, ingest_group = %cfg.kafka.ingest_group_id,
            allowed_lateness_s = w.allowed_lateness_s, "aggregator started"
        );
        let quotas = Quotas::new(cfg.quota.clone(), &cfg.kafka.brokers, &cfg.kafka.properties)?;
        if quotas.enabled() {
            tracing::info!(topic = %cfg.quota.topic, plans = cfg.quota.plans.len(), "quota states enabled");
        }
        let mut agg = Aggregator { cfg, metrics, consumer, client, progress, tracker, quotas, stop };
        let result = agg.consume().await;
        agg.commit_final().await;
        result
    }

    async fn consume(&mut self) -> anyhow::Result<()> {
        let decoder = Decoder::new()?;
        let mut last_check = Instant::now();
        let idle_close = self.cfg.windows.idle_close;
        let mut stop = self.stop.clone();
        let consumer = Arc::clone(&self.consumer);
        loop {
            let idle = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                r = tokio::time::timeout(idle_close, consumer.recv()) => match r {
                    Err(_) => true,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        false
                    }
                    Ok(Ok(msg)) => {
                        self.observe(&decoder, msg.partition(), msg.offset(), msg.payload());
                        false
                    }
                },
            };
            if idle || last_check.elapsed() >= CLOSE_CHECK_EVERY {
                last_check = Instant::now();
                if !self.close_due().await {
                    return Ok(());
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

    /// Writes every closed minute, then stores the offsets they free. False when shutdown
    /// interrupted it (what was not written stays uncommitted and is read again next time).
    async fn close_due(&mut self) -> bool {
        if let Ok(tpl) = self.consumer.assignment() {
            let parts: Vec<i32> = tpl.elements_for_topic(&self.cfg.kafka.topic).iter().map(|e| e.partition()).collect();
            self.tracker.assigned(&parts, now_ms());
        }
        for minute in self.tracker.due(now_ms()) {
            let Some(pending) = self.tracker.take(minute) else { continue };
            match self.write_minute(minute, &pending).await {
                Some((rows, recomputed)) => {
                    self.metrics.minutes_written.fetch_add(1, Ordering::Relaxed);
                    self.metrics.minutes_recomputed.fetch_add(u64::from(recomputed), Ordering::Relaxed);
                    self.metrics.rows_written.fetch_add(rows as u64, Ordering::Relaxed);
                    tracing::debug!(minute, rows, consumers = pending.consumers.len(), events = pending.events, reopened = pending.reopened, "minute written");
                    self.quotas.touch(minute, pending.consumers.iter());
                }
                None => {
                    self.tracker.restore(minute, pending);
                    return false;
                }
            }
        }
        if !self.publish_quotas().await {
            return false;
        }
        self.metrics.open_minutes.store(self.tracker.open_minutes() as i64, Ordering::Relaxed);
        if let Some(c) = self.tracker.clock() {
            self.metrics.clock_seconds.store(c, Ordering::Relaxed);
        }
        self.store_offsets();
        true
    }

    /// Writes a closed minute: from its in-memory aggregates when the tracker saw it whole,
    /// else (a reopened minute, or consumers that an earlier run already wrote) by recomputing
    /// the changed consumers from `api_calls FINAL` once ingest has caught up with what was
    /// read. Retries until it works; `None` when shutdown interrupted it.
    async fn write_minute(&mut self, minute: i64, pending: &crate::tracker::Pending) -> Option<(usize, bool)> {
        let mut backoff = Backoff::new(self.cfg.initial_backoff, self.cfg.max_backoff);
        loop {
            let version = now_us();
            let recompute = if pending.reopened {
                Ok(pending.consumers.clone())
            } else {
                store::written_consumers(&self.client, minute, &pending.consumers).await
            };
            let result = match recompute {
                Err(e) => Err(e),
                Ok(recompute) => {
                    if !recompute.is_empty() {
                        // Everything read so far must be in the raw table first.
                        let positions: std::collections::BTreeMap<i32, i64> = pending
                            .last_offset
                            .keys()
                            .filter_map(|&p| self.tracker.position(p).map(|o| (p, o - 1)))
                            .collect();
                        if !self.wait_for_ingest(&positions).await {
                            return None;
                        }
                    }
                    let mut rows = store::rows_from_memory(minute, &pending.agg, |c| !recompute.contains(c), version);
                    async {
                        if !recompute.is_empty() {
                            rows.extend(store::recompute(&self.client, minute, &recompute, version).await?);
                        }
                        store::write(&self.client, &rows).await?;
                        Ok::<(usize, bool), clickhouse::error::Error>((rows.len(), !recompute.is_empty()))
                    }
                    .await
                }
            };
            match result {
                Ok(rows) => return Some(rows),
                Err(e) => {
                    self.metrics.clickhouse_errors.fetch_add(1, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, minute, retry_in_ms = delay.as_millis() as u64, "cannot write a minute");
                    if !self.sleep_unless_stopped(delay).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Publishes the quota states the written minutes changed, retrying until it works. The
    /// offsets are stored only afterwards, so a crash before publication recomputes them.
    async fn publish_quotas(&mut self) -> bool {
        let Some(clock) = self.tracker.clock() else { return true };
        let covered = quota::covered_until(clock, i64::from(self.cfg.windows.allowed_lateness_s));
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
                    if !self.sleep_unless_stopped(delay).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn wait_for_ingest(&mut self, last_offset: &std::collections::BTreeMap<i32, i64>) -> bool {
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
                tracing::warn!(group = self.progress.group(), waited_s = waited.as_secs(), "waiting for ingest to commit past a closed minute's events; is ingest running?");
                since = Some(Instant::now());
            }
            if !self.sleep_unless_stopped(backoff.next_delay()).await {
                return false;
            }
        }
        true
    }

    async fn sleep_unless_stopped(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.changed() => false,
            () = tokio::time::sleep(d) => true,
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

    async fn commit_final(&self) {
        self.store_offsets();
        let c = Arc::clone(&self.consumer);
        match tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await {
            Ok(Ok(())) => tracing::info!(open_minutes = self.tracker.open_minutes(), "offsets committed; open minutes are read again next start"),
            Ok(Err(e)) => tracing::info!(error = %e, "no final commit (nothing stored since the last one)"),
            Err(e) => tracing::warn!(error = %e, "final commit task failed"),
        }
    }
}
