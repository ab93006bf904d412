//! Closing a period: finalized invoices stored in ClickHouse, once.
//!
//! `close` writes an invoice for every consumer that has none for the period yet, with its
//! three renderings; a consumer already invoiced is never recomputed. Closing twice, or twice
//! at the same time, leaves one invoice per consumer: each close writes with
//! `priority = 2^64 − 1 − closed_at_us` and `invoices FINAL` keeps the earliest close. Exports
//! of a closed period are assembled from the stored renderings, so they are byte-identical.
//! Usage that arrives for a closed period later never changes its invoices: the next period's
//! invoice carries an adjustment line (see `draft`).

use std::collections::BTreeMap;

use clickhouse::Client;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_common::time;

use crate::config::Config;
use crate::invoice::{Invoice, Parts, Status};
use crate::period::Period;

/// A finalized invoice as stored.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct StoredInvoice {
    pub period: String,
    pub consumer_id: String,
    pub invoice_number: String,
    pub plan_id: String,
    pub currency: String,
    pub total: String,
    pub json: String,
    pub csv: String,
    pub html: String,
    pub closed_at_us: u64,
    pub priority: u64,
}

impl StoredInvoice {
    pub fn parts(&self) -> Parts {
        Parts { json: self.json.clone(), csv: self.csv.clone(), html: self.html.clone() }
    }
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct LineRow {
    period: String,
    consumer_id: String,
    invoice_number: String,
    line: u16,
    kind: String,
    description: String,
    quantity: String,
    unit_price: String,
    amount: String,
    currency: String,
    source_period: String,
    closed_at_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("period {period} can be closed from {from} (its end plus billing.grace_hours, for late events)")]
    TooEarly { period: String, from: String },
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// The finalized invoices of `period` (one consumer, or all), by consumer id.
pub async fn stored(
    client: &Client,
    period: &str,
    consumer: Option<&str>,
) -> Result<Vec<StoredInvoice>, clickhouse::error::Error> {
    let mut sql = "SELECT period, consumer_id, invoice_number, plan_id, currency, total, json, csv, html, closed_at_us, priority \
                   FROM invoices FINAL WHERE period = ?"
        .to_owned();
    if consumer.is_some() {
        sql.push_str(" AND consumer_id = ?");
    }
    sql.push_str(" ORDER BY consumer_id");
    let mut q = client.query(&sql).bind(period);
    if let Some(c) = consumer {
        q = q.bind(c);
    }
    q.fetch_all::<StoredInvoice>().await
}

/// The totals of the finalized invoices of `period`: consumer → (total, currency). (The
/// renderings are not read: adjustments need only the totals.)
pub async fn finalized_totals(
    client: &Client,
    period: &str,
    consumer: Option<&str>,
) -> Result<BTreeMap<String, (Decimal, String)>, clickhouse::error::Error> {
    #[derive(clickhouse::Row, Deserialize)]
    struct Row {
        consumer_id: String,
        total: String,
        currency: String,
    }
    let mut sql = "SELECT consumer_id, total, currency FROM invoices FINAL WHERE period = ?".to_owned();
    if consumer.is_some() {
        sql.push_str(" AND consumer_id = ?");
    }
    let mut q = client.query(&sql).bind(period);
    if let Some(c) = consumer {
        q = q.bind(c);
    }
    let rows = q.fetch_all::<Row>().await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.consumer_id, (Decimal::from_str_exact(&r.total).unwrap_or_default(), r.currency)))
        .collect())
}

/// Adjustments already invoiced for `source_period`, per consumer.
pub async fn billed_adjustments(
    client: &Client,
    source_period: &str,
) -> Result<BTreeMap<String, Decimal>, clickhouse::error::Error> {
    #[derive(clickhouse::Row, Deserialize)]
    struct Row {
        consumer_id: String,
        amount: String,
    }
    let rows = client
        .query("SELECT consumer_id, amount FROM invoice_lines_final WHERE kind = 'adjustment' AND source_period = ?")
        .bind(source_period)
        .fetch_all::<Row>()
        .await?;
    let mut out: BTreeMap<String, Decimal> = BTreeMap::new();
    for r in rows {
        *out.entry(r.consumer_id).or_default() += Decimal::from_str_exact(&r.amount).unwrap_or_default();
    }
    Ok(out)
}

/// Closes `period` at `now_us`: finalizes the invoices of consumers that have none yet.
/// Returns how many this call wrote and every finalized invoice of the period.
pub async fn close(
    cfg: &Config,
    client: &Client,
    period: &Period,
    now_us: u64,
) -> Result<(usize, Vec<StoredInvoice>), CloseError> {
    let open_until = period.end + i64::from(cfg.grace_hours) * 3600;
    if (now_us / 1_000_000) as i64 <= open_until {
        return Err(CloseError::TooEarly { period: period.label.clone(), from: time::format_utc(open_until) });
    }
    let done: std::collections::BTreeSet<String> =
        stored(client, &period.label, None).await?.into_iter().map(|s| s.consumer_id).collect();
    let (drafts, unpriced) = crate::draft::drafts(cfg, client, period, None).await?;
    for (c, p) in unpriced {
        tracing::warn!(consumer = %c, plan = %p, "plan has no prices in the billing config: no invoice");
    }
    let todo: Vec<Invoice> = drafts
        .into_iter()
        .filter(|i| !done.contains(&i.consumer_id))
        .map(|mut i| {
            i.status = Status::Final;
            i
        })
        .collect();
    if !todo.is_empty() {
        let priority = u64::MAX - now_us;
        let mut lines = client.insert::<LineRow>("invoice_lines").await?;
        for inv in &todo {
            for (n, l) in inv.lines().iter().enumerate() {
                lines
                    .write(&LineRow {
                        period: inv.period.clone(),
                        consumer_id: inv.consumer_id.clone(),
                        invoice_number: inv.number.clone(),
                        line: u16::try_from(n + 1).unwrap_or(u16::MAX),
                        kind: l.kind.as_str().to_owned(),
                        description: l.description.clone(),
                        quantity: l.quantity.normalize().to_string(),
                        unit_price: l.unit_price.map(|p| p.normalize().to_string()).unwrap_or_default(),
                        amount: inv.currency.format(l.amount),
                        currency: inv.currency.code.clone(),
                        source_period: l.source_period.clone().unwrap_or_default(),
                        closed_at_us: now_us,
                    })
                    .await?;
            }
        }
        lines.end().await?;
        // The invoice rows last: an invoice is visible only with its lines.
        let mut insert = client.insert::<StoredInvoice>("invoices").await?;
        for inv in &todo {
            let parts = Parts::of(inv);
            insert
                .write(&StoredInvoice {
                    period: inv.period.clone(),
                    consumer_id: inv.consumer_id.clone(),
                    invoice_number: inv.number.clone(),
                    plan_id: inv.plan_id.clone(),
                    currency: inv.currency.code.clone(),
                    total: inv.currency.format(inv.total),
                    json: parts.json,
                    csv: parts.csv,
                    html: parts.html,
                    closed_at_us: now_us,
                    priority,
                })
                .await?;
        }
        insert.end().await?;
    }
    Ok((todo.len(), stored(client, &period.label, None).await?))
}
