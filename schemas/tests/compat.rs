//! Backward compatibility: bytes written by every released schema version stay readable by
//! the current decoder. Each version's fixture was written by the build that shipped it and
//! is never regenerated; when `api_call.avsc` changes, keep the old fixtures and add one with
//! `cargo run -p tollgate-schemas --example write_fixture -- api_call.vN.bin` (same event).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use tollgate_schemas::{ApiCall, Decoder, Outcome};
use uuid::Uuid;

/// The event stored in every fixture (same as `examples/write_fixture.rs`).
fn fixture_event() -> ApiCall {
    ApiCall {
        event_id: Uuid::parse_str("019ab6a0-1c2d-7e3f-8a4b-5c6d7e8f9a0b").unwrap(),
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
    }
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn v1_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v1.bin")).expect("fixture");
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), fixture_event());
}
