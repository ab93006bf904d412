//! Writes the compatibility fixture of the current schema version:
//! `cargo run -p tollgate-schemas --example write_fixture -- api_call.vN.bin`.
//! Run it only when a new schema version is released; never overwrite an old fixture.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/fixture_event.rs"]
mod fixture_event;

use fixture_event::fixture_event;
use tollgate_schemas::Encoder;

fn main() {
    let name = std::env::args().nth(1).expect("fixture file name, e.g. api_call.v2.bin");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    assert!(!path.exists(), "{} exists; fixtures are never overwritten", path.display());
    std::fs::write(&path, Encoder::new().unwrap().encode(&fixture_event()).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
