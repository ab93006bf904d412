//! The `tollgate-edge` command line: key generation and config checking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate-edge"))
}

#[test]
fn gen_key_prints_a_key_once_and_the_matching_config_entry() {
    let out = edge().args(["gen-key", "--consumer", "acme", "--key-id", "acme-2"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().map(str::trim).find(|l| l.starts_with("tg_live_")).expect("key line");
    let entry = text.lines().map(str::trim).find(|l| l.starts_with("{ id = \"acme-2\"")).expect("entry line");
    let hash = tollgate_edge::auth::hash_key(key);
    assert_eq!(entry, format!("{{ id = \"acme-2\", sha256 = \"{hash}\" }}"));
    assert_eq!(text.matches(key).count(), 1, "the key is printed exactly once");
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("edge-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[plans.free]\nrate_per_second = 1\n\
         [[consumers]]\nid = \"acme\"\nplan = \"gold\"\n",
    )
    .unwrap();
    let out = edge().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("consumers[0].plan") && err.contains("unknown plan `gold`"), "{err}");
    std::fs::write(&path, "[kafka]\nbrokers = \"127.0.0.1:9092\"\n").unwrap();
    let out = edge().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}
