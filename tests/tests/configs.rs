//! The configs the project ships (config/demo for `scripts/demo.sh`, config/compose for
//! docker-compose.yml) are valid for their binaries, and `check-config` names the key of a bad
//! value. No broker or ClickHouse is needed: `check-config` only reads the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use tollgate_e2e::*;

/// Runs `<binary> check-config --config <path>`: (exit code, stdout + stderr).
fn check(binary: &str, path: &Path) -> (i32, String) {
    let out = Command::new(bin(binary))
        .args(["check-config", "--config"])
        .arg(path)
        // The shipped configs must be valid on their own, without the environment's overrides.
        .env_clear()
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_shipped_config_is_valid() {
    let root = repo_root().join("config");
    let mut checked = 0;
    for dir in ["demo", "compose"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            let (code, text) = check(&format!("tollgate-{stem}"), &path);
            assert_eq!(code, 0, "{}: {text}", path.display());
            assert!(text.contains(": ok"), "{}: {text}", path.display());
            checked += 1;
        }
    }
    // demo: edge, ingest, aggregator, billing; compose: edge, ingest, aggregator.
    assert_eq!(checked, 7);
}

#[test]
fn check_config_names_the_key_of_a_bad_value() {
    let dir = TempDir::new("configs");
    let root = repo_root().join("config/demo");
    for (binary, from, to, key) in [
        ("ingest", "max_wait_ms = 250", "max_wait_ms = 0", "batch.max_wait_ms"),
        ("ingest", "listen = \"127.0.0.1:9903\"", "listen = \"9903\"", "admin.listen"),
        ("aggregator", "listen = \"127.0.0.1:9902\"", "listen = \"nowhere\"", "admin.listen"),
        ("billing", "[billing]", "[billing]\nunknown_key = 1", "unknown_key"),
    ] {
        let text = std::fs::read_to_string(root.join(format!("{binary}.toml"))).unwrap();
        assert!(text.contains(from), "{binary}.toml has no `{from}`");
        let path = dir.path().join(format!("{binary}.toml"));
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let (code, out) = check(&format!("tollgate-{binary}"), &path);
        assert_eq!(code, 2, "{binary}: {out}");
        assert!(out.contains(key), "{binary}: {out}");
    }
}
