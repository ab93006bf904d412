//! The consumer-group client every pipeline stage uses.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};

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
}

/// A subscribed group consumer whose offsets are *stored by the stage* once what precedes
/// them is durably written (`enable.auto.offset.store=false`) and committed by librdkafka in
/// the background every `commit_interval`, and by the stage at shutdown.
pub fn group_consumer(m: &GroupMember<'_>) -> Result<StreamConsumer, rdkafka::error::KafkaError> {
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
        .set("session.timeout.ms", "10000");
    for (k, v) in m.properties {
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create()?;
    consumer.subscribe(&[m.topic])?;
    Ok(consumer)
}
