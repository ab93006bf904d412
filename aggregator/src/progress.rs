//! Ingest's progress, read from its committed offsets. Ingest commits an offset only after
//! every event before it is in `api_calls` (contiguous high-water mark), so once ingest's
//! committed offset of a partition is past an event, a query of the raw table sees that event.
//! The aggregator waits for that before recomputing a minute from the raw table.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

pub struct IngestProgress {
    consumer: Arc<BaseConsumer>,
    topic: String,
    group: String,
    /// Per partition: ingest's last known committed offset (the next offset it will read).
    known: BTreeMap<i32, i64>,
}

impl IngestProgress {
    /// A client that only reads the committed offsets of ingest's group; it never joins it.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, rdkafka::error::KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.ingest_group_id)
            .set("enable.auto.commit", "false");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        Ok(Self {
            consumer: Arc::new(cc.create()?),
            topic: cfg.topic.clone(),
            group: cfg.ingest_group_id.clone(),
            known: BTreeMap::new(),
        })
    }

    /// Whether ingest has committed past `last_offset` in every listed partition, as last known.
    pub fn covers(&self, last_offset: &BTreeMap<i32, i64>) -> bool {
        last_offset.iter().all(|(p, &o)| self.known.get(p).is_some_and(|&c| c > o))
    }

    /// Reads ingest's committed offsets of `partitions` again.
    pub async fn refresh(&mut self, partitions: impl Iterator<Item = i32>) -> Result<(), rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        let consumer = Arc::clone(&self.consumer);
        let got = tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, Duration::from_secs(5)))
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)??;
        for e in got.elements() {
            if let Offset::Offset(o) = e.offset() {
                let k = self.known.entry(e.partition()).or_insert(o);
                *k = (*k).max(o);
            }
        }
        Ok(())
    }

    pub fn group(&self) -> &str {
        &self.group
    }
}
