//! Aggregator configuration: a TOML file, overridable with `TOLLGATE_AGGREGATOR_<SECTION>__<KEY>`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tollgate_common::config::{self, ConfigError};
pub use tollgate_schemas::store::ClickHouseConfig;
use tollgate_schemas::store::RawClickHouse;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_AGGREGATOR_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    kafka: RawKafka,
    clickhouse: RawClickHouse,
    #[serde(default)]
    windows: RawWindows,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    quota: RawQuota,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    slo: crate::slo::config::RawSlo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: String,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_group_id")]
    group_id: String,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default = "default_ingest_group_id")]
    ingest_group_id: String,
    #[serde(default = "default_commit_interval_ms")]
    commit_interval_ms: u64,
    #[serde(default = "default_stall_timeout_ms")]
    stall_timeout_ms: u64,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindows {
    #[serde(default = "default_lateness_s")]
    allowed_lateness_s: u32,
    #[serde(default = "default_idle_close_ms")]
    idle_close_ms: u64,
    #[serde(default = "default_max_clock_skew_s")]
    max_clock_skew_s: u32,
}

impl Default for RawWindows {
    fn default() -> Self {
        Self {
            allowed_lateness_s: default_lateness_s(),
            idle_close_ms: default_idle_close_ms(),
            max_clock_skew_s: default_max_clock_skew_s(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    #[serde(default = "default_quota_topic")]
    topic: String,
    #[serde(default = "default_anchor_day")]
    period_anchor_day: u32,
    #[serde(default)]
    plans: BTreeMap<String, RawQuotaPlan>,
}

impl Default for RawQuota {
    fn default() -> Self {
        Self { topic: default_quota_topic(), period_anchor_day: default_anchor_day(), plans: BTreeMap::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotaPlan {
    monthly_calls: u64,
    #[serde(default = "default_enforcement")]
    enforcement: String,
    #[serde(default = "default_warning_percent")]
    warning_percent: u8,
}

fn default_quota_topic() -> String {
    tollgate_schemas::topics::QUOTA_STATE.to_owned()
}
fn default_anchor_day() -> u32 {
    1
}
fn default_enforcement() -> String {
    "hard".to_owned()
}
fn default_warning_percent() -> u8 {
    80
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default = "default_initial_backoff_ms")]
    initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    max_backoff_ms: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        Self { initial_backoff_ms: default_initial_backoff_ms(), max_backoff_ms: default_max_backoff_ms() }
    }
}

fn default_topic() -> String {
    tollgate_schemas::topics::API_CALLS.to_owned()
}
fn default_group_id() -> String {
    "tollgate-aggregator".to_owned()
}
fn default_ingest_group_id() -> String {
    "tollgate-ingest".to_owned()
}
fn default_stall_timeout_ms() -> u64 {
    30_000
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_lateness_s() -> u32 {
    10
}
fn default_idle_close_ms() -> u64 {
    1_000
}
fn default_max_clock_skew_s() -> u32 {
    5
}
fn default_initial_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    5_000
}

/// Validated aggregator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    pub windows: WindowConfig,
    /// Where `/healthz` and `/metrics` listen (no admin port when unset).
    pub admin_listen: Option<SocketAddr>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub quota: QuotaConfig,
    /// `[slo]`: objectives, alert rules, webhook (no evaluation without objectives).
    pub slo: std::sync::Arc<crate::slo::SloConfig>,
}

/// `[quota]`: monthly quotas by plan id (plans not listed have none).
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub topic: String,
    /// Quota periods start at 00:00 UTC on this day of every month (1: calendar months).
    pub period_anchor_day: u32,
    pub plans: BTreeMap<String, crate::quota::QuotaPlan>,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    /// Static group membership id (`group.instance.id`), unique per replica.
    pub instance_id: String,
    /// The consumer group of ingest: a minute is recomputed from the raw table only after
    /// ingest committed past its events.
    pub ingest_group_id: String,
    /// How often offsets of written minutes are committed (a restart re-reads at most this
    /// much more; what it re-reads is rewritten, not counted twice).
    pub commit_interval: Duration,
    /// The stall watchdog's timeout (see ingest's; `None`: off, `kafka.stall_timeout_ms = 0`).
    pub stall_timeout: Option<Duration>,
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct WindowConfig {
    /// How long after a minute ends its events may still arrive before it is written.
    pub allowed_lateness_s: u32,
    /// Without messages for this long, the wall clock closes minutes.
    pub idle_close: Duration,
    /// Event times further ahead of the wall clock than this do not move the watermark further.
    pub max_clock_skew_s: u32,
}

impl Config {
    /// Loads and validates `path` with overrides from `env`.
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::load(path, ENV_PREFIX, env)?;
        Self::validate(raw, &path.display().to_string(), path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::parse(text, "<inline>", ENV_PREFIX, env)?;
        Self::validate(raw, "<inline>", Path::new("."))
    }

    /// `base`: the directory relative paths in the file are taken from.
    fn validate(raw: Raw, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::invalid(origin, key, reason);
        if raw.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must list at least one host:port"));
        }
        for (key, value) in [
            ("kafka.topic", &raw.kafka.topic),
            ("kafka.group_id", &raw.kafka.group_id),
            ("kafka.ingest_group_id", &raw.kafka.ingest_group_id),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if raw.kafka.group_id == raw.kafka.ingest_group_id {
            return Err(invalid(
                "kafka.group_id",
                "must differ from kafka.ingest_group_id (the aggregator reads in its own group)",
            ));
        }
        let instance_id = config::instance_id(raw.kafka.instance_id, "aggregator")
            .map_err(|reason| invalid("kafka.instance_id", reason))?;
        let clickhouse = raw.clickhouse.validate().map_err(|(key, reason)| invalid(key, reason))?;
        if raw.windows.allowed_lateness_s > 86_400 {
            return Err(invalid("windows.allowed_lateness_s", "must be at most 86400 (one day)"));
        }
        if raw.kafka.commit_interval_ms == 0 {
            return Err(invalid("kafka.commit_interval_ms", "must be at least 1"));
        }
        if raw.windows.idle_close_ms == 0 {
            return Err(invalid("windows.idle_close_ms", "must be at least 1"));
        }
        let admin_listen = match raw.admin.listen {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| invalid("admin.listen", "must be an address like 127.0.0.1:9181"))?),
        };
        if raw.retry.initial_backoff_ms == 0 || raw.retry.max_backoff_ms < raw.retry.initial_backoff_ms {
            return Err(invalid("retry.max_backoff_ms", "must be >= retry.initial_backoff_ms >= 1"));
        }
        if raw.quota.topic.trim().is_empty() || raw.quota.topic == raw.kafka.topic {
            return Err(invalid("quota.topic", "must be non-empty and differ from kafka.topic"));
        }
        if !(1..=28).contains(&raw.quota.period_anchor_day) {
            return Err(invalid("quota.period_anchor_day", "must be between 1 and 28 (a day every month has)"));
        }
        let mut plans = BTreeMap::new();
        for (name, p) in raw.quota.plans {
            let key = |k: &str| format!("quota.plans.{name}.{k}");
            let enforcement = tollgate_schemas::quota::Enforcement::parse(&p.enforcement)
                .ok_or_else(|| invalid(&key("enforcement"), "must be \"hard\" (reject) or \"soft\" (warn)"))?;
            if !(1..=100).contains(&p.warning_percent) {
                return Err(invalid(&key("warning_percent"), "must be between 1 and 100"));
            }
            plans.insert(
                name.clone(),
                crate::quota::QuotaPlan {
                    monthly_calls: p.monthly_calls,
                    enforcement,
                    warning_percent: p.warning_percent,
                },
            );
        }
        let slo = crate::slo::config::validate(raw.slo, base).map_err(|(key, reason)| invalid(&key, &reason))?;
        Ok(Config {
            slo: std::sync::Arc::new(slo),
            quota: QuotaConfig { topic: raw.quota.topic, period_anchor_day: raw.quota.period_anchor_day, plans },
            kafka: KafkaConfig {
                brokers: raw.kafka.brokers,
                topic: raw.kafka.topic,
                group_id: raw.kafka.group_id,
                instance_id,
                ingest_group_id: raw.kafka.ingest_group_id,
                commit_interval: Duration::from_millis(raw.kafka.commit_interval_ms),
                stall_timeout: (raw.kafka.stall_timeout_ms > 0)
                    .then(|| Duration::from_millis(raw.kafka.stall_timeout_ms)),
                properties: raw.kafka.properties,
            },
            clickhouse,
            windows: WindowConfig {
                allowed_lateness_s: raw.windows.allowed_lateness_s,
                idle_close: Duration::from_millis(raw.windows.idle_close_ms),
                max_clock_skew_s: raw.windows.max_clock_skew_s,
            },
            admin_listen,
            initial_backoff: Duration::from_millis(raw.retry.initial_backoff_ms),
            max_backoff: Duration::from_millis(raw.retry.max_backoff_ms),
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
        assert_eq!(c.kafka.group_id, "tollgate-aggregator");
        assert_eq!(c.kafka.ingest_group_id, "tollgate-ingest");
        assert_eq!(c.windows.allowed_lateness_s, 10);
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.quota.topic, "quota-state");
        assert!(c.quota.plans.is_empty());
        let c =
            Config::parse(&format!("{MINIMAL}[quota.plans.free]\nmonthly_calls = 100\n"), &BTreeMap::new()).unwrap();
        let free = &c.quota.plans["free"];
        assert_eq!(
            (free.monthly_calls, free.enforcement, free.warning_percent),
            (100, tollgate_schemas::quota::Enforcement::Hard, 80)
        );
    }

    #[test]
    fn slo_defaults_and_rules() {
        let c = Config::parse(MINIMAL, &BTreeMap::new()).unwrap();
        assert!(!c.slo.enabled());
        let c = Config::parse(
            &format!(
                "{MINIMAL}[slo]\nwebhook_url = \"https://alerts.example/hook\"\n\
                 [[slo.objectives]]\nid = \"api\"\nkind = \"latency\"\nobjective_percent = 99.5\nlatency_threshold_ms = 250\n\
                 route = \"echo\"\nper_consumer = true\n"
            ),
            &BTreeMap::new(),
        )
        .unwrap();
        let o = &c.slo.objectives[0];
        assert_eq!(o.kind, crate::slo::Kind::Latency { threshold_us: 250_000 });
        assert!((o.budget() - 0.005).abs() < 1e-12);
        assert_eq!((o.route.as_deref(), o.per_consumer, o.min_requests), (Some("echo"), true, 10));
        assert_eq!(o.rules, crate::slo::config::default_rules());
        // The rules' windows; the 30-day budget period is only evaluated for objectives over
        // all calls, and this one is per consumer.
        assert_eq!(c.slo.windows(), vec![5, 30, 60, 360, 4320]);
        assert_eq!(c.slo.windows_for(false), Vec::<u32>::new());
        assert_eq!(c.slo.stale_after_s, 600);
        assert_eq!(c.slo.receivers.len(), 1);
        let hook = &c.slo.receivers[0];
        assert_eq!((hook.url.to_string().as_str(), hook.timeout.as_millis()), ("https://alerts.example/hook", 5000));
        // `slo.webhook_url` is one receiver, `webhook`, of every severity.
        assert_eq!((hook.name.as_str(), hook.takes("page"), hook.takes("anything")), ("webhook", true, true));
        // The webhook's secret from the environment.
        let env = [
            ("TOLLGATE_AGGREGATOR_SLO__WEBHOOK_URL".to_owned(), "http://127.0.0.1:9/x".to_owned()),
            ("TOLLGATE_AGGREGATOR_SLO__WEBHOOK_HEADERS__AUTHORIZATION".to_owned(), "Bearer s3cret".to_owned()),
        ]
        .into();
        let c = Config::parse(MINIMAL, &env).unwrap();
        let hook = &c.slo.receivers[0];
        assert_eq!(hook.headers.len(), 1);
        assert_eq!(
            (hook.headers[0].0.as_str(), hook.headers[0].1.to_str().unwrap()),
            ("authorization", "Bearer s3cret")
        );
        assert!(hook.headers[0].1.is_sensitive());
        // PagerDuty, its routing key from the environment.
        let env = [("TOLLGATE_AGGREGATOR_SLO__PAGERDUTY_ROUTING_KEY".to_owned(), "0123abcd".to_owned())].into();
        let c = Config::parse(
            &format!(
                "{MINIMAL}[slo]\nwebhook_url = \"https://events.pagerduty.com/v2/enqueue\"\nwebhook_format = \"pagerduty\"\n"
            ),
            &env,
        )
        .unwrap();
        let format = &c.slo.receivers[0].format;
        assert_eq!(format, &crate::slo::Format::PagerDuty { routing_key: "0123abcd".into() });
        let c = Config::parse(
            &format!("{MINIMAL}[slo]\nwebhook_url = \"http://127.0.0.1:9093/api/v2/alerts\"\nwebhook_format = \"alertmanager\"\n"),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(c.slo.receivers[0].format, crate::slo::Format::Alertmanager);
        assert!(c.slo.repeats_firing());
    }

    #[test]
    fn slo_receivers_each_with_their_severities_and_secrets_from_the_environment() {
        let env = [
            ("TOLLGATE_AGGREGATOR_SLO__RECEIVERS__ONCALL__PAGERDUTY_ROUTING_KEY".to_owned(), "pd-key".to_owned()),
            ("TOLLGATE_AGGREGATOR_SLO__RECEIVERS__CHAT__HEADERS__AUTHORIZATION".to_owned(), "Bearer t".to_owned()),
        ]
        .into();
        let c = Config::parse(
            &format!(
                "{MINIMAL}[slo.receivers.oncall]\nurl = \"https://events.pagerduty.com/v2/enqueue\"\nformat = \"pagerduty\"\n\
                 severities = [\"page\"]\n\
                 [slo.receivers.chat]\nurl = \"https://hooks.example/T1\"\nformat = \"slack\"\ntimeout_ms = 1500\n"
            ),
            &env,
        )
        .unwrap();
        let names: Vec<&str> = c.slo.receivers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["chat", "oncall"]);
        let (chat, oncall) = (&c.slo.receivers[0], &c.slo.receivers[1]);
        assert_eq!(oncall.format, crate::slo::Format::PagerDuty { routing_key: "pd-key".into() });
        assert!(oncall.takes("page") && !oncall.takes("ticket"));
        assert_eq!((chat.format.clone(), chat.timeout.as_millis()), (crate::slo::Format::Slack, 1500));
        assert!(chat.takes("page") && chat.takes("ticket"));
        assert_eq!(chat.headers[0].1.to_str().unwrap(), "Bearer t");
        assert!(!c.slo.repeats_firing());
        // The PagerDuty receiver without its key names the variable that sets it.
        let err = Config::parse(
            &format!("{MINIMAL}[slo.receivers.oncall]\nurl = \"https://pd.example/\"\nformat = \"pagerduty\"\n"),
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("slo.receivers.oncall.pagerduty_routing_key"), "{err}");
        assert!(err.contains("TOLLGATE_AGGREGATOR_SLO__RECEIVERS__ONCALL__PAGERDUTY_ROUTING_KEY"), "{err}");
    }

    #[test]
    fn an_objective_may_have_its_own_rules() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}[[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 60\nshort_window_minutes = 5\nburn_rate = 10\n\
                 [[slo.objectives]]\nid = \"api\"\nkind = \"availability\"\nobjective_percent = 99.9\n\
                 [[slo.objectives]]\nid = \"slow\"\nkind = \"latency\"\nobjective_percent = 99\nlatency_threshold_ms = 500\n\
                 [[slo.objectives.rules]]\nseverity = \"ticket\"\nlong_window_minutes = 1440\nshort_window_minutes = 120\nburn_rate = 1\n"
            ),
            &BTreeMap::new(),
        )
        .unwrap();
        let rule = |severity: &str, long_minutes, short_minutes, burn_rate| crate::slo::Rule {
            severity: severity.into(),
            long_minutes,
            short_minutes,
            burn_rate,
        };
        assert_eq!(c.slo.objectives[0].rules, vec![rule("page", 60, 5, 10.0)]);
        assert_eq!(c.slo.objectives[1].rules, vec![rule("ticket", 1440, 120, 1.0)]);
        // The windows of every objective's rules are computed, and the budget period's.
        assert_eq!(c.slo.windows(), vec![5, 60, 120, 1440, 43200]);
        let off = Config::parse(
            &format!(
                "{MINIMAL}[slo]\nbudget_period_days = 7\n[[slo.objectives]]\nid = \"api\"\nkind = \"availability\"\nobjective_percent = 99.9\n"
            ),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(off.slo.windows(), vec![5, 30, 60, 360, 4320, 7 * 1440]);
        let off = Config::parse(
            &format!(
                "{MINIMAL}[slo]\nbudget_period_days = 0\n[[slo.objectives]]\nid = \"api\"\nkind = \"availability\"\nobjective_percent = 99.9\n"
            ),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(off.slo.windows(), vec![5, 30, 60, 360, 4320], "0: no budget period");
        let bad = format!(
            "{MINIMAL}[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99\n\
             [[slo.objectives.rules]]\nseverity = \"page\"\nlong_window_minutes = 60\nshort_window_minutes = 60\nburn_rate = 1\n"
        );
        let e = Config::parse(&bad, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("slo.objectives[0].rules[0].short_window_minutes"), "{e}");
        let e = Config::parse(
            &format!(
                "{MINIMAL}[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99\nrules = []\n"
            ),
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("slo.objectives[0].rules"), "{e}");
    }

    #[test]
    fn the_readmes_slo_example_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme.find("```toml\n[slo]\n").unwrap() + "```toml\n".len();
        let len = readme[start..].find("```").unwrap();
        let c = Config::parse(&format!("{MINIMAL}{}", &readme[start..start + len]), &BTreeMap::new()).unwrap();
        assert_eq!(c.slo.objectives.len(), 2);
        assert_eq!(c.slo.objectives[1].rules[0].severity, "ticket");
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for (name, text) in [
            ("config/demo/aggregator.toml", include_str!("../../config/demo/aggregator.toml")),
            ("config/compose/aggregator.toml", include_str!("../../config/compose/aggregator.toml")),
        ] {
            let c = Config::parse(text, &BTreeMap::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(c.slo.enabled(), "{name}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[windows]\nidle_close_ms = 0\n", "windows.idle_close_ms"),
            ("[windows]\nallowed_lateness_s = 100000\n", "windows.allowed_lateness_s"),
            ("[windows]\nallowed_lateness_s = -1\n", "windows.allowed_lateness_s"),
            ("[admin]\nlisten = \"nowhere\"\n", "admin.listen"),
            ("[retry]\ninitial_backoff_ms = 10\nmax_backoff_ms = 5\n", "retry.max_backoff_ms"),
            ("[windows]\nlateness = 1\n", "lateness"),
            ("[quota.plans.free]\nmonthly_calls = 10\nenforcement = \"strict\"\n", "quota.plans.free.enforcement"),
            ("[quota.plans.free]\nmonthly_calls = 10\nwarning_percent = 0\n", "quota.plans.free.warning_percent"),
            ("[quota.plans.free]\nmonthly_calls = -1\n", "quota.plans.free.monthly_calls"),
            ("[quota]\ntopic = \"api-calls\"\n", "quota.topic"),
            ("[quota]\nperiod_anchor_day = 31\n", "quota.period_anchor_day"),
            ("[slo]\nwebhook_url = \"ftp://x\"\n", "slo.webhook_url"),
            (
                "[slo]\nwebhook_url = \"http://x\"\nwebhook_headers = { \"bad name\" = \"v\" }\n",
                "slo.webhook_headers.bad name",
            ),
            ("[slo]\nstale_after_s = 0\n", "slo.stale_after_s"),
            ("[slo]\nbudget_period_days = 32\n", "slo.budget_period_days"),
            ("[slo]\nwebhook_url = \"http://x\"\nwebhook_format = \"teams\"\n", "slo.webhook_format"),
            ("[slo]\nwebhook_format = \"slack\"\n", "slo.webhook_format"),
            ("[slo]\nwebhook_url = \"http://x\"\nwebhook_format = \"pagerduty\"\n", "slo.pagerduty_routing_key"),
            (
                "[slo]\nwebhook_url = \"http://x\"\nwebhook_format = \"pagerduty\"\npagerduty_routing_key = \"a b\"\n",
                "slo.pagerduty_routing_key",
            ),
            ("[slo]\nwebhook_url = \"http://x\"\npagerduty_routing_key = \"k\"\n", "slo.pagerduty_routing_key"),
            ("[slo]\nwebhook_url = \"https://x\"\nwebhook_ca_file = \"/nonexistent/ca.pem\"\n", "slo.webhook_ca_file"),
            ("[slo]\nwebhook_url = \"https://x\"\nwebhook_ca_file = \"Cargo.toml\"\n", "slo.webhook_ca_file"),
            ("[slo]\nrules = []\n", "slo.rules"),
            ("[slo.receivers.a]\nurl = \"ftp://x\"\n", "slo.receivers.a.url"),
            ("[slo.receivers.a]\nformat = \"slack\"\n", "slo.receivers.a"),
            ("[slo.receivers.a]\nurl = \"http://x\"\nformat = \"teams\"\n", "slo.receivers.a.format"),
            ("[slo.receivers.a]\nurl = \"http://x\"\ntimeout_ms = 0\n", "slo.receivers.a.timeout_ms"),
            ("[slo.receivers.a]\nurl = \"http://x\"\nheaders = { \"a b\" = \"v\" }\n", "slo.receivers.a.headers.a b"),
            ("[slo.receivers.a]\nurl = \"https://x\"\nca_file = \"Cargo.toml\"\n", "slo.receivers.a.ca_file"),
            ("[slo.receivers.a]\nurl = \"http://x\"\nseverities = []\n", "slo.receivers.a.severities"),
            ("[slo.receivers.a]\nurl = \"http://x\"\nseverities = [\"pgae\"]\n", "slo.receivers.a.severities"),
            ("[slo.receivers.a]\nurl = \"http://x\"\ncolour = \"red\"\n", "slo.receivers.a.colour"),
            ("[slo.receivers.On-Call]\nurl = \"http://x\"\n", "slo.receivers.On-Call"),
            ("[slo]\nwebhook_url = \"http://x\"\n[slo.receivers.a]\nurl = \"http://y\"\n", "slo.receivers.a"),
            (
                "[[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 5\nshort_window_minutes = 5\nburn_rate = 2\n",
                "slo.rules[0].short_window_minutes",
            ),
            (
                "[[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 50000\nshort_window_minutes = 5\nburn_rate = 2\n",
                "slo.rules[0].long_window_minutes",
            ),
            (
                "[[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 60\nshort_window_minutes = 5\nburn_rate = 0\n",
                "slo.rules[0].burn_rate",
            ),
            (
                "[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 100\n",
                "slo.objectives[0].objective_percent",
            ),
            ("[[slo.objectives]]\nid = \"a\"\nkind = \"speed\"\nobjective_percent = 99\n", "slo.objectives[0].kind"),
            (
                "[[slo.objectives]]\nid = \"a\"\nkind = \"latency\"\nobjective_percent = 99\n",
                "slo.objectives[0].latency_threshold_ms",
            ),
            (
                "[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99\nlatency_threshold_ms = 5\n",
                "slo.objectives[0].latency_threshold_ms",
            ),
            (
                "[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99\n\
                 [[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99.9\n",
                "slo.objectives[1].id",
            ),
            (
                "[[slo.objectives]]\nid = \"a b\"\nkind = \"availability\"\nobjective_percent = 99\n",
                "slo.objectives[0].id",
            ),
            (
                "[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective_percent = 99\nper_consumer = true\nconsumer = \"x\"\n",
                "slo.objectives[0].per_consumer",
            ),
            ("[[slo.objectives]]\nid = \"a\"\nkind = \"availability\"\nobjective = 99\n", "objective"),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{MINIMAL}{extra}"), &BTreeMap::new()).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let env = [("TOLLGATE_AGGREGATOR_KAFKA__GROUP_ID".to_owned(), "tollgate-ingest".to_owned())].into();
        let err = Config::parse(MINIMAL, &env).unwrap_err().to_string();
        assert!(err.contains("kafka.group_id"), "{err}");
    }
}
