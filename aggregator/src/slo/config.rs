//! `[slo]`: objectives, multiwindow burn-rate alert rules and the receivers of the alerts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlo {
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default = "default_webhook_timeout_ms")]
    webhook_timeout_ms: u64,
    #[serde(default)]
    webhook_headers: BTreeMap<String, String>,
    #[serde(default)]
    webhook_ca_file: Option<String>,
    #[serde(default)]
    webhook_format: Option<String>,
    #[serde(default)]
    pagerduty_routing_key: Option<String>,
    /// `[slo.receivers.<name>]`: several receivers, each for some severities.
    #[serde(default)]
    receivers: BTreeMap<String, RawReceiver>,
    #[serde(default = "default_stale_after_s")]
    stale_after_s: u32,
    #[serde(default = "default_budget_period_days")]
    budget_period_days: u32,
    #[serde(default)]
    objectives: Vec<RawObjective>,
    #[serde(default)]
    rules: Option<Vec<RawRule>>,
}

impl Default for RawSlo {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_timeout_ms: default_webhook_timeout_ms(),
            webhook_headers: BTreeMap::new(),
            webhook_ca_file: None,
            webhook_format: None,
            pagerduty_routing_key: None,
            receivers: BTreeMap::new(),
            stale_after_s: default_stale_after_s(),
            budget_period_days: default_budget_period_days(),
            objectives: Vec::new(),
            rules: None,
        }
    }
}

/// `[slo.receivers.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReceiver {
    url: String,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    pagerduty_routing_key: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default = "default_webhook_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    severities: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjective {
    id: String,
    kind: String,
    objective_percent: f64,
    #[serde(default)]
    latency_threshold_ms: Option<f64>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    consumer: Option<String>,
    #[serde(default)]
    per_consumer: bool,
    #[serde(default = "default_min_requests")]
    min_requests: u64,
    /// This objective's own rules, instead of `[[slo.rules]]`.
    #[serde(default)]
    rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    severity: String,
    long_window_minutes: u32,
    short_window_minutes: u32,
    burn_rate: f64,
}

fn default_webhook_timeout_ms() -> u64 {
    5_000
}
fn default_stale_after_s() -> u32 {
    600
}
fn default_budget_period_days() -> u32 {
    30
}
fn default_min_requests() -> u64 {
    10
}

/// The longest window a rule may use: 31 days.
pub const MAX_WINDOW_MINUTES: u32 = 31 * 24 * 60;

/// Validated `[slo]`.
#[derive(Debug, Clone, Default)]
pub struct SloConfig {
    /// Each with its rules: its own, or `[[slo.rules]]` (or the defaults).
    pub objectives: Vec<Objective>,
    /// Where notifications go: `[slo.receivers.<name>]`, or the one receiver `webhook` of
    /// `slo.webhook_url`; none: they are only recorded.
    pub receivers: Vec<Webhook>,
    /// Windows ending longer ago than this are not evaluated (a catch-up or a replay from
    /// offset 0 does not alert on the past).
    pub stale_after_s: i64,
    /// The error budget's period in minutes (`slo.budget_period_days`; 0: not computed): its
    /// window is evaluated with the rules' windows, so `slo_burn_rate` holds the share of the
    /// period's budget spent (1 − it is what is left).
    pub budget_period_minutes: u32,
}

impl SloConfig {
    pub fn enabled(&self) -> bool {
        !self.objectives.is_empty()
    }

    /// Whether the alerts that keep firing are sent again at every evaluation (Alertmanager
    /// forgets an alert that is not).
    pub fn repeats_firing(&self) -> bool {
        self.receivers.iter().any(|h| h.format == Format::Alertmanager)
    }

    /// Every window length evaluated for objectives over all calls (`per_consumer` false) or
    /// per consumer, ascending: the windows of those objectives' rules, and for objectives
    /// over all calls the budget period. (Per consumer the period is read apart, by days:
    /// `windows::PeriodCache`; the rules' hour cache would hold a period's hours of every
    /// consumer.)
    pub fn windows_for(&self, per_consumer: bool) -> Vec<u32> {
        let mine = || self.objectives.iter().filter(move |o| o.per_consumer == per_consumer);
        let mut set: BTreeSet<u32> =
            mine().flat_map(|o| &o.rules).flat_map(|r| [r.long_minutes, r.short_minutes]).collect();
        if !per_consumer && self.budget_period_minutes > 0 && mine().next().is_some() {
            set.insert(self.budget_period_minutes);
        }
        set.into_iter().collect()
    }

    /// Every window length evaluated, ascending.
    pub fn windows(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.windows_for(false).into_iter().chain(self.windows_for(true)).collect();
        set.into_iter().collect()
    }
}

/// What an objective counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Good: calls the upstream answered below 500. Bad: 5xx answers, upstream errors and
    /// timeouts, calls cut by an edge's shutdown. Calls refused before forwarding (401, 403,
    /// 429, 400, no route) and calls the client abandoned count neither way.
    Availability,
    /// Of the forwarded calls, bad: those slower than the threshold (µs).
    Latency { threshold_us: u64 },
}

#[derive(Debug, Clone)]
pub struct Objective {
    pub id: String,
    pub kind: Kind,
    /// Target share of good calls, as a fraction (99.9 % → 0.999).
    pub objective: f64,
    pub route: Option<String>,
    pub consumer: Option<String>,
    /// One alert per consumer instead of one for all calls.
    pub per_consumer: bool,
    /// Fewer calls than this in a rule's long window never fire it.
    pub min_requests: u64,
    /// Its alert rules: its own `rules`, or `[[slo.rules]]`.
    pub rules: Vec<Rule>,
}

impl Objective {
    /// The share of calls the objective allows to be bad.
    pub fn budget(&self) -> f64 {
        1.0 - self.objective
    }
}

/// Fires when both windows burn the error budget at least `burn_rate` times as fast as the
/// objective allows (and resolves when either stops).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub severity: String,
    pub long_minutes: u32,
    pub short_minutes: u32,
    pub burn_rate: f64,
}

/// The default rules: the multiwindow, multi-burn-rate alerts of Google's SRE workbook for a
/// 30-day budget (2 % of it burnt in an hour or 5 % in six hours pages; 10 % in three days
/// opens a ticket).
pub fn default_rules() -> Vec<Rule> {
    let r = |severity: &str, long_minutes, short_minutes, burn_rate| Rule {
        severity: severity.to_owned(),
        long_minutes,
        short_minutes,
        burn_rate,
    };
    vec![r("page", 60, 5, 14.4), r("page", 360, 30, 6.0), r("ticket", 4320, 360, 1.0)]
}

/// What the webhook receives.
#[derive(Clone, PartialEq)]
pub enum Format {
    /// tollgate's notification (docs/ARCHITECTURE.md, "SLOs and alerts").
    Json,
    /// A Slack incoming webhook's `{"text": …}` (also Mattermost, Rocket.Chat).
    Slack,
    /// A PagerDuty Events API v2 event: trigger on firing, resolve on resolved, deduplicated
    /// by the alert's id.
    PagerDuty { routing_key: String },
    /// Prometheus Alertmanager's API (`POST /api/v2/alerts`): firing alerts are sent again at
    /// every evaluation, since Alertmanager resolves an alert that is not.
    Alertmanager,
}

impl std::fmt::Debug for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Json => f.write_str("Json"),
            Format::Slack => f.write_str("Slack"),
            Format::Alertmanager => f.write_str("Alertmanager"),
            // The routing key is a secret.
            Format::PagerDuty { .. } => f.write_str("PagerDuty { routing_key: <redacted> }"),
        }
    }
}

/// One receiver of the notifications.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `webhook` for `slo.webhook_url`, else its name in `[slo.receivers.<name>]`: in logs and
    /// metrics.
    pub name: String,
    pub url: http::Uri,
    pub format: Format,
    pub timeout: Duration,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Trusts the web PKI plus its CA file (`slo.webhook_ca_file`, `ca_file`).
    pub tls: std::sync::Arc<tollgate_common::tls::ClientConfig>,
    /// The severities it receives; empty: all.
    pub severities: Vec<String>,
}

impl Webhook {
    /// Whether alerts of `severity` go to this receiver.
    pub fn takes(&self, severity: &str) -> bool {
        self.severities.is_empty() || self.severities.iter().any(|s| s == severity)
    }
}

/// A receiver's name is a key of `[slo.receivers]`: lower case, so that
/// `TOLLGATE_AGGREGATOR_SLO__RECEIVERS__<NAME>__<KEY>` (read in lower case) can set its keys.
fn valid_receiver_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Validates one receiver; `key` names each of its fields as the configuration spells it
/// (`url` → `slo.webhook_url` or `slo.receivers.<name>.url`).
fn receiver(
    name: String,
    raw: RawReceiver,
    key: &dyn Fn(&str) -> String,
    base: &std::path::Path,
) -> Result<Webhook, (String, String)> {
    let err = |k: &str, reason: &str| Err((key(k), reason.to_owned()));
    let format = match (raw.format.as_deref().unwrap_or("json"), raw.pagerduty_routing_key) {
        ("json", None) => Format::Json,
        ("slack", None) => Format::Slack,
        ("alertmanager", None) => Format::Alertmanager,
        ("pagerduty", Some(k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Format::PagerDuty { routing_key: k }
        }
        ("pagerduty", _) => {
            let var = format!("TOLLGATE_AGGREGATOR_{}", key("pagerduty_routing_key").replace('.', "__").to_uppercase());
            return Err((
                key("pagerduty_routing_key"),
                format!(
                    "must be set for format \"pagerduty\": the integration key of a PagerDuty Events API v2 \
                     service (visible ASCII; set it from {var})"
                ),
            ));
        }
        ("json" | "slack" | "alertmanager", Some(_)) => {
            return err("pagerduty_routing_key", "applies only to the \"pagerduty\" format");
        }
        _ => return err("format", "must be \"json\", \"slack\", \"pagerduty\" or \"alertmanager\""),
    };
    let url: http::Uri = match raw.url.parse() {
        Ok(u) => u,
        Err(_) => return err("url", "must be an http:// or https:// URL"),
    };
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
        return err("url", "must be an http:// or https:// URL");
    }
    if raw.timeout_ms == 0 {
        return err("timeout_ms", "must be at least 1");
    }
    let mut headers = Vec::new();
    for (h, value) in raw.headers {
        let k = format!("{}.{h}", key("headers"));
        let Ok(n) = http::HeaderName::from_bytes(h.as_bytes()) else {
            return Err((k, "is not a valid HTTP header name".into()));
        };
        let Ok(mut v) = http::HeaderValue::from_str(&value) else {
            return Err((k, "must be visible ASCII text".into()));
        };
        v.set_sensitive(true);
        headers.push((n, v));
    }
    let certs = match raw.ca_file {
        None => Vec::new(),
        Some(f) => match tollgate_common::tls::read_ca_file(&base.join(&f), &f) {
            Ok(certs) => certs,
            Err(e) => return err("ca_file", &e),
        },
    };
    let tls = match tollgate_common::tls::client_config(&certs) {
        Ok(tls) => tls,
        Err(e) => return err("ca_file", &e),
    };
    let severities = match raw.severities {
        None => Vec::new(),
        Some(s) if s.is_empty() => return err("severities", "must not be empty (omit it for every severity)"),
        Some(s) => s,
    };
    Ok(Webhook { name, url, format, timeout: Duration::from_millis(raw.timeout_ms), headers, tls, severities })
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Validates `[slo]` (relative paths from `base`, the config file's directory); errors are
/// (key, reason).
pub(crate) fn validate(raw: RawSlo, base: &std::path::Path) -> Result<SloConfig, (String, String)> {
    let err = |key: String, reason: &str| Err((key, reason.to_owned()));
    let mut receivers = Vec::new();
    match raw.webhook_url {
        Some(url) => {
            if let Some(name) = raw.receivers.keys().next() {
                return err(
                    format!("slo.receivers.{name}"),
                    "cannot be combined with slo.webhook_url (make that receiver one of [slo.receivers])",
                );
            }
            let legacy = RawReceiver {
                url,
                format: raw.webhook_format,
                pagerduty_routing_key: raw.pagerduty_routing_key,
                headers: raw.webhook_headers,
                ca_file: raw.webhook_ca_file,
                timeout_ms: raw.webhook_timeout_ms,
                severities: None,
            };
            let key = |k: &str| match k {
                "pagerduty_routing_key" => "slo.pagerduty_routing_key".to_owned(),
                k => format!("slo.webhook_{k}"),
            };
            receivers.push(receiver("webhook".into(), legacy, &key, base)?);
        }
        None => {
            for (k, set) in [
                ("slo.webhook_format", raw.webhook_format.is_some()),
                ("slo.pagerduty_routing_key", raw.pagerduty_routing_key.is_some()),
                ("slo.webhook_headers", !raw.webhook_headers.is_empty()),
                ("slo.webhook_ca_file", raw.webhook_ca_file.is_some()),
            ] {
                if set {
                    return err(k.into(), "needs slo.webhook_url (or set it on a receiver of [slo.receivers])");
                }
            }
            for (name, r) in raw.receivers {
                if !valid_receiver_name(&name) {
                    return err(
                        format!("slo.receivers.{name}"),
                        "a receiver's name must be lower-case letters, digits or '_' (so that \
                         TOLLGATE_AGGREGATOR_SLO__RECEIVERS__<NAME>__<KEY> can set its keys)",
                    );
                }
                let prefix = format!("slo.receivers.{name}");
                receivers.push(receiver(name, r, &|k: &str| format!("{prefix}.{k}"), base)?);
            }
        }
    }
    let rules = match raw.rules {
        None => default_rules(),
        Some(rules) => validate_rules(rules, "slo.rules")?,
    };
    let mut objectives: Vec<Objective> = Vec::new();
    for (i, o) in raw.objectives.into_iter().enumerate() {
        let key = |k: &str| format!("slo.objectives[{i}].{k}");
        if !valid_id(&o.id) {
            return err(key("id"), "must be a non-empty name of letters, digits, '-', '_' or '.'");
        }
        if objectives.iter().any(|p| p.id == o.id) {
            return err(key("id"), "is already the id of an earlier objective");
        }
        if !(o.objective_percent > 0.0 && o.objective_percent < 100.0) {
            return err(key("objective_percent"), "must be above 0 and below 100 (e.g. 99.9)");
        }
        let kind = match (o.kind.as_str(), o.latency_threshold_ms) {
            ("availability", None) => Kind::Availability,
            ("availability", Some(_)) => {
                return err(key("latency_threshold_ms"), "applies only to kind = \"latency\"");
            }
            ("latency", Some(ms)) if ms.is_finite() && ms > 0.0 && ms <= 3_600_000.0 => {
                Kind::Latency { threshold_us: (ms * 1000.0).round() as u64 }
            }
            ("latency", _) => {
                return err(
                    key("latency_threshold_ms"),
                    "must be set for kind = \"latency\", above 0 and at most 3600000",
                );
            }
            _ => return err(key("kind"), "must be \"availability\" or \"latency\""),
        };
        if o.per_consumer && o.consumer.is_some() {
            return err(key("per_consumer"), "cannot be combined with consumer (one consumer is one alert already)");
        }
        for (k, v) in [("route", &o.route), ("consumer", &o.consumer)] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return err(key(k), "must not be empty (omit it for all)");
            }
        }
        let own = match o.rules {
            None => rules.clone(),
            Some(r) => validate_rules(r, &key("rules"))?,
        };
        objectives.push(Objective {
            id: o.id,
            kind,
            objective: o.objective_percent / 100.0,
            route: o.route,
            consumer: o.consumer,
            per_consumer: o.per_consumer,
            min_requests: o.min_requests,
            rules: own,
        });
    }
    if raw.stale_after_s == 0 {
        return err("slo.stale_after_s".into(), "must be at least 1");
    }
    if raw.budget_period_days > MAX_WINDOW_MINUTES / (24 * 60) {
        return err("slo.budget_period_days".into(), "must be between 0 (off) and 31");
    }
    // A severity no rule has would route nothing to its receiver: a typo, said at start.
    let in_effect: Vec<&Rule> =
        if objectives.is_empty() { rules.iter().collect() } else { objectives.iter().flat_map(|o| &o.rules).collect() };
    let severities: BTreeSet<&str> = in_effect.iter().map(|r| r.severity.as_str()).collect();
    for r in &receivers {
        if let Some(s) = r.severities.iter().find(|s| !severities.contains(s.as_str())) {
            let known = severities.iter().copied().collect::<Vec<_>>().join(", ");
            return err(
                format!("slo.receivers.{}.severities", r.name),
                &format!("no alert rule has severity \"{s}\" (the rules' severities: {known})"),
            );
        }
    }
    Ok(SloConfig {
        objectives,
        receivers,
        stale_after_s: i64::from(raw.stale_after_s),
        budget_period_minutes: raw.budget_period_days * 24 * 60,
    })
}

/// Validates a list of rules (`key`: where it is, e.g. `slo.rules`).
fn validate_rules(rules: Vec<RawRule>, key: &str) -> Result<Vec<Rule>, (String, String)> {
    let err = |k: String, reason: &str| Err((k, reason.to_owned()));
    if rules.is_empty() {
        return err(key.to_owned(), "must not be empty (omit it for the defaults)");
    }
    let mut out = Vec::new();
    for (i, r) in rules.into_iter().enumerate() {
        let key = |k: &str| format!("{key}[{i}].{k}");
        if !valid_id(&r.severity) {
            return err(key("severity"), "must be a non-empty name of letters, digits, '-', '_' or '.'");
        }
        if r.long_window_minutes == 0 || r.long_window_minutes > MAX_WINDOW_MINUTES {
            return err(key("long_window_minutes"), "must be between 1 and 44640 (31 days)");
        }
        if r.short_window_minutes == 0 || r.short_window_minutes >= r.long_window_minutes {
            return err(key("short_window_minutes"), "must be at least 1 and shorter than long_window_minutes");
        }
        if !(r.burn_rate.is_finite() && r.burn_rate > 0.0) {
            return err(key("burn_rate"), "must be a number above 0");
        }
        let rule = Rule {
            severity: r.severity,
            long_minutes: r.long_window_minutes,
            short_minutes: r.short_window_minutes,
            burn_rate: r.burn_rate,
        };
        if out.iter().any(|o: &Rule| {
            (o.severity.as_str(), o.long_minutes, o.short_minutes)
                == (rule.severity.as_str(), rule.long_minutes, rule.short_minutes)
        }) {
            return err(key("severity"), "repeats the severity and windows of an earlier rule");
        }
        out.push(rule);
    }
    Ok(out)
}
