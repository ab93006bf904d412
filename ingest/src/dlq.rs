//! The dead-letter queue: undecodable messages go to `api-calls.dlq` with the error.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;

/// Headers set on every DLQ message.
pub mod headers {
    pub const ERROR: &str = "tollgate-error";
    pub const SOURCE_TOPIC: &str = "tollgate-source-topic";
    pub const SOURCE_PARTITION: &str = "tollgate-source-partition";
    pub const SOURCE_OFFSET: &str = "tollgate-source-offset";
}

/// Producer for the DLQ (acks=all, idempotent).
pub struct Dlq {
    producer: FutureProducer,
    topic: String,
}

/// Where a poison message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

impl Dlq {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, rdkafka::error::KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        Ok(Self { producer: cc.create()?, topic: cfg.dlq_topic.clone() })
    }

    /// Sends one message and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        error: &str,
        source: Source<'_>,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let partition = source.partition.to_string();
        let offset = source.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: headers::ERROR, value: Some(error) })
            .insert(Header { key: headers::SOURCE_TOPIC, value: Some(source.topic) })
            .insert(Header { key: headers::SOURCE_PARTITION, value: Some(&partition) })
            .insert(Header { key: headers::SOURCE_OFFSET, value: Some(&offset) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}
