//! Applies [`crate::MIGRATIONS`] to a ClickHouse database, idempotently.
//!
//! Applied migrations are recorded in `schema_migrations` (version, name, SHA-256 of the SQL).
//! A migration already recorded is skipped; one recorded with a different checksum is an error
//! (an applied migration was edited; add a new one instead). Every statement is itself
//! idempotent (`IF NOT EXISTS`), so two processes migrating at once converge.

use clickhouse::Client;
use sha2::{Digest, Sha256};

/// A migration that failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot create or read schema_migrations: {0}")]
    Bookkeeping(#[source] clickhouse::error::Error),
    #[error("migration {name} failed in statement {statement}: {source}")]
    Statement {
        name: &'static str,
        statement: usize,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error(
        "migration {name} was applied with checksum {applied} but the file now has {current}; \
         applied migrations must not change, add a new one"
    )]
    ChecksumMismatch { name: &'static str, applied: String, current: String },
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct AppliedRow {
    version: u32,
    checksum: String,
}

#[derive(clickhouse::Row, serde::Serialize)]
struct RecordRow<'a> {
    version: u32,
    name: &'a str,
    checksum: &'a str,
    applied_at: u32,
}

/// The statements of one migration file: split at `;` that ends a line; comment-only and
/// blank chunks are dropped.
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// `(table, column)` of an `ALTER TABLE t ADD COLUMN c ...` statement. ClickHouse 18.16 has
/// no `ADD COLUMN IF NOT EXISTS`, so the runner makes such a statement idempotent itself: it is
/// skipped when the column exists.
pub fn added_column(stmt: &str) -> Option<(&str, &str)> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    match words.as_slice() {
        [alter, table_kw, table, add, column_kw, column, ..]
            if alter.eq_ignore_ascii_case("ALTER")
                && table_kw.eq_ignore_ascii_case("TABLE")
                && add.eq_ignore_ascii_case("ADD")
                && column_kw.eq_ignore_ascii_case("COLUMN")
                && !column.eq_ignore_ascii_case("IF") =>
        {
            Some((table, column))
        }
        _ => None,
    }
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies every migration not yet recorded in the client's database. Returns the versions
/// applied by this call.
pub async fn run(client: &Client) -> Result<Vec<u32>, MigrateError> {
    client
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version UInt32, name String, checksum String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY version",
        )
        .execute()
        .await
        .map_err(MigrateError::Bookkeeping)?;
    let applied: Vec<AppliedRow> = client
        .query("SELECT version, checksum FROM schema_migrations")
        .fetch_all()
        .await
        .map_err(MigrateError::Bookkeeping)?;
    let mut done = Vec::new();
    for &(version, name, sql) in crate::MIGRATIONS {
        let current = checksum(sql);
        // Every record of this version must match (two processes may both have recorded it).
        if let Some(row) = applied.iter().find(|r| r.version == version && r.checksum != current) {
            return Err(MigrateError::ChecksumMismatch { name, applied: row.checksum.clone(), current });
        }
        if applied.iter().any(|r| r.version == version) {
            continue;
        }
        for (i, stmt) in statements(sql).iter().enumerate() {
            let failed = |source| MigrateError::Statement { name, statement: i + 1, source };
            if let Some((table, column)) = added_column(stmt) {
                let exists: u64 = client
                    .query("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = ? AND name = ?")
                    .bind(table)
                    .bind(column)
                    .fetch_one()
                    .await
                    .map_err(failed)?;
                if exists > 0 {
                    continue;
                }
            }
            client.query(stmt).execute().await.map_err(failed)?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let record = RecordRow { version, name, checksum: &current, applied_at: now };
        let mut insert =
            client.insert::<RecordRow<'_>>("schema_migrations").await.map_err(MigrateError::Bookkeeping)?;
        insert.write(&record).await.map_err(MigrateError::Bookkeeping)?;
        insert.end().await.map_err(MigrateError::Bookkeeping)?;
        tracing::info!(version, name, "applied migration");
        done.push(version);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_and_drops_comments() {
        let sql = "-- c\nCREATE TABLE a\n(x UInt8)\nENGINE = Memory;\n\n-- d\nCREATE VIEW v AS SELECT 1;\n";
        assert_eq!(
            statements(sql),
            vec!["CREATE TABLE a\n(x UInt8)\nENGINE = Memory".to_owned(), "CREATE VIEW v AS SELECT 1".to_owned()]
        );
    }

    #[test]
    fn recognizes_added_columns() {
        assert_eq!(
            added_column("ALTER TABLE api_calls ADD COLUMN plan_id String DEFAULT ''"),
            Some(("api_calls", "plan_id"))
        );
        assert_eq!(added_column("alter table t\nadd column c UInt8"), Some(("t", "c")));
        assert_eq!(added_column("ALTER TABLE t DROP COLUMN c"), None);
        assert_eq!(added_column("CREATE TABLE t (c UInt8)"), None);
    }

    #[test]
    fn every_migration_has_statements_and_versions_increase() {
        let mut last = 0;
        for &(version, name, sql) in crate::MIGRATIONS {
            assert!(version > last, "{name}");
            assert!(name.starts_with(&format!("{version:04}_")), "{name}");
            assert!(!statements(sql).is_empty(), "{name}");
            last = version;
        }
    }
}
