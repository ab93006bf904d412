//! The ingest pipeline: a reader task cuts batches, a writer task inserts them in order and
//! only then stores their offsets. One batch can be in flight while the next fills.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use tokio::sync::{mpsc, watch};
use tollgate_common::backoff::Backoff;
use tollgate_common::kafka::{GroupConsumer, StallWatch, Stalled};
use tollgate_schemas::Decoder;

use crate::config::Config;
use crate::dlq::{self, Dlq};
use crate::metrics::Metrics;
use crate::sink;
use crate::source::{self, Batch, Decoded};

/// Runs until `shutdown` completes, then finishes the pending batch (within
/// `retry.shutdown_grace`), commits and returns. Counts what it does in `metrics`.
pub async fn run(cfg: Config, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    if cfg.clickhouse.migrate_on_start {
        let mut backoff = Backoff::new(cfg.retry.initial_backoff, cfg.retry.max_backoff);
        loop {
            match sink::prepare(&cfg.clickhouse).await {
                Ok(()) => break,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ClickHouse not ready for migrations");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    let dlq = Dlq::new(&cfg.kafka)?;
    let decoder = Decoder::new()?;
    let client = sink::client(&cfg.clickhouse);
    let (stop_tx, stop_rx) = watch::channel(false);
    tracing::info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, database = %cfg.clickhouse.database, "ingest started");
    let mut first = true;
    let sessions = tollgate_common::kafka::restart_while_stalled(cfg.kafka.stall_timeout, |stall_timeout| {
        if !std::mem::take(&mut first) {
            metrics.consumer_restarts.fetch_add(1, Ordering::Relaxed);
        }
        let io = Io { cfg: &cfg, client: &client, dlq: &dlq, decoder: &decoder, metrics: &metrics };
        session(io, stall_timeout, stop_rx.clone())
    });
    tokio::pin!(sessions);
    tokio::select! {
        result = &mut sessions => result,
        () = shutdown => {
            let _ = stop_tx.send(true);
            sessions.await
        }
    }
}

/// What every consumer's life works with.
#[derive(Clone, Copy)]
struct Io<'a> {
    cfg: &'a Config,
    client: &'a clickhouse::Client,
    dlq: &'a Dlq,
    decoder: &'a Decoder,
    metrics: &'a Arc<Metrics>,
}

/// One consumer's life: a reader cutting batches and a writer inserting them, until shutdown
/// (`None`) or a stall; then the pending batch is written (or left for redelivery at shutdown)
/// and the stored offsets are committed.
async fn session(
    io: Io<'_>,
    stall_timeout: Option<Duration>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<Option<Stalled>> {
    let consumer = Arc::new(source::consumer(&io.cfg.kafka, &io.metrics.partitions_assigned)?);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let writer = tokio::spawn(write_batches(
        io.cfg.clone(),
        io.client.clone(),
        Arc::clone(&consumer),
        batch_rx,
        stop_rx.clone(),
        Arc::clone(io.metrics),
    ));
    // The reader hands its last batch over and drops the sender: the writer then ends.
    let ended = read_batches(io, &consumer, batch_tx, stall_timeout, stop_rx).await;
    writer.await??;
    let ended = ended?;
    let c = Arc::clone(&consumer);
    let commit = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await?;
    match commit {
        Ok(()) => tracing::info!("offsets committed"),
        Err(e) => tracing::info!(error = %e, "no final commit (nothing stored since the last one)"),
    }
    tollgate_common::kafka::close(consumer).await;
    Ok(ended)
}

async fn read_batches(
    io: Io<'_>,
    consumer: &Arc<GroupConsumer>,
    batch_tx: mpsc::Sender<Batch>,
    stall_timeout: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<Stalled>> {
    let Io { cfg, dlq, decoder, metrics, .. } = io;
    let mut batch = Batch::default();
    let max_rows = cfg.batch.max_rows.get();
    // The watchdog: when nothing has arrived for `stall_timeout`, ask the broker whether there
    // is something to read.
    let mut read_any = false;
    let mut watchdog = StallWatch::new(&cfg.kafka.topic, stall_timeout);
    let mut check = tokio::time::interval(watchdog.period());
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled: Option<String> = None;
    loop {
        let deadline = batch.started.map(|t| tokio::time::Instant::from_std(t + cfg.batch.max_wait));
        let flush = tokio::select! {
            biased;
            _ = stop.changed() => {
                // Hand over what was read; the writer decides whether it can still be written.
                if !batch.is_empty() {
                    let _ = batch_tx.send(std::mem::take(&mut batch)).await;
                }
                return Ok(None);
            }
            () = sleep_until(deadline) => true,
            _ = check.tick() => {
                stalled = watchdog.check(consumer).await;
                stalled.is_some()
            }
            msg = consumer.recv() => {
                match msg {
                    Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code)) => {
                        stalled = Some(format!("fatal consumer error: {code}"));
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        false
                    }
                    Ok(msg) => {
                        watchdog.progressed();
                        read_any = true;
                        metrics.messages.fetch_add(1, Ordering::Relaxed);
                        let (partition, offset) = (msg.partition(), msg.offset());
                        match source::decode(decoder, &msg) {
                            Decoded::Row(row) => {
                                batch.rows.push(*row);
                                metrics.pending_rows.fetch_add(1, Ordering::Relaxed);
                            }
                            Decoded::Poison(error) => {
                                let src = dlq::Source { topic: msg.topic(), partition, offset };
                                if !dead_letter(cfg, dlq, &msg, &error, src, &mut stop).await {
                                    return Ok(None);
                                }
                                batch.dead_lettered += 1;
                                metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        batch.track(partition, offset);
                        batch.rows.len() >= max_rows
                    }
                }
            }
        };
        if flush && !batch.is_empty() {
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(None),
                sent = batch_tx.send(std::mem::take(&mut batch)) => {
                    if sent.is_err() {
                        anyhow::bail!("the ClickHouse writer stopped");
                    }
                }
            }
            // Waiting for the writer (ClickHouse down) is not a stall.
            watchdog.progressed();
        }
        if let Some(why) = stalled.take() {
            return Ok(Some(Stalled { why, read_any }));
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends a poison message to the DLQ, retrying until it is acknowledged. Returns false when
/// shutdown interrupted it (the message was not handled and will be read again).
async fn dead_letter(
    cfg: &Config,
    dlq: &Dlq,
    msg: &rdkafka::message::BorrowedMessage<'_>,
    error: &str,
    src: dlq::Source<'_>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tracing::warn!(partition = src.partition, offset = src.offset, error, "undecodable message, sending to DLQ");
    let mut backoff = Backoff::new(cfg.retry.initial_backoff, cfg.retry.max_backoff);
    loop {
        match dlq.send(msg.key(), msg.payload(), error, src).await {
            Ok(()) => return true,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "DLQ produce failed");
                tokio::select! {
                    _ = stop.changed() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn write_batches(
    cfg: Config,
    client: clickhouse::Client,
    consumer: Arc<GroupConsumer>,
    mut batches: mpsc::Receiver<Batch>,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(cfg.retry.initial_backoff, cfg.retry.max_backoff);
    while let Some(batch) = batches.recv().await {
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let started = std::time::Instant::now();
        while !batch.rows.is_empty() {
            match sink::insert(&client, &batch.rows).await {
                Ok(()) => {
                    backoff.reset();
                    let rows = batch.rows.len() as u64;
                    metrics.rows_written.fetch_add(rows, Ordering::Relaxed);
                    metrics.batches_written.fetch_add(1, Ordering::Relaxed);
                    metrics.pending_rows.fetch_sub(rows as i64, Ordering::Relaxed);
                    metrics.last_write_seconds.store(unix_now(), Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    metrics.insert_failures.fetch_add(1, Ordering::Relaxed);
                    if *stop.borrow() {
                        let deadline = *stop_deadline
                            .get_or_insert_with(|| tokio::time::Instant::now() + cfg.retry.shutdown_grace);
                        if tokio::time::Instant::now() >= deadline {
                            tracing::error!(
                                rows = batch.rows.len(),
                                "shutdown grace over; batch left uncommitted, it will be redelivered"
                            );
                            return Ok(());
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, rows = batch.rows.len(), retry_in_ms = delay.as_millis() as u64, "ClickHouse insert failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        let tpl = batch.offsets(&cfg.kafka.topic)?;
        if let Err(e) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: its new owner re-reads from the last commit,
            // and the duplicates collapse on event_id.
            tracing::warn!(error = %e, "cannot store offsets (partition revoked?)");
        }
        tracing::debug!(
            rows = batch.rows.len(),
            dead_lettered = batch.dead_lettered,
            insert_ms = started.elapsed().as_millis() as u64,
            "batch written"
        );
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
