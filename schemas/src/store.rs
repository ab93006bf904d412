//! The `[clickhouse]` config section every component shares, the client it makes, and
//! [`prepare`] (create the database, apply the migrations).

use clickhouse::Client;
use serde::Deserialize;

/// `[clickhouse]` as written in a config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClickHouse {
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

fn default_database() -> String {
    "tollgate".to_owned()
}
fn default_user() -> String {
    "default".to_owned()
}
fn default_true() -> bool {
    true
}

/// A validated `[clickhouse]` section.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    pub migrate_on_start: bool,
}

impl RawClickHouse {
    /// Validates the section; `Err((key, reason))` names the offending key under `clickhouse.`.
    pub fn validate(self) -> Result<ClickHouseConfig, (&'static str, &'static str)> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(("clickhouse.url", "must be an http:// or https:// URL of ClickHouse's HTTP interface"));
        }
        let db = &self.database;
        if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(("clickhouse.database", "must be non-empty and only [A-Za-z0-9_]"));
        }
        Ok(ClickHouseConfig {
            url: self.url,
            database: self.database,
            user: self.user,
            password: self.password,
            migrate_on_start: self.migrate_on_start,
        })
    }
}

/// A client for the configured database. Validation is off: ClickHouse 18.16 has no
/// RowBinaryWithNamesAndTypes, and the row types are checked against the DDL by the
/// integration tests instead. HTTP compression is off (the crate's `lz4` feature is not
/// enabled): 18.16 answers `compress=1` SELECTs with an empty body, and on a local network
/// compression costs more CPU than it saves.
pub fn client(cfg: &ClickHouseConfig) -> Client {
    base_client(cfg).with_database(&cfg.database)
}

fn base_client(cfg: &ClickHouseConfig) -> Client {
    Client::default().with_url(&cfg.url).with_user(&cfg.user).with_password(&cfg.password).with_validation(false)
}

/// Creates the database if needed and applies pending migrations.
pub async fn prepare(cfg: &ClickHouseConfig) -> Result<(), PrepareError> {
    base_client(cfg)
        .query(&format!("CREATE DATABASE IF NOT EXISTS {}", cfg.database))
        .execute()
        .await
        .map_err(PrepareError::Database)?;
    let applied = crate::migrate::run(&client(cfg)).await?;
    tracing::info!(database = %cfg.database, applied = ?applied, "ClickHouse schema is up to date");
    Ok(())
}

/// Why [`prepare`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("cannot create the database: {0}")]
    Database(#[source] clickhouse::error::Error),
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}
