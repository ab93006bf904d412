//! tollgate ingest: consumes `api-calls` in a consumer group and writes every decodable event
//! as one row of the ClickHouse table `api_calls`.
//!
//! Delivery is at least once with an idempotent sink, which gives an exactly-once effect:
//! - [`source`] reads messages and decodes them; undecodable ones go to `api-calls.dlq`
//!   ([`dlq`]) with the error, and the partition keeps flowing;
//! - [`pipeline`] cuts batches by rows and time and hands them, in order, to the writer;
//! - [`sink`] inserts a batch, retrying with backoff while ClickHouse is down (the batch stays
//!   in memory and the reader stops pulling: nothing is lost, memory stays bounded);
//! - only after a batch is inserted are its offsets stored for commit, so a committed offset
//!   always has everything before it durably written (contiguous high-water mark);
//! - redeliveries after a crash insert the same rows again; `api_calls` is a
//!   `ReplacingMergeTree` keyed by `event_id`, and the documented queries read it `FINAL`.

pub mod config;
pub mod dlq;
pub mod metrics;
pub mod pipeline;
pub mod sink;
pub mod source;

pub use config::Config;
pub use pipeline::run;
