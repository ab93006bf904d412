//! The ingest pipeline: a reader task cuts batches, a writer task inserts them in order and
//! only then stores their offsets. One batch can be in flight while the next fills.

use std::future::Future;
use std::sync::Arc;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio::sync::{mpsc, watch};
use tollgate_common::backoff::Backoff;
use tollgate_schemas::Decoder;

use crate::config::Config;
use crate::dlq::{self, Dlq};
use crate::sink;
use crate::source::{self, Batch, Decoded};

/// Runs until `shutdown` completes, then finishes the pending batch (within
/// `retry.shutdown_grace`), commits and returns.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
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
    let consumer = Arc::new(source::consumer(&cfg.kafka)?);
    let dlq = Dlq::new(&cfg.kafka)?;
    let decoder = Decoder::new()?;
    let client = sink::client(&cfg.clickhouse);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);

    tracing::info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group_id, database = %cfg.clickhouse.database, "ingest started");
    let writer = tokio::spawn(write_batches(cfg.clone(), client, Arc::clone(&consumer), batch_rx, stop_rx.clone()));
    let reader = read_batches(&cfg, &consumer, &dlq, &decoder, batch_tx, stop_rx);
    tokio::pin!(reader);
    tokio::select! {
        result = &mut reader => result?,
        () = shutdown => {
            let _ = stop_tx.send(true);
            reader.await?;
        }
    }
    let _ = stop_tx.send(true);
    writer.await??;
    let c = Arc::clone(&consumer);
    let commit = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await?;
    match commit {
        Ok(()) => tracing::info!("final offsets committed"),
        Err(e) => tracing::info!(error = %e, "no final commit (nothing stored since the last one)"),
    }
    Ok(())
}

async fn read_batches(
    cfg: &Config,
    consumer: &StreamConsumer,
    dlq: &Dlq,
    decoder: &Decoder,
    batch_tx: mpsc::Sender<Batch>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut batch = Batch::default();
    let max_rows = cfg.batch.max_rows.get();
    loop {
        let deadline = batch.started.map(|t| tokio::time::Instant::from_std(t + cfg.batch.max_wait));
        let flush = tokio::select! {
            biased;
            _ = stop.changed() => {
                // Hand over what was read; the writer decides whether it can still be written.
                if !batch.is_empty() {
                    let _ = batch_tx.send(std::mem::take(&mut batch)).await;
                }
                return Ok(());
            }
            () = sleep_until(deadline) => true,
            msg = consumer.recv() => {
                match msg {
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        false
                    }
                    Ok(msg) => {
                        let (partition, offset) = (msg.partition(), msg.offset());
                        match source::decode(decoder, &msg) {
                            Decoded::Row(row) => batch.rows.push(*row),
                            Decoded::Poison(error) => {
                                let src = dlq::Source { topic: msg.topic(), partition, offset };
                                if !dead_letter(cfg, dlq, &msg, &error, src, &mut stop).await {
                                    return Ok(());
                                }
                                batch.dead_lettered += 1;
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
                _ = stop.changed() => return Ok(()),
                sent = batch_tx.send(std::mem::take(&mut batch)) => {
                    if sent.is_err() {
                        anyhow::bail!("the ClickHouse writer stopped");
                    }
                }
            }
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
    consumer: Arc<StreamConsumer>,
    mut batches: mpsc::Receiver<Batch>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(cfg.retry.initial_backoff, cfg.retry.max_backoff);
    while let Some(batch) = batches.recv().await {
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let started = std::time::Instant::now();
        while !batch.rows.is_empty() {
            match sink::insert(&client, &batch.rows).await {
                Ok(()) => {
                    backoff.reset();
                    break;
                }
                Err(e) => {
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
