//! Every migration and documented query runs on the local ClickHouse (18.16) and on current
//! ClickHouse (chdb-core), and `migrate` is idempotent and refuses edited migrations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use clickhouse::Client;
use tollgate_schemas::migrate::{self, MigrateError};

fn url() -> String {
    std::env::var("TOLLGATE_TEST_CLICKHOUSE").unwrap_or_else(|_| {
        format!("http://127.0.0.1:{}", std::env::var("TOLLGATE_CH_HTTP_PORT").unwrap_or_else(|_| "8123".into()))
    })
}

async fn fresh_db(name: &str) -> (Client, String) {
    let db = format!("{name}_{}", std::process::id());
    let base = Client::default().with_url(url()).with_validation(false);
    base.query(&format!("DROP DATABASE IF EXISTS {db}")).execute().await.unwrap();
    base.query(&format!("CREATE DATABASE {db}")).execute().await.unwrap();
    (base.with_database(&db), db)
}

#[tokio::test]
async fn migrations_apply_once_and_documented_queries_run_on_local_clickhouse() {
    let (client, db) = fresh_db("migr").await;
    let all: Vec<u32> = tollgate_schemas::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(migrate::run(&client).await.unwrap(), all);
    assert_eq!(migrate::run(&client).await.unwrap(), Vec::<u32>::new());
    let recorded: u64 = client.query("SELECT count() FROM schema_migrations").fetch_one().await.unwrap();
    assert_eq!(recorded, all.len() as u64);

    let queries = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
    let mut ran = 0;
    for entry in std::fs::read_dir(queries).unwrap() {
        let path = entry.unwrap().path();
        for stmt in migrate::statements(&std::fs::read_to_string(&path).unwrap()) {
            client.query(&stmt).execute().await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            ran += 1;
        }
    }
    assert!(ran >= 3, "documented queries not found");

    // Every outcome reads back through the tables and the views with the Enum8 value that
    // ingest and the aggregator write for it (`clickhouse_value`), and can be filtered on.
    for o in tollgate_schemas::Outcome::ALL {
        let (v, name) = (o.clickhouse_value(), o.as_str());
        for insert in [
            format!(
                "INSERT INTO api_calls (event_id, ts, consumer_id, outcome) \
                 VALUES ('00000000-0000-0000-0000-{v:012}', now(), 'c', '{name}')"
            ),
            format!(
                "INSERT INTO usage_minute (minute, consumer_id, outcome, requests) VALUES (now(), 'c', '{name}', 1)"
            ),
        ] {
            client.query(&insert).execute().await.unwrap_or_else(|e| panic!("{insert}: {e}"));
        }
    }
    let want: Vec<(String, i8)> =
        tollgate_schemas::Outcome::ALL.iter().map(|o| (o.as_str().to_owned(), o.clickhouse_value())).collect();
    for source in ["api_calls", "api_calls_unique", "usage_minute", "usage_minute_final"] {
        let got: Vec<(String, i8)> = client
            .query(&format!("SELECT toString(outcome), toInt8(outcome) FROM {source} ORDER BY outcome"))
            .fetch_all()
            .await
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(got, want, "{source}");
        let last = &want.last().unwrap().0;
        let n: u64 = client
            .query(&format!("SELECT count() FROM {source} WHERE outcome = '{last}'"))
            .fetch_one()
            .await
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(n, 1, "{source} filtered on {last}");
    }
    // Schema v4's column, through the table and the view made again over it.
    client
        .query("INSERT INTO api_calls (event_id, ts, outcome, upstream_target) VALUES ('00000000-0000-0000-0000-0000000000ff', now(), 'forwarded', 'http://10.0.0.5:8080')")
        .execute()
        .await
        .unwrap();
    for source in ["api_calls", "api_calls_unique"] {
        let n: u64 = client
            .query(&format!("SELECT count() FROM {source} WHERE upstream_target = 'http://10.0.0.5:8080'"))
            .fetch_one()
            .await
            .unwrap_or_else(|e| panic!("{source}: {e}"));
        assert_eq!(n, 1, "{source}");
    }
    Client::default().with_url(url()).query(&format!("DROP DATABASE {db}")).execute().await.unwrap();
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let (client, db) = fresh_db("migr_edit").await;
    migrate::run(&client).await.unwrap();
    client.query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (1, 'x', 'not-the-checksum', now())").execute().await.unwrap();
    let err = migrate::run(&client).await.unwrap_err();
    assert!(matches!(err, MigrateError::ChecksumMismatch { name: "0001_api_calls.sql", .. }), "{err}");
    Client::default().with_url(url()).query(&format!("DROP DATABASE {db}")).execute().await.unwrap();
}

#[test]
fn migrations_and_documented_queries_run_on_current_clickhouse_via_chdb() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb_check.py");
    let out = std::process::Command::new("python3").arg(&script).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
