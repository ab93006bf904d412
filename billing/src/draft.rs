//! Draft invoices: a period priced from the usage in ClickHouse right now.

use std::collections::BTreeMap;

use clickhouse::Client;
use rust_decimal::Decimal;
use tollgate_common::time;

use crate::config::Config;
use crate::invoice::{self, Invoice, Status};
use crate::period::Period;
use crate::pricing::{self, Line, LineKind, Plan};

/// How many closed periods before the one invoiced are checked for late usage.
const ADJUST_BACK: usize = 3;

/// The draft invoices of `period` (one consumer, or all with a priced plan), with an
/// adjustment line for every closed earlier period (up to three back) whose usage changed
/// after its invoices were finalized; and the consumers skipped because their plan has no
/// prices in the config.
pub async fn drafts(
    cfg: &Config,
    client: &Client,
    period: &Period,
    consumer: Option<&str>,
) -> Result<(Vec<Invoice>, Vec<(String, String)>), clickhouse::error::Error> {
    let (mut invoices, unpriced) = priced(cfg, client, period, consumer).await?;
    let mut q = period.previous();
    for _ in 0..ADJUST_BACK {
        let finals = crate::close::finalized_totals(client, &q.label, consumer).await?;
        if !finals.is_empty() {
            adjust(cfg, client, period, &q, consumer, finals, &mut invoices).await?;
        }
        q = q.previous();
    }
    invoices.sort_by(|a, b| a.consumer_id.cmp(&b.consumer_id));
    Ok((invoices, unpriced))
}

/// Adds to `invoices` (of `period`) the difference between what closed period `q` would be
/// invoiced now and what was invoiced (`invoiced`: finalized totals; plus adjustments already
/// billed).
async fn adjust(
    cfg: &Config,
    client: &Client,
    period: &Period,
    q: &Period,
    consumer: Option<&str>,
    mut invoiced: BTreeMap<String, (Decimal, String)>,
    invoices: &mut Vec<Invoice>,
) -> Result<(), clickhouse::error::Error> {
    let (now, _) = priced(cfg, client, q, consumer).await?;
    let billed = crate::close::billed_adjustments(client, &q.label).await?;
    let mut recomputed: BTreeMap<String, &Invoice> = BTreeMap::new();
    for inv in &now {
        recomputed.insert(inv.consumer_id.clone(), inv);
        invoiced.entry(inv.consumer_id.clone()).or_insert((Decimal::ZERO, inv.currency.code.clone()));
    }
    for (c, (final_total, currency)) in invoiced {
        let Some(inv_now) = recomputed.get(&c) else { continue };
        if inv_now.currency.code != currency {
            tracing::warn!(consumer = %c, period = %q.label, "plan currency changed since the period closed: no adjustment");
            continue;
        }
        let diff = inv_now.total - final_total - billed.get(&c).copied().unwrap_or_default();
        if diff.is_zero() {
            continue;
        }
        let line = Line {
            kind: LineKind::Adjustment,
            description: format!(
                "Adjustment for {}: usage that arrived after it closed (now {}, invoiced {})",
                q.label,
                inv_now.currency.format(inv_now.total),
                inv_now.currency.format(final_total + billed.get(&c).copied().unwrap_or_default())
            ),
            quantity: Decimal::ONE,
            unit_price: Some(diff),
            amount: diff,
            source_period: Some(q.label.clone()),
        };
        match invoices.iter_mut().find(|i| i.consumer_id == c) {
            Some(inv) if inv.currency.code == currency => {
                inv.priced.lines.push(line);
                inv.total += diff;
            }
            Some(_) => tracing::warn!(consumer = %c, "plan currency changed: adjustment left out"),
            None => {
                // No usage in this period: an invoice with the adjustment only.
                let mut inv = (*inv_now).clone();
                inv.number = invoice::number(&period.label, &c);
                inv.period = period.label.clone();
                inv.period_start = time::format_utc(period.start);
                inv.period_end = time::format_utc(period.end);
                inv.priced.units.clear();
                inv.priced.total_units = 0;
                inv.priced.availability_percent = None;
                inv.priced.lines = vec![line];
                inv.total = diff;
                invoices.push(inv);
            }
        }
    }
    Ok(())
}

/// The invoices of `period` from its own usage (no adjustments).
async fn priced(
    cfg: &Config,
    client: &Client,
    period: &Period,
    consumer: Option<&str>,
) -> Result<(Vec<Invoice>, Vec<(String, String)>), clickhouse::error::Error> {
    let plans = crate::usage::plans(client, period.start, period.end).await?;
    let mut plan_of: BTreeMap<String, &Plan> = BTreeMap::new();
    let mut unpriced = Vec::new();
    for (c, p) in &plans {
        if consumer.is_some_and(|only| only != c) {
            continue;
        }
        match cfg.plans.get(p) {
            Some(plan) => {
                plan_of.insert(c.clone(), plan);
            }
            None => unpriced.push((c.clone(), p.clone())),
        }
    }
    let usage = crate::usage::period_usage(client, period.start, period.end, &plan_of).await?;
    let mut out = Vec::new();
    for (c, plan) in plan_of {
        let u = usage.get(&c).cloned().unwrap_or_default();
        let priced = pricing::price(plan, &u);
        let total: Decimal = priced.lines.iter().map(|l| l.amount).sum();
        out.push(Invoice {
            number: invoice::number(&period.label, &c),
            status: Status::Draft,
            seller: cfg.seller.clone(),
            plan_id: plan.id.clone(),
            period: period.label.clone(),
            period_start: time::format_utc(period.start),
            period_end: time::format_utc(period.end),
            currency: plan.currency.clone(),
            priced,
            total,
            consumer_id: c,
        });
    }
    Ok((out, unpriced))
}
