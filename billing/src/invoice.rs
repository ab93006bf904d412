//! Invoices and their exports (CSV, JSON, HTML). Rendering is deterministic: the same invoice
//! always gives the same bytes.

use std::fmt::Write;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use crate::money::Currency;
use crate::pricing::{Line, Priced};

/// Who issues the invoices (`[seller]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seller {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Draft,
    Final,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Final => "final",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub number: String,
    pub status: Status,
    pub seller: Seller,
    pub consumer_id: String,
    pub plan_id: String,
    /// `YYYY-MM`.
    pub period: String,
    /// RFC 3339.
    pub period_start: String,
    pub period_end: String,
    pub currency: Currency,
    pub priced: Priced,
    pub total: Decimal,
}

/// The invoice number of a consumer for a period: `TG-YYYYMM-` and 10 hex digits of the
/// SHA-256 of the consumer id. The same consumer and period always get the same number.
pub fn number(period: &str, consumer_id: &str) -> String {
    let h = hex::encode(Sha256::digest(consumer_id.as_bytes()));
    format!("TG-{}-{}", period.replace('-', ""), h[..10].to_uppercase())
}

impl Invoice {
    pub fn lines(&self) -> &[Line] {
        &self.priced.lines
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A unit price with at least the currency's decimals (`49.00`, `0.0004`, `0.7` for JPY).
fn price_str(cur: &Currency, p: Option<Decimal>) -> String {
    p.map_or_else(String::new, |p| {
        let n = p.normalize();
        if n.scale() < cur.decimals { cur.format(n) } else { n.to_string() }
    })
}

/// The CSV header line.
pub const CSV_HEADER: &str = "invoice_number,status,consumer_id,plan_id,period,line,kind,description,quantity,unit_price,amount,currency,invoice_total\n";

/// The rows of one invoice in a CSV export.
pub fn csv_rows(inv: &Invoice) -> String {
    let mut out = String::new();
    for (i, l) in inv.lines().iter().enumerate() {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            inv.number,
            inv.status.as_str(),
            csv_field(&inv.consumer_id),
            csv_field(&inv.plan_id),
            inv.period,
            i + 1,
            l.kind.as_str(),
            csv_field(&l.description),
            l.quantity.normalize(),
            price_str(&inv.currency, l.unit_price),
            inv.currency.format(l.amount),
            inv.currency.code,
            inv.currency.format(inv.total)
        );
    }
    out
}

/// One invoice as a JSON object (amounts are strings: exact decimals).
pub fn json_object(inv: &Invoice) -> String {
    let cur = &inv.currency;
    let mut out = format!(
        "  {{\"number\": {}, \"status\": {}, \"seller\": {{\"name\": {}, \"address\": {}}}, \"consumer_id\": {}, \"plan_id\": {}, \
         \"period\": {}, \"period_start\": {}, \"period_end\": {}, \"currency\": {},\n   \"usage\": [",
        json_str(&inv.number),
        json_str(inv.status.as_str()),
        json_str(&inv.seller.name),
        json_str(&inv.seller.address),
        json_str(&inv.consumer_id),
        json_str(&inv.plan_id),
        json_str(&inv.period),
        json_str(&inv.period_start),
        json_str(&inv.period_end),
        json_str(&cur.code)
    );
    for (i, u) in inv.priced.units.iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"route\": {}, \"calls\": {}, \"weight\": {}, \"units\": {}}}",
            if i == 0 { "" } else { ", " },
            json_str(&u.route),
            u.calls,
            u.weight,
            u.units
        );
    }
    let availability = inv.priced.availability_percent.map_or_else(|| "null".to_owned(), |a| json_str(&a.to_string()));
    let _ = write!(
        out,
        "], \"total_units\": {}, \"availability_percent\": {availability},\n   \"lines\": [",
        inv.priced.total_units
    );
    for (i, l) in inv.lines().iter().enumerate() {
        let _ = write!(
            out,
            "{}\n    {{\"kind\": {}, \"description\": {}, \"quantity\": {}, \"unit_price\": {}, \"amount\": {}}}",
            if i == 0 { "" } else { "," },
            json_str(l.kind.as_str()),
            json_str(&l.description),
            json_str(&l.quantity.normalize().to_string()),
            l.unit_price.map_or_else(|| "null".to_owned(), |p| json_str(&price_str(cur, Some(p)))),
            json_str(&cur.format(l.amount))
        );
    }
    let _ = write!(out, "],\n   \"total\": {}}}", json_str(&cur.format(inv.total)));
    out
}

/// The HTML head of an export.
pub const HTML_HEAD: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Invoices</title>\n<style>\n\
     body{font-family:Helvetica,Arial,sans-serif;font-size:11pt;color:#111;margin:0}\n\
     .page{width:180mm;margin:12mm auto;page-break-after:always}\n\
     h1{font-size:18pt;margin:0 0 4mm}\n.meta{display:flex;justify-content:space-between;margin-bottom:8mm}\n\
     table{width:100%;border-collapse:collapse}th,td{padding:2mm;border-bottom:1px solid #ccc;text-align:left}\n\
     td.n,th.n{text-align:right;white-space:nowrap}tr.total td{font-weight:bold;border-top:2px solid #111}\n\
     .small{color:#555;font-size:9pt}\n@media print{.page{margin:0 auto}}\n</style></head><body>\n";

/// The HTML tail of an export.
pub const HTML_TAIL: &str = "</body></html>\n";

/// One invoice as a printable HTML page (a `<section>`).
pub fn html_page(inv: &Invoice) -> String {
    let cur = &inv.currency;
    let mut out = format!(
        "<section class=\"page\">\n<h1>Invoice {}</h1>\n<p class=\"small\">{}</p>\n<div class=\"meta\"><div><strong>From</strong><br>{}<br>{}</div>\
         <div><strong>To</strong><br>consumer {}<br>plan {}</div><div><strong>Period</strong><br>{}<br>{} – {}</div></div>\n",
        html(&inv.number),
        if inv.status == Status::Draft { "DRAFT: the period is not closed; amounts may change" } else { "Final" },
        html(&inv.seller.name),
        html(&inv.seller.address),
        html(&inv.consumer_id),
        html(&inv.plan_id),
        html(&inv.period),
        html(&inv.period_start),
        html(&inv.period_end)
    );
    out.push_str("<table>\n<tr><th>Description</th><th class=\"n\">Quantity</th><th class=\"n\">Unit price</th><th class=\"n\">Amount</th></tr>\n");
    for l in inv.lines() {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{} {}</td></tr>",
            html(&l.description),
            l.quantity.normalize(),
            html(&price_str(cur, l.unit_price)),
            cur.format(l.amount),
            cur.code
        );
    }
    let _ = writeln!(
        out,
        "<tr class=\"total\"><td>Total</td><td></td><td></td><td class=\"n\">{} {}</td></tr>\n</table>",
        cur.format(inv.total),
        cur.code
    );
    out.push_str("<p class=\"small\">Billable units by route: ");
    let parts: Vec<String> = inv
        .priced
        .units
        .iter()
        .map(|u| format!("{} {} calls × {} = {} units", html(&u.route), u.calls, u.weight, u.units))
        .collect();
    out.push_str(&if parts.is_empty() { "none".to_owned() } else { parts.join("; ") });
    if let Some(a) = inv.priced.availability_percent {
        let _ = write!(out, ". Measured availability {a}%");
    }
    out.push_str(".</p>\n</section>\n");
    out
}

/// The three renderings of one invoice, from which every export is assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub json: String,
    pub csv: String,
    pub html: String,
}

impl Parts {
    pub fn of(inv: &Invoice) -> Self {
        Self { json: json_object(inv), csv: csv_rows(inv), html: html_page(inv) }
    }
}

/// CSV: a header, then one row per line of every invoice.
pub fn csv_export<'a>(parts: impl IntoIterator<Item = &'a Parts>) -> String {
    let mut out = CSV_HEADER.to_owned();
    parts.into_iter().for_each(|p| out.push_str(&p.csv));
    out
}

/// JSON: an array of invoices.
pub fn json_export<'a>(parts: impl IntoIterator<Item = &'a Parts>) -> String {
    let objects: Vec<&str> = parts.into_iter().map(|p| p.json.as_str()).collect();
    if objects.is_empty() { "[]\n".to_owned() } else { format!("[\n{}\n]\n", objects.join(",\n")) }
}

/// HTML: one printable page per invoice.
pub fn html_export<'a>(parts: impl IntoIterator<Item = &'a Parts>) -> String {
    let mut out = HTML_HEAD.to_owned();
    parts.into_iter().for_each(|p| out.push_str(&p.html));
    out.push_str(HTML_TAIL);
    out
}

pub fn to_csv(invoices: &[Invoice]) -> String {
    csv_export(&invoices.iter().map(Parts::of).collect::<Vec<_>>())
}

pub fn to_json(invoices: &[Invoice]) -> String {
    json_export(&invoices.iter().map(Parts::of).collect::<Vec<_>>())
}

pub fn to_html(invoices: &[Invoice]) -> String {
    html_export(&invoices.iter().map(Parts::of).collect::<Vec<_>>())
}
