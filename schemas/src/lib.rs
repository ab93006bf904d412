//! tollgate's shared contracts. Every component depends on this crate and nothing else defines
//! these things twice:
//!
//! - [`ApiCall`], the event the edge emits for every call, and [`Outcome`];
//! - its Avro **single-object encoding** ([`avro`]): `C3 01`, the 8-byte little-endian
//!   CRC-64-AVRO fingerprint of the writer schema, then the Avro body. Readers resolve the
//!   writer schema from the fingerprint among the schema versions compiled into this crate, so
//!   no registry is needed;
//! - the topic names ([`topics`]);
//! - the ClickHouse migrations (`migrations/*.sql`) and, with the `migrate` feature, the code
//!   that applies them idempotently ([`migrate`]), and the shared `[clickhouse]` config section
//!   (`store`).

pub mod avro;
mod event;
#[cfg(feature = "migrate")]
pub mod migrate;
pub mod quota;
#[cfg(feature = "migrate")]
pub mod store;
mod summary;

pub use avro::{DecodeError, Decoder, EncodeError, Encoder};
pub use event::{ApiCall, ApiCallOf, ApiCallRef, Outcome};
pub use summary::CallSummary;

/// Kafka topic names shared by the components.
pub mod topics {
    /// Every call seen by an edge, one [`crate::ApiCall`] per message, key = consumer id.
    pub const API_CALLS: &str = "api-calls";
    /// Messages from `api-calls` that could not be decoded, with the error in a header.
    pub const API_CALLS_DLQ: &str = "api-calls.dlq";
    /// Compacted: the latest [`crate::quota::QuotaState`] of every consumer, key = consumer id.
    pub const QUOTA_STATE: &str = "quota-state";
}

/// SQL migrations, in the order they apply: (version, name, SQL text).
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "0001_api_calls.sql", include_str!("../migrations/0001_api_calls.sql")),
    (2, "0002_usage_minute.sql", include_str!("../migrations/0002_usage_minute.sql")),
    (3, "0003_api_calls_plan_id.sql", include_str!("../migrations/0003_api_calls_plan_id.sql")),
    (4, "0004_quota_state.sql", include_str!("../migrations/0004_quota_state.sql")),
    (5, "0005_invoices.sql", include_str!("../migrations/0005_invoices.sql")),
    (6, "0006_outcome_edge_shutdown.sql", include_str!("../migrations/0006_outcome_edge_shutdown.sql")),
    (7, "0007_slo.sql", include_str!("../migrations/0007_slo.sql")),
    (8, "0008_api_calls_upstream_target.sql", include_str!("../migrations/0008_api_calls_upstream_target.sql")),
    (9, "0009_api_calls_grpc_status.sql", include_str!("../migrations/0009_api_calls_grpc_status.sql")),
];
