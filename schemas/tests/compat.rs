//! Backward compatibility: bytes written by every released schema version stay readable by
//! the current decoder. Each version's fixture was written by the build that shipped it and
//! is never regenerated; when `api_call.avsc` changes, keep the old fixtures and add one with
//! `cargo run -p tollgate-schemas --example write_fixture -- api_call.vN.bin` (same event).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[path = "common/fixture_event.rs"]
mod fixture_event;

use fixture_event::fixture_event;
use tollgate_schemas::Decoder;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn v1_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v1.bin")).expect("fixture");
    assert_eq!(&bytes[..2], &[0xC3, 0x01]);
    // v1 had no plan_id (nor upstream_target, grpc_status): they read as their default, null.
    let expected = tollgate_schemas::ApiCall { plan_id: None, ..before_v4() };
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), expected);
}

#[test]
fn v2_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v2.bin")).expect("fixture");
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), before_v4());
}

#[test]
fn v3_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v3.bin")).expect("fixture");
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), before_v4());
}

/// The fixture event as versions before v4 wrote it: no upstream_target (nor grpc_status),
/// which read as null.
fn before_v4() -> tollgate_schemas::ApiCall {
    tollgate_schemas::ApiCall { upstream_target: None, ..before_v5() }
}

/// The fixture event as v4 wrote it: no grpc_status, which reads as null.
fn before_v5() -> tollgate_schemas::ApiCall {
    tollgate_schemas::ApiCall { grpc_status: None, ..fixture_event() }
}

#[test]
fn v4_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v4.bin")).expect("fixture");
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), before_v5());
    // v4 appended upstream_target: the v3 body followed by it.
    let v3 = std::fs::read(fixture("api_call.v3.bin")).unwrap();
    assert!(bytes[10..].starts_with(&v3[10..]));
}

#[test]
fn v5_bytes_decode_with_the_current_reader() {
    let bytes = std::fs::read(fixture("api_call.v5.bin")).expect("fixture");
    assert_eq!(Decoder::new().unwrap().decode(&bytes).unwrap(), fixture_event());
    // v5 appended grpc_status: the v4 body followed by it (union branch 1, zigzag 0).
    let v4 = std::fs::read(fixture("api_call.v4.bin")).unwrap();
    assert_eq!(bytes[10..], [&v4[10..], &[0x02, 0x00][..]].concat());
}

#[test]
fn the_aggregators_reader_knows_every_version() {
    let dec = Decoder::new().unwrap();
    for (name, plan) in [
        ("api_call.v1.bin", None),
        ("api_call.v2.bin", Some("pro")),
        ("api_call.v3.bin", Some("pro")),
        ("api_call.v4.bin", Some("pro")),
        ("api_call.v5.bin", Some("pro")),
    ] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let s = dec.summarize(&bytes).unwrap();
        assert_eq!((s.event_id, s.plan_id.as_deref(), s.status), (fixture_event().event_id, plan, 201), "{name}");
    }
}

#[test]
fn v2_and_v3_differ_only_in_the_fingerprint() {
    // v3 appended an enum symbol: the same event has the same body under both.
    let (v2, v3) =
        (std::fs::read(fixture("api_call.v2.bin")).unwrap(), std::fs::read(fixture("api_call.v3.bin")).unwrap());
    assert_ne!(v2[2..10], v3[2..10]);
    assert_eq!(v2[10..], v3[10..]);
}

#[test]
fn the_current_writer_is_the_last_released_version() {
    // A schema change must come with a new fixture (and a SCHEMA_VERSIONS entry).
    let last = std::fs::read(fixture("api_call.v5.bin")).expect("fixture");
    assert_eq!(tollgate_schemas::Encoder::new().unwrap().encode(&fixture_event()).unwrap(), last);
}
