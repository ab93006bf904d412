//! The Kafka side: the consumer, and turning messages into a [`Batch`] of rows.

use std::collections::BTreeMap;
use std::time::Instant;

use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tollgate_common::kafka::GroupConsumer;
use tollgate_schemas::Decoder;

use crate::config::KafkaConfig;
use crate::sink::RawRow;

/// Creates the group consumer (static membership, see [`KafkaConfig::instance_id`]) and
/// subscribes it. Offsets are stored by the pipeline after a
/// batch is written (`enable.auto.offset.store=false`) and committed by librdkafka's
/// background auto-commit, and synchronously at shutdown.
pub fn consumer(
    cfg: &KafkaConfig,
    assigned: &std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> Result<GroupConsumer, rdkafka::error::KafkaError> {
    tollgate_common::kafka::group_consumer(&tollgate_common::kafka::GroupMember {
        brokers: &cfg.brokers,
        topic: &cfg.topic,
        group_id: &cfg.group_id,
        instance_id: &cfg.instance_id,
        commit_interval: std::time::Duration::from_secs(1),
        properties: &cfg.properties,
        assigned,
    })
}

/// Rows read since the last flush, and the offsets to commit once they are written.
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<RawRow>,
    /// Per partition: the offset after the last message of this batch (what Kafka commits).
    pub next_offsets: BTreeMap<i32, i64>,
    /// Messages of this batch that went to the DLQ.
    pub dead_lettered: u64,
    /// When the first message of this batch was read.
    pub started: Option<Instant>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.next_offsets.is_empty()
    }

    /// Records that the message at (partition, offset) is handled by this batch.
    pub fn track(&mut self, partition: i32, offset: i64) {
        self.started.get_or_insert_with(Instant::now);
        let next = self.next_offsets.entry(partition).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// The offsets to store for `topic`.
    pub fn offsets(&self, topic: &str) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for (&partition, &next) in &self.next_offsets {
            tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
        }
        Ok(tpl)
    }
}

/// What to do with one message.
#[derive(Debug)]
pub enum Decoded {
    Row(Box<RawRow>),
    /// Not a valid ApiCall: send to the DLQ with this error.
    Poison(String),
}

/// Decodes a message into a row, or says why it is poison.
pub fn decode(decoder: &Decoder, msg: &BorrowedMessage<'_>) -> Decoded {
    let Some(payload) = msg.payload() else {
        return Decoded::Poison("empty payload".to_owned());
    };
    match decoder.decode(payload) {
        Err(e) => Decoded::Poison(e.to_string()),
        Ok(event) => match RawRow::from_event(event) {
            Ok(row) => Decoded::Row(Box::new(row)),
            Err(e) => Decoded::Poison(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_tracks_the_next_offset_per_partition() {
        let mut b = Batch::default();
        assert!(b.is_empty());
        b.track(0, 5);
        b.track(0, 6);
        b.track(2, 10);
        assert_eq!(b.next_offsets, BTreeMap::from([(0, 7), (2, 11)]));
    }
}
