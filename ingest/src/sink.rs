//! The ClickHouse sink: the `api_calls` row type and batch inserts.

use clickhouse::Client;
use serde::Serialize;
use tollgate_schemas::ApiCall;
use uuid::Uuid;

pub use tollgate_schemas::store::{client, prepare};

/// The raw table.
pub const TABLE: &str = "api_calls";

/// One row of `api_calls` (column order as in `schemas/migrations/0001_api_calls.sql`).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize)]
pub struct RawRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub ts: u32,
    pub start_time_us: u64,
    pub edge_id: String,
    pub consumer_id: String,
    pub credential_id: String,
    pub route_id: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub outcome: i8,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub client_ip: String,
    pub user_agent: String,
    pub trace_id: String,
    pub plan_id: String,
    pub upstream_target: String,
    pub grpc_status: Option<u16>,
}

/// Why an event cannot become a row (it goes to the DLQ like an undecodable message).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("start_time_us {0} is outside 1970-01-01..2106-02-07, ClickHouse DateTime's range")]
    TimeOutOfRange(i64),
}

impl RawRow {
    pub fn from_event(e: ApiCall) -> Result<Self, RowError> {
        let start = u64::try_from(e.start_time_us).map_err(|_| RowError::TimeOutOfRange(e.start_time_us))?;
        let ts = u32::try_from(start / 1_000_000).map_err(|_| RowError::TimeOutOfRange(e.start_time_us))?;
        Ok(RawRow {
            event_id: e.event_id,
            ts,
            start_time_us: start,
            edge_id: e.edge_id,
            consumer_id: e.consumer_id.unwrap_or_default(),
            credential_id: e.credential_id.unwrap_or_default(),
            route_id: e.route_id.unwrap_or_default(),
            method: e.method,
            host: e.host,
            path: e.path,
            status: e.status,
            outcome: e.outcome.clickhouse_value(),
            latency_us: e.latency_us,
            upstream_latency_us: e.upstream_latency_us,
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            client_ip: e.client_ip,
            user_agent: e.user_agent.unwrap_or_default(),
            trace_id: e.trace_id.unwrap_or_default(),
            plan_id: e.plan_id.unwrap_or_default(),
            upstream_target: e.upstream_target.unwrap_or_default(),
            grpc_status: e.grpc_status,
        })
    }
}

/// Inserts `rows` as one INSERT. A failure may have written part of the batch; retrying the
/// whole batch is safe because the table deduplicates on `event_id`.
pub async fn insert(client: &Client, rows: &[RawRow]) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<RawRow>(TABLE).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}
