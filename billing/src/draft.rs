//! Draft invoices: a period priced from the usage in ClickHouse right now.

use std::collections::BTreeMap;

use clickhouse::Client;
use rust_decimal::Decimal;
use tollgate_common::time;

use crate::config::Config;
use crate::invoice::{self, Invoice, Status};
use crate::period::Period;
use crate::pricing::{self, Plan};

/// The draft invoices of `period` (one consumer, or all with a priced plan), and the
/// consumers skipped because their plan has no prices in the config.
pub async fn drafts(
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
