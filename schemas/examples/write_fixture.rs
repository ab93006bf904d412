//! Writes the compatibility fixture of the current schema version:
//! `cargo run -p tollgate-schemas --example write_fixture -- api_call.vN.bin`.
//! Run it only when a new schema version is released; never overwrite an old fixture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tollgate_schemas::{ApiCall, Encoder, Outcome};
use uuid::Uuid;

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

fn main() {
    let name = std::env::args().nth(1).expect("fixture file name, e.g. api_call.v2.bin");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    assert!(!path.exists(), "{} exists; fixtures are never overwritten", path.display());
    std::fs::write(&path, Encoder::new().unwrap().encode(&fixture_event()).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
