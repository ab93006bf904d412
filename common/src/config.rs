//! Loading a TOML config file with environment-variable overrides.
//!
//! An override variable is `<PREFIX><SECTION>__<KEY>`, upper case, `__` between path segments:
//! with prefix `TOLLGATE_EDGE_`, `TOLLGATE_EDGE_KAFKA__BROKERS=host:9092` sets `kafka.brokers`.
//! The value is read as a TOML value when it parses as one (`5`, `true`, `["a"]`), otherwise as
//! a string. The overrides come from a map so that tests pass their own instead of the process
//! environment.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A config that could not be loaded. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config override {var}: cannot set `{key}`: {reason}")]
    Override { var: String, key: String, reason: String },
    #[error("config {origin}: key `{key}`: {reason}")]
    Invalid { origin: String, key: String, reason: String },
}

impl ConfigError {
    /// An error for a key that deserialized but failed validation.
    pub fn invalid(origin: &str, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { origin: origin.to_owned(), key: key.into(), reason: reason.into() }
    }
}

/// Reads `path`, applies the overrides among `env` that start with `prefix`, and deserializes
/// into `T` (usually a raw struct with `deny_unknown_fields`).
pub fn load<T: DeserializeOwned>(path: &Path, prefix: &str, env: &BTreeMap<String, String>) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
    parse(&text, &shown, prefix, env)
}

/// Like [`load`], from a string; `origin` names it in errors.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    origin: &str,
    prefix: &str,
    env: &BTreeMap<String, String>,
) -> Result<T, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax { path: origin.to_owned(), message: e.to_string() })?;
    apply_overrides(&mut table, prefix, env)?;
    let value = toml::Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid { origin: origin.to_owned(), key, reason: e.into_inner().to_string() }
    })
}

/// A replica's static membership id (`kafka.instance_id`): the configured one (not blank),
/// else `<role>-$HOSTNAME`, else `<role>-0`.
pub fn instance_id(configured: Option<String>, role: &str) -> Result<String, &'static str> {
    match configured {
        Some(id) if id.trim().is_empty() => Err("must not be empty"),
        Some(id) => Ok(id),
        None => Ok(std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .map_or_else(|| format!("{role}-0"), |h| format!("{role}-{h}"))),
    }
}

/// The process environment as a map, for [`load`].
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn apply_overrides(table: &mut toml::Table, prefix: &str, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (var, raw) in env.range(prefix.to_owned()..) {
        let Some(rest) = var.strip_prefix(prefix) else { break };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let key = path.join(".");
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Override { var: var.clone(), key, reason: "empty path segment".into() });
        }
        let value = parse_scalar(raw);
        let mut cursor = &mut *table;
        for (i, segment) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cursor.insert(segment.clone(), value.clone());
                break;
            }
            let entry = cursor.entry(segment.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Override {
                        var: var.clone(),
                        key,
                        reason: format!("`{segment}` is not a table"),
                    });
                }
            };
        }
    }
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        kafka: Kafka,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        brokers: String,
        #[serde(default)]
        linger_ms: u32,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn overrides_replace_and_add_keys_with_typed_values() {
        let raw: Raw = parse(
            "[kafka]\nbrokers = \"a:1\"\n",
            "test.toml",
            "T_",
            &env(&[("T_KAFKA__BROKERS", "b:2"), ("T_KAFKA__LINGER_MS", "7"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(raw.kafka.brokers, "b:2");
        assert_eq!(raw.kafka.linger_ms, 7);
    }

    #[test]
    fn errors_name_the_key() {
        let err = parse::<Raw>("[kafka]\nbrokers = 5\n", "edge.toml", "T_", &env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kafka.brokers") && msg.contains("edge.toml"), "{msg}");
        let err = parse::<Raw>("[kafka]\nbrokers = \"a\"\nbrokerz = 1\n", "edge.toml", "T_", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let err = parse::<Raw>("[kafka]\nbrokers = \"a\"\n", "edge.toml", "T_", &env(&[("T_KAFKA__BROKERS__X", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("T_KAFKA__BROKERS__X"), "{err}");
    }
}
