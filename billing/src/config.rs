//! Billing configuration: a TOML file, overridable with `TOLLGATE_BILLING_<SECTION>__<KEY>`.
//! Prices are decimal strings (`"0.0004"`), never floats.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rust_decimal::Decimal;
use serde::Deserialize;
use tollgate_common::config::{self, ConfigError};
use tollgate_schemas::Outcome;
pub use tollgate_schemas::store::ClickHouseConfig;
use tollgate_schemas::store::RawClickHouse;

use crate::invoice::Seller;
use crate::money::Currency;
use crate::pricing::{Mode, Plan, Sla, Tier};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_BILLING_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    clickhouse: RawClickHouse,
    seller: RawSeller,
    #[serde(default)]
    billing: RawBilling,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeller {
    name: String,
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    #[serde(default = "default_grace_hours")]
    grace_hours: u32,
}

impl Default for RawBilling {
    fn default() -> Self {
        Self { grace_hours: default_grace_hours() }
    }
}

fn default_grace_hours() -> u32 {
    24
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    currency: String,
    #[serde(default = "zero")]
    monthly_fee: String,
    #[serde(default)]
    included_units: u64,
    #[serde(default = "default_mode")]
    pricing: String,
    #[serde(default)]
    tiers: Vec<RawTier>,
    #[serde(default = "zero")]
    minimum_charge: String,
    #[serde(default)]
    route_weights: BTreeMap<String, u64>,
    #[serde(default = "default_outcomes")]
    billable_outcomes: Vec<String>,
    #[serde(default = "default_below_status")]
    billable_below_status: u16,
    #[serde(default)]
    sla: Option<RawSla>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    #[serde(default)]
    up_to: Option<u64>,
    unit_price: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSla {
    #[serde(default)]
    availability_percent: Option<String>,
    #[serde(default)]
    p99_ms: Option<u64>,
    credit_percent: String,
}

fn zero() -> String {
    "0".to_owned()
}
fn default_mode() -> String {
    "graduated".to_owned()
}
fn default_outcomes() -> Vec<String> {
    vec!["forwarded".to_owned()]
}
fn default_below_status() -> u16 {
    500
}

/// Validated billing configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub clickhouse: ClickHouseConfig,
    pub seller: Seller,
    /// A period can be closed this long after it ends (late events arrive meanwhile).
    pub grace_hours: u32,
    pub plans: BTreeMap<String, Plan>,
}

impl Config {
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::load(path, ENV_PREFIX, env)?;
        Self::validate(raw, &path.display().to_string())
    }

    pub fn parse(text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let raw: Raw = config::parse(text, "<inline>", ENV_PREFIX, env)?;
        Self::validate(raw, "<inline>")
    }

    fn validate(raw: Raw, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::invalid(origin, key, reason);
        let clickhouse = raw.clickhouse.validate().map_err(|(key, reason)| invalid(key, reason))?;
        if raw.seller.name.trim().is_empty() {
            return Err(invalid("seller.name", "must not be empty (it heads every invoice)"));
        }
        let mut plans = BTreeMap::new();
        for (id, p) in raw.plans {
            let key = |k: &str| format!("plans.{id}.{k}");
            let money = |k: &str, v: &str| -> Result<Decimal, ConfigError> {
                let d = Decimal::from_str_exact(v.trim()).map_err(|_| {
                    invalid(&key(k), &format!("`{v}` is not a decimal number (write prices as strings: \"0.0004\")"))
                })?;
                if d.is_sign_negative() {
                    return Err(invalid(&key(k), "must not be negative"));
                }
                Ok(d)
            };
            let currency = Currency::parse(&p.currency).ok_or_else(|| {
                invalid(&key("currency"), "must be an ISO 4217 code in upper case, like USD, EUR or JPY")
            })?;
            let mode = match p.pricing.as_str() {
                "graduated" => Mode::Graduated,
                "volume" => Mode::Volume,
                _ => return Err(invalid(&key("pricing"), "must be \"graduated\" or \"volume\"")),
            };
            if p.tiers.is_empty() {
                return Err(invalid(&key("tiers"), "needs at least one tier (the last one without up_to)"));
            }
            let mut tiers = Vec::new();
            let mut last = 0;
            for (i, t) in p.tiers.iter().enumerate() {
                let tk = format!("tiers[{i}]");
                let is_last = i + 1 == p.tiers.len();
                match (t.up_to, is_last) {
                    (None, false) => {
                        return Err(invalid(&key(&format!("{tk}.up_to")), "only the last tier may omit up_to"));
                    }
                    (Some(_), true) => {
                        return Err(invalid(
                            &key(&format!("{tk}.up_to")),
                            "the last tier must omit up_to (it has no end)",
                        ));
                    }
                    (Some(u), false) if u <= last => {
                        return Err(invalid(
                            &key(&format!("{tk}.up_to")),
                            "tiers must go up: up_to larger than the previous tier's",
                        ));
                    }
                    _ => {}
                }
                last = t.up_to.unwrap_or(last);
                tiers.push(Tier { up_to: t.up_to, unit_price: money(&format!("{tk}.unit_price"), &t.unit_price)? });
            }
            let mut outcomes = BTreeSet::new();
            for o in &p.billable_outcomes {
                if Outcome::from_symbol(o).is_none() {
                    return Err(invalid(&key("billable_outcomes"), &format!("unknown outcome `{o}`")));
                }
                outcomes.insert(o.clone());
            }
            if !p.billable_below_status.is_multiple_of(100) || !(100..=600).contains(&p.billable_below_status) {
                return Err(invalid(
                    &key("billable_below_status"),
                    "must be 100, 200, ... or 600 (usage is counted by status class)",
                ));
            }
            if let Some((route, _)) = p.route_weights.iter().find(|(_, w)| **w == 0) {
                return Err(invalid(&key(&format!("route_weights.{route}")), "must be at least 1"));
            }
            let sla = match p.sla {
                None => None,
                Some(s) => {
                    let availability = match &s.availability_percent {
                        None => None,
                        Some(a) => {
                            let a = money("sla.availability_percent", a)?;
                            if a > Decimal::ONE_HUNDRED {
                                return Err(invalid(&key("sla.availability_percent"), "must be at most 100"));
                            }
                            Some(a)
                        }
                    };
                    if availability.is_none() && s.p99_ms.is_none() {
                        return Err(invalid(&key("sla"), "promises nothing: set availability_percent and/or p99_ms"));
                    }
                    let credit = money("sla.credit_percent", &s.credit_percent)?;
                    if credit > Decimal::ONE_HUNDRED {
                        return Err(invalid(&key("sla.credit_percent"), "must be at most 100"));
                    }
                    Some(Sla { availability_percent: availability, p99_ms: s.p99_ms, credit_percent: credit })
                }
            };
            plans.insert(
                id.clone(),
                Plan {
                    id: id.clone(),
                    currency,
                    monthly_fee: money("monthly_fee", &p.monthly_fee)?,
                    included_units: p.included_units,
                    mode,
                    tiers,
                    minimum_charge: money("minimum_charge", &p.minimum_charge)?,
                    route_weights: p.route_weights,
                    billable_outcomes: outcomes,
                    billable_below_status: p.billable_below_status,
                    sla,
                },
            );
        }
        Ok(Config {
            clickhouse,
            seller: Seller { name: raw.seller.name, address: raw.seller.address },
            grace_hours: raw.billing.grace_hours,
            plans,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\n[seller]\nname = \"Acme Billing\"\n";
    const PLAN: &str = "[plans.pro]\ncurrency = \"USD\"\nmonthly_fee = \"49.00\"\nincluded_units = 1000\n\
                        tiers = [{ up_to = 10000, unit_price = \"0.001\" }, { unit_price = \"0.0005\" }]\n\
                        route_weights = { search = 5 }\n[plans.pro.sla]\navailability_percent = \"99.9\"\ncredit_percent = \"10\"\n";

    #[test]
    fn parses_a_plan() {
        let c = Config::parse(&format!("{BASE}{PLAN}"), &BTreeMap::new()).unwrap();
        let p = &c.plans["pro"];
        assert_eq!(p.monthly_fee.to_string(), "49.00");
        assert_eq!(p.tiers.len(), 2);
        assert_eq!(p.route_weights["search"], 5);
        assert_eq!(p.billable_outcomes, BTreeSet::from(["forwarded".to_owned()]));
        assert_eq!(c.grace_hours, 24);
    }

    #[test]
    fn bad_values_name_their_key() {
        let p = "[plans.p]\ncurrency = \"USD\"\n";
        let cases = [
            (format!("{p}tiers = [{{ unit_price = 0.1 }}]\n"), "plans.p.tiers[0].unit_price"),
            (format!("{p}tiers = [{{ unit_price = \"abc\" }}]\n"), "plans.p.tiers[0].unit_price"),
            (format!("{p}tiers = [{{ unit_price = \"-1\" }}]\n"), "plans.p.tiers[0].unit_price"),
            (format!("{p}tiers = [{{ up_to = 5, unit_price = \"1\" }}]\n"), "plans.p.tiers[0].up_to"),
            (format!("{p}tiers = [{{ unit_price = \"1\" }}, {{ unit_price = \"1\" }}]\n"), "plans.p.tiers[0].up_to"),
            (
                format!(
                    "{p}tiers = [{{ up_to = 5, unit_price = \"1\" }}, {{ up_to = 5, unit_price = \"1\" }}, {{ unit_price = \"1\" }}]\n"
                ),
                "plans.p.tiers[1].up_to",
            ),
            (format!("{p}tiers = []\n"), "plans.p.tiers"),
            ("[plans.p]\ncurrency = \"usd\"\ntiers = [{ unit_price = \"1\" }]\n".to_owned(), "plans.p.currency"),
            (format!("{p}pricing = \"flat\"\ntiers = [{{ unit_price = \"1\" }}]\n"), "plans.p.pricing"),
            (
                format!("{p}billable_outcomes = [\"ok\"]\ntiers = [{{ unit_price = \"1\" }}]\n"),
                "plans.p.billable_outcomes",
            ),
            (
                format!("{p}route_weights = {{ a = 0 }}\ntiers = [{{ unit_price = \"1\" }}]\n"),
                "plans.p.route_weights.a",
            ),
            (format!("{p}tiers = [{{ unit_price = \"1\" }}]\n[plans.p.sla]\ncredit_percent = \"5\"\n"), "plans.p.sla"),
            (
                format!(
                    "{p}tiers = [{{ unit_price = \"1\" }}]\n[plans.p.sla]\np99_ms = 100\ncredit_percent = \"500\"\n"
                ),
                "plans.p.sla.credit_percent",
            ),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{BASE}{extra}"), &BTreeMap::new()).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = Config::parse("[clickhouse]\nurl = \"http://x\"\n[seller]\nname = \" \"\n", &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("seller.name"), "{err}");
    }
}
