//! Plans and prices: from a consumer's billable usage in a period to invoice lines.
//!
//! - **Units**: billable calls × the route's weight (default 1), summed over routes.
//! - **Included units** are free; the rest are priced by the tiers, whose `up_to` bounds count
//!   chargeable units (after the included ones):
//!   - *graduated*: each tier prices the units that fall in it (one line per tier used);
//!   - *volume*: every chargeable unit at the price of the tier the total falls in.
//! - A **fixed fee** per period; a **minimum charge** tops the fee plus usage up to it.
//! - **SLA credit**: when the plan promises an availability and/or a P99 latency and the
//!   consumer's measured period misses one, a credit of `credit_percent` of the fee.
//!
//! Each line is rounded on its own (`money`); the total is the sum of the lines.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;

use crate::money::Currency;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Graduated,
    Volume,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Inclusive upper bound in chargeable units; `None` for the last tier.
    pub up_to: Option<u64>,
    pub unit_price: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sla {
    /// Promised share of attempted calls that do not fail with a 5xx, percent (e.g. 99.9).
    pub availability_percent: Option<Decimal>,
    /// Promised P99 latency of forwarded calls over the period, milliseconds.
    pub p99_ms: Option<u64>,
    /// Credit when missed, percent of the fixed fee.
    pub credit_percent: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub currency: Currency,
    pub monthly_fee: Decimal,
    pub included_units: u64,
    pub mode: Mode,
    pub tiers: Vec<Tier>,
    pub minimum_charge: Decimal,
    /// Units per call on a route (default 1).
    pub route_weights: BTreeMap<String, u64>,
    /// Outcomes that are billed (default `forwarded`).
    pub billable_outcomes: BTreeSet<String>,
    /// Statuses at or above this are not billed (default 500).
    pub billable_below_status: u16,
    pub sla: Option<Sla>,
}

/// A consumer's usage in a period, as billing needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    /// Billable calls per route.
    pub billable_calls: BTreeMap<String, u64>,
    /// Calls the edge tried to serve from an upstream (forwarded, upstream error or timeout).
    pub attempted: u64,
    /// Of those, answered with a 5xx.
    pub failed: u64,
    /// P99 latency of forwarded calls over the period (merged histograms), microseconds.
    pub p99_us: Option<u64>,
}

/// Billable calls of a route and the units they make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUnits {
    pub route: String,
    pub calls: u64,
    pub weight: u64,
    pub units: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LineKind {
    Fee,
    Included,
    Usage,
    Minimum,
    SlaCredit,
    Adjustment,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Fee => "fee",
            LineKind::Included => "included",
            LineKind::Usage => "usage",
            LineKind::Minimum => "minimum",
            LineKind::SlaCredit => "sla_credit",
            LineKind::Adjustment => "adjustment",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub kind: LineKind,
    pub description: String,
    pub quantity: Decimal,
    pub unit_price: Option<Decimal>,
    /// Rounded to the currency's minor unit.
    pub amount: Decimal,
    /// For an adjustment: the closed period it corrects.
    pub source_period: Option<String>,
}

/// What pricing found: the units per route, the SLA measurement and the lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub units: Vec<RouteUnits>,
    pub total_units: u64,
    pub availability_percent: Option<Decimal>,
    pub lines: Vec<Line>,
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prices `usage` with `plan`.
pub fn price(plan: &Plan, usage: &PeriodUsage) -> Priced {
    let cur = &plan.currency;
    let units: Vec<RouteUnits> = usage
        .billable_calls
        .iter()
        .map(|(route, &calls)| {
            let weight = plan.route_weights.get(route).copied().unwrap_or(1);
            RouteUnits { route: route.clone(), calls, weight, units: calls.saturating_mul(weight) }
        })
        .collect();
    let total_units: u64 = units.iter().map(|u| u.units).sum();
    let mut lines = vec![Line {
        kind: LineKind::Fee,
        description: format!("Monthly fee, plan {}", plan.id),
        quantity: Decimal::ONE,
        unit_price: Some(plan.monthly_fee),
        amount: cur.round(plan.monthly_fee),
        source_period: None,
    }];
    let included = total_units.min(plan.included_units);
    if plan.included_units > 0 {
        lines.push(Line {
            kind: LineKind::Included,
            description: format!("Included units ({} in the plan)", group(plan.included_units)),
            quantity: Decimal::from(included),
            unit_price: Some(Decimal::ZERO),
            amount: cur.round(Decimal::ZERO),
            source_period: None,
        });
    }
    let chargeable = total_units - included;
    let mut from = 0u64;
    let single = plan.tiers.len() == 1;
    let tier_of = |i: usize, lo: u64, hi: Option<u64>| match hi {
        _ if single => "one price".to_owned(),
        Some(hi) => format!("tier {} ({}–{})", i + 1, group(lo + 1), group(hi)),
        None => format!("tier {} (over {})", i + 1, group(lo)),
    };
    match plan.mode {
        Mode::Graduated => {
            for (i, t) in plan.tiers.iter().enumerate() {
                if chargeable <= from {
                    break;
                }
                let to = t.up_to.map_or(chargeable, |u| u.min(chargeable));
                let qty = to.saturating_sub(from);
                if qty > 0 {
                    lines.push(Line {
                        kind: LineKind::Usage,
                        description: format!("Units, {}", tier_of(i, from, t.up_to)),
                        quantity: Decimal::from(qty),
                        unit_price: Some(t.unit_price),
                        amount: cur.round(Decimal::from(qty) * t.unit_price),
                        source_period: None,
                    });
                }
                from = t.up_to.unwrap_or(u64::MAX);
            }
        }
        Mode::Volume => {
            if chargeable > 0 {
                let mut lo = 0;
                for (i, t) in plan.tiers.iter().enumerate() {
                    if t.up_to.is_none_or(|u| chargeable <= u) {
                        lines.push(Line {
                            kind: LineKind::Usage,
                            description: format!("Units, all at {}", tier_of(i, lo, t.up_to)),
                            quantity: Decimal::from(chargeable),
                            unit_price: Some(t.unit_price),
                            amount: cur.round(Decimal::from(chargeable) * t.unit_price),
                            source_period: None,
                        });
                        break;
                    }
                    lo = t.up_to.unwrap_or(lo);
                }
            }
        }
    }
    let charged: Decimal = lines.iter().map(|l| l.amount).sum();
    let minimum = cur.round(plan.minimum_charge);
    if charged < minimum {
        lines.push(Line {
            kind: LineKind::Minimum,
            description: format!("Minimum charge of {} {}", cur.format(minimum), cur.code),
            quantity: Decimal::ONE,
            unit_price: Some(minimum - charged),
            amount: minimum - charged,
            source_period: None,
        });
    }
    let availability_percent = (usage.attempted > 0).then(|| {
        let ok = Decimal::from(usage.attempted - usage.failed.min(usage.attempted));
        (ok * Decimal::ONE_HUNDRED / Decimal::from(usage.attempted)).round_dp(4)
    });
    if let Some(sla) = &plan.sla {
        let mut missed = Vec::new();
        if let (Some(goal), Some(got)) = (sla.availability_percent, availability_percent)
            && got < goal
        {
            missed.push(format!("availability {got}% < {goal}%"));
        }
        if let (Some(goal), Some(p99)) = (sla.p99_ms, usage.p99_us)
            && p99 > goal * 1000
        {
            missed.push(format!("P99 {:.1} ms > {goal} ms", p99 as f64 / 1000.0));
        }
        if !missed.is_empty() {
            let credit = cur.round(plan.monthly_fee * sla.credit_percent / Decimal::ONE_HUNDRED);
            lines.push(Line {
                kind: LineKind::SlaCredit,
                description: format!("SLA credit {}% of the fee: {}", sla.credit_percent, missed.join(", ")),
                quantity: Decimal::ONE,
                unit_price: Some(-credit),
                amount: -credit,
                source_period: None,
            });
        }
    }
    Priced { units, total_units, availability_percent, lines }
}
