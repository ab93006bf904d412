//! The Kafka producer task: drains the event queue, encodes Avro single-object messages and
//! hands them to librdkafka (acks=all, idempotent). librdkafka's own queue absorbs short
//! broker outages (`message.timeout.ms`, default here 5 minutes); when it is full the task
//! waits, so back-pressure lands on the bounded event queue, never on requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tollgate_schemas::{ApiCall, Encoder};

use crate::config::KafkaConfig;
use crate::metrics::Metrics;

/// Counts delivery reports (runs on librdkafka's polling thread).
pub struct DeliveryCounter {
    metrics: Arc<Metrics>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.metrics.events_produced.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, msg)) => {
                self.metrics.events_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, partition = msg.partition(), "event delivery failed");
            }
        }
    }
}

/// The running producer task.
pub struct ProducerTask {
    task: JoinHandle<()>,
    close: oneshot::Sender<()>,
}

impl ProducerTask {
    /// Stops taking new events (senders still alive, e.g. in connections that outlived the
    /// shutdown grace, see their events dropped and counted), produces what is queued,
    /// flushes librdkafka and waits for the task.
    pub async fn close(self) -> Result<(), tokio::task::JoinError> {
        let _ = self.close.send(());
        self.task.await
    }
}

/// Starts the producer task. Returns the queue's sender and the task; the task ends, after
/// flushing librdkafka, when every sender is dropped or [`ProducerTask::close`] is called.
pub fn start(
    cfg: &KafkaConfig,
    metrics: Arc<Metrics>,
    flush_timeout: Duration,
) -> Result<(mpsc::Sender<ApiCall>, ProducerTask), KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    let producer: ThreadedProducer<DeliveryCounter> =
        cc.create_with_context(DeliveryCounter { metrics: Arc::clone(&metrics) })?;
    let encoder = Encoder::new().map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    let (tx, rx) = mpsc::channel(cfg.queue_capacity);
    let topic = cfg.topic.clone();
    let (close, close_rx) = oneshot::channel();
    let task = tokio::spawn(run(producer, encoder, topic, rx, close_rx, metrics, flush_timeout));
    Ok((tx, ProducerTask { task, close }))
}

async fn run(
    producer: ThreadedProducer<DeliveryCounter>,
    encoder: Encoder,
    topic: String,
    mut rx: mpsc::Receiver<ApiCall>,
    mut close: oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
    flush_timeout: Duration,
) {
    let mut buf = Vec::with_capacity(512);
    loop {
        let call = tokio::select! {
            biased;
            // After close, recv() still yields what is queued, then None.
            _ = &mut close, if !close.is_terminated() => {
                rx.close();
                continue;
            }
            call = rx.recv() => match call {
                Some(call) => call,
                None => break,
            },
        };
        metrics.events_queued_now.store(rx.len() as u64, Ordering::Relaxed);
        buf.clear();
        if let Err(e) = encoder.encode_into(&call, &mut buf) {
            metrics.events_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot encode event");
            continue;
        }
        let key = call.kafka_key();
        loop {
            let record = BaseRecord::to(&topic).key(key).payload(&buf);
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => {
                    metrics.events_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "cannot enqueue event");
                    break;
                }
            }
        }
    }
    let flushed = tokio::task::spawn_blocking(move || {
        let result = producer.flush(flush_timeout);
        (result, producer.in_flight_count())
    })
    .await;
    match flushed {
        Ok((Ok(()), _)) => tracing::info!("event producer flushed"),
        Ok((Err(e), left)) => tracing::error!(error = %e, in_flight = left, "event producer flush incomplete"),
        Err(e) => tracing::error!(error = %e, "event producer flush task failed"),
    }
}
