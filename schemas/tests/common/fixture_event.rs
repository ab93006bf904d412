//! The event stored in every compatibility fixture; shared by `tests/compat.rs` and
//! `examples/write_fixture.rs` so the fixture and its check can never disagree.

use tollgate_schemas::{ApiCall, Outcome};
use uuid::Uuid;

/// The fixture event.
pub fn fixture_event() -> ApiCall {
    ApiCall {
        event_id: Uuid::from_u128(0x019a_b6a0_1c2d_7e3f_8a4b_5c6d_7e8f_9a0b),
        start_time_us: 1_795_000_000_123_456,
        edge_id: "edge-1".into(),
        consumer_id: Some("acme".into()),
        credential_id: Some("acme-key-1".into()),
        route_id: Some("orders".into()),
        method: "POST".into(),
        host: "api.example.com".into(),
        path: "/v1/orders".into(),
        status: 201,
        outcome: Outcome::Forwarded,
        latency_us: 12_345,
        upstream_latency_us: Some(11_000),
        request_bytes: 512,
        response_bytes: 2048,
        client_ip: "203.0.113.7".into(),
        user_agent: Some("sdk/1.2".into()),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        plan_id: Some("pro".into()),
        upstream_target: Some("http://10.0.0.5:8080".into()),
        grpc_status: Some(0),
    }
}
