//! Ingest configuration: a TOML file, overridable with `TOLLGATE_INGEST_<SECTION>__<KEY>`.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tollgate_common::config::{self, ConfigError};
pub use tollgate_schemas::store::ClickHouseConfig;
use tollgate_schemas::store::RawClickHouse;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_INGEST_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    kafka: RawKafka,
    clickhouse: RawClickHouse,
    #[serde(default)]
    batch: RawBatch,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_dlq_topic")]
    dlq_topic: String,
    #[serde(default = "default_group_id")]
    group_id: String,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default = "default_stall_timeout_ms")]
    stall_timeout_ms: u64,
    /// Extra librdkafka properties, passed as they are.
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    #[serde(default = "default_max_rows")]
    max_rows: usize,
    #[serde(default = "default_max_wait_ms")]
    max_wait_ms: u64,
}

impl Default for RawBatch {
    fn default() -> Self {
        Self { max_rows: default_max_rows(), max_wait_ms: default_max_wait_ms() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "default_initial_backoff_ms")]
    initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    max_backoff_ms: u64,
    #[serde(default = "default_shutdown_grace_ms")]
    shutdown_grace_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
        }
    }
}

fn default_topic() -> String {
    tollgate_schemas::topics::API_CALLS.to_owned()
}
fn default_dlq_topic() -> String {
    tollgate_schemas::topics::API_CALLS_DLQ.to_owned()
}
fn default_group_id() -> String {
    "tollgate-ingest".to_owned()
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_max_rows() -> usize {
    50_000
}
fn default_max_wait_ms() -> u64 {
    500
}
fn default_initial_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    5_000
}
fn default_shutdown_grace_ms() -> u64 {
    30_000
}

/// Validated ingest configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    pub batch: BatchConfig,
    pub retry: RetryConfig,
    /// Where `/healthz` and `/metrics` listen (no admin port when unset).
    pub admin_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    /// Static group membership id (`group.instance.id`), unique per replica: a restarted
    /// replica takes its partitions back at once instead of waiting out the dead session.
    pub instance_id: String,
    /// When nothing has arrived for this long, the broker is asked whether there is something
    /// to read; if so, the consumer is rebuilt (`None`: never; `kafka.stall_timeout_ms = 0`).
    pub stall_timeout: Option<Duration>,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// A batch is flushed when it holds this many rows...
    pub max_rows: NonZeroUsize,
    /// ...or when its first message is this old.
    pub max_wait: Duration,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long shutdown keeps retrying a pending batch before giving up on it (it is then
    /// redelivered on the next start, since its offsets were not committed).
    pub shutdown_grace: Duration,
}

impl Config {
    /// Loads and validates `path` with overrides from `env`.
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::load(path, ENV_PREFIX, env)?;
        Self::validate(raw, &path.display().to_string())
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::parse(text, "<inline>", ENV_PREFIX, env)?;
        Self::validate(raw, "<inline>")
    }

    fn validate(raw: Raw, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::invalid(origin, key, reason);
        if raw.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must list at least one host:port"));
        }
        for (key, value) in [
            ("kafka.topic", &raw.kafka.topic),
            ("kafka.dlq_topic", &raw.kafka.dlq_topic),
            ("kafka.group_id", &raw.kafka.group_id),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if raw.kafka.topic == raw.kafka.dlq_topic {
            return Err(invalid("kafka.dlq_topic", "must differ from kafka.topic"));
        }
        let instance_id = config::instance_id(raw.kafka.instance_id, "ingest")
            .map_err(|reason| invalid("kafka.instance_id", reason))?;
        let clickhouse = raw.clickhouse.validate().map_err(|(key, reason)| invalid(key, reason))?;
        let max_rows =
            NonZeroUsize::new(raw.batch.max_rows).ok_or_else(|| invalid("batch.max_rows", "must be at least 1"))?;
        if raw.batch.max_wait_ms == 0 {
            return Err(invalid("batch.max_wait_ms", "must be at least 1"));
        }
        if raw.retry.initial_backoff_ms == 0 || raw.retry.max_backoff_ms < raw.retry.initial_backoff_ms {
            return Err(invalid("retry.max_backoff_ms", "must be >= retry.initial_backoff_ms >= 1"));
        }
        let admin_listen = match raw.admin.listen {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| invalid("admin.listen", "must be an address like 127.0.0.1:9182"))?),
        };
        Ok(Config {
            admin_listen,
            kafka: KafkaConfig {
                brokers: raw.kafka.brokers,
                topic: raw.kafka.topic,
                dlq_topic: raw.kafka.dlq_topic,
                group_id: raw.kafka.group_id,
                instance_id,
                stall_timeout: (raw.kafka.stall_timeout_ms > 0)
                    .then(|| Duration::from_millis(raw.kafka.stall_timeout_ms)),
                properties: raw.kafka.properties,
            },
            clickhouse,
            batch: BatchConfig { max_rows, max_wait: Duration::from_millis(raw.batch.max_wait_ms) },
            retry: RetryConfig {
                initial_backoff: Duration::from_millis(raw.retry.initial_backoff_ms),
                max_backoff: Duration::from_millis(raw.retry.max_backoff_ms),
                shutdown_grace: Duration::from_millis(raw.retry.shutdown_grace_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MINIMAL: &str = "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[clickhouse]\nurl = \"http://127.0.0.1:8123\"\n";

    #[test]
    fn defaults_apply() {
        let c = Config::parse(MINIMAL, &BTreeMap::new()).unwrap();
        assert_eq!(c.kafka.topic, "api-calls");
        assert_eq!(c.kafka.dlq_topic, "api-calls.dlq");
        assert_eq!(c.clickhouse.database, "tollgate");
        assert_eq!(c.batch.max_rows.get(), 50_000);
        assert_eq!(c.kafka.stall_timeout, Some(Duration::from_secs(30)));
        let off =
            Config::parse(&MINIMAL.replace("[clickhouse]", "stall_timeout_ms = 0\n[clickhouse]"), &BTreeMap::new());
        assert_eq!(off.unwrap().kafka.stall_timeout, None);
        assert_eq!(c.admin_listen, None);
        let admin = Config::parse(&format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9182\"\n"), &BTreeMap::new());
        assert_eq!(admin.unwrap().admin_listen, Some("127.0.0.1:9182".parse().unwrap()));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[batch]\nmax_rows = 0\n", "batch.max_rows"),
            ("[batch]\nmax_wait_ms = 0\n", "batch.max_wait_ms"),
            ("[retry]\ninitial_backoff_ms = 10\nmax_backoff_ms = 5\n", "retry.max_backoff_ms"),
            ("[batch]\nmax_rowz = 1\n", "max_rowz"),
            ("[admin]\nlisten = \"9182\"\n", "admin.listen"),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{MINIMAL}{extra}"), &BTreeMap::new()).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let env = [("TOLLGATE_INGEST_CLICKHOUSE__DATABASE".to_owned(), "bad-name".to_owned())].into();
        let err = Config::parse(MINIMAL, &env).unwrap_err().to_string();
        assert!(err.contains("clickhouse.database"), "{err}");
        let env = [("TOLLGATE_INGEST_CLICKHOUSE__URL".to_owned(), "localhost:8123".to_owned())].into();
        assert!(Config::parse(MINIMAL, &env).unwrap_err().to_string().contains("clickhouse.url"));
    }
}
