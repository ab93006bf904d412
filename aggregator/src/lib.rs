//! tollgate aggregator: per-minute usage and latency histograms from `api-calls`, with an
//! exactly-once effect in ClickHouse.
//!
//! - [`tracker`]: event time, watermark, allowed lateness, late events, safe commit offsets;
//! - [`progress`]: ingest's committed offsets (a minute is read from the raw table only once
//!   ingest has written all its events);
//! - [`store`]: recompute a minute's rows from `api_calls FINAL`, write them to
//!   `usage_minute` (ReplacingMergeTree), read usage back;
//! - [`histogram`]: fixed-boundary HDR buckets and nearest-rank percentiles;
//! - [`quota`]: month-to-date usage → quota state, to ClickHouse and the topic `quota-state`;
//! - [`slo`]: SLO burn rates over multiple windows, alerts to a webhook and `slo_alerts`;
//! - [`pipeline`]: the loop tying them together.

pub mod config;
pub mod histogram;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod quota;
pub mod slo;
pub mod store;
pub mod tracker;

pub use config::Config;
