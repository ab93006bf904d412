//! Counters and gauges of ingest, rendered for Prometheus on the admin port (`admin.listen`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Messages read from the topic (redeliveries included).
    pub messages: AtomicU64,
    /// Rows inserted into `api_calls` (redeliveries included; they collapse on `event_id`).
    pub rows_written: AtomicU64,
    pub batches_written: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Failed inserts (each retried with backoff).
    pub insert_failures: AtomicU64,
    /// Consumers rebuilt by the stall watchdog.
    pub consumer_restarts: AtomicU64,
    /// Rows read and not yet inserted.
    pub pending_rows: AtomicI64,
    /// When the last insert succeeded (Unix seconds; 0: none yet).
    pub last_write_seconds: AtomicI64,
    /// Partitions this replica holds now.
    pub partitions_assigned: Arc<AtomicI64>,
}

impl tollgate_common::admin::Render for Metrics {
    fn render(&self) -> String {
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed).to_string();
        let g = |v: &AtomicI64| v.load(Ordering::Relaxed).to_string();
        let mut out = String::new();
        tollgate_common::admin::write_family(
            &mut out,
            "counter",
            &[
                (
                    "tollgate_ingest_messages_total",
                    "Messages read from the events topic (redeliveries included).",
                    c(&self.messages),
                ),
                (
                    "tollgate_ingest_rows_written_total",
                    "Rows inserted into api_calls (redeliveries included; they collapse on event_id).",
                    c(&self.rows_written),
                ),
                ("tollgate_ingest_batches_written_total", "Batches inserted into api_calls.", c(&self.batches_written)),
                (
                    "tollgate_ingest_dead_lettered_total",
                    "Undecodable messages sent to the DLQ topic.",
                    c(&self.dead_lettered),
                ),
                (
                    "tollgate_ingest_insert_failures_total",
                    "Failed ClickHouse inserts (retried with backoff; the reader waits meanwhile).",
                    c(&self.insert_failures),
                ),
                (
                    "tollgate_ingest_consumer_restarts_total",
                    "Kafka consumers rebuilt by the stall watchdog.",
                    c(&self.consumer_restarts),
                ),
            ],
        );
        tollgate_common::admin::write_family(
            &mut out,
            "gauge",
            &[
                ("tollgate_ingest_pending_rows", "Rows read from Kafka and not yet inserted.", g(&self.pending_rows)),
                (
                    "tollgate_ingest_last_write_seconds",
                    "When the last insert into api_calls succeeded (Unix seconds; 0: none yet).",
                    g(&self.last_write_seconds),
                ),
                (
                    "tollgate_ingest_partitions_assigned",
                    "Partitions of the events topic this replica holds now.",
                    g(&self.partitions_assigned),
                ),
            ],
        );
        out
    }
}
