//! Golden files: each pricing case rendered as JSON and CSV (and one as HTML) must match the
//! committed file byte for byte. `UPDATE_GOLDEN=1 cargo test -p tollgate-billing --test golden`
//! rewrites them; review the diff (every amount below is also checked by hand in `amounts`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;

use rust_decimal::Decimal;
use tollgate_billing::invoice::{self, Invoice, Seller, Status};
use tollgate_billing::money::Currency;
use tollgate_billing::pricing::{self, Mode, PeriodUsage, Plan, Sla, Tier};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn plan(id: &str, currency: &str, fee: &str, included: u64, mode: Mode, tiers: &[(Option<u64>, &str)]) -> Plan {
    Plan {
        id: id.into(),
        currency: Currency::parse(currency).unwrap(),
        monthly_fee: d(fee),
        included_units: included,
        mode,
        tiers: tiers.iter().map(|(up_to, p)| Tier { up_to: *up_to, unit_price: d(p) }).collect(),
        minimum_charge: Decimal::ZERO,
        route_weights: BTreeMap::new(),
        billable_outcomes: BTreeSet::from(["forwarded".to_owned()]),
        billable_below_status: 500,
        sla: None,
    }
}

fn usage(routes: &[(&str, u64)]) -> PeriodUsage {
    let calls: u64 = routes.iter().map(|r| r.1).sum();
    PeriodUsage {
        billable_calls: routes.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
        attempted: calls,
        failed: 0,
        p99_us: Some(120_000),
    }
}

fn invoice(plan: &Plan, u: &PeriodUsage, consumer: &str) -> Invoice {
    let priced = pricing::price(plan, u);
    let total = priced.lines.iter().map(|l| l.amount).sum();
    Invoice {
        number: invoice::number("2026-11", consumer),
        status: Status::Final,
        seller: Seller { name: "Tollgate Demo Inc.".into(), address: "1 Example Street, Springfield".into() },
        consumer_id: consumer.into(),
        plan_id: plan.id.clone(),
        period: "2026-11".into(),
        period_start: "2026-11-01T00:00:00Z".into(),
        period_end: "2026-12-01T00:00:00Z".into(),
        currency: plan.currency.clone(),
        priced,
        total,
    }
}

/// The cases: name → invoice.
fn cases() -> Vec<(&'static str, Invoice)> {
    let tiers: &[(Option<u64>, &str)] = &[(Some(1_000), "0.01"), (Some(10_000), "0.005"), (None, "0.0025")];
    let tiered = plan("growth", "USD", "49.00", 500, Mode::Graduated, tiers);
    let volume = plan("bulk", "EUR", "0", 0, Mode::Volume, tiers);
    let mut weighted = plan("search", "USD", "10", 0, Mode::Graduated, &[(None, "0.002")]);
    weighted.route_weights.insert("search".into(), 5);
    let mut free = plan("free", "USD", "0", 1_000, Mode::Graduated, &[(None, "0.001")]);
    free.minimum_charge = Decimal::ZERO;
    let mut sla = plan("pro", "USD", "199.99", 100_000, Mode::Graduated, &[(None, "0.0004")]);
    sla.sla = Some(Sla { availability_percent: Some(d("99.9")), p99_ms: Some(100), credit_percent: d("10") });
    let mut sla_usage = usage(&[("orders", 150_321)]);
    (sla_usage.attempted, sla_usage.failed) = (151_000, 679);
    let mut jpy = plan("tokyo", "JPY", "5000", 0, Mode::Graduated, &[(Some(1_000), "0.7"), (None, "0.35")]);
    jpy.minimum_charge = d("10000");
    vec![
        ("tiered", invoice(&tiered, &usage(&[("orders", 12_345), ("search", 1_000)]), "acme")),
        ("volume", invoice(&volume, &usage(&[("orders", 12_345)]), "globex")),
        ("weighted_route", invoice(&weighted, &usage(&[("orders", 1_000), ("search", 333)]), "initech")),
        ("free_tier", invoice(&free, &usage(&[("orders", 999)]), "hobbyist")),
        ("sla_credit", invoice(&sla, &sla_usage, "umbrella")),
        ("jpy", invoice(&jpy, &usage(&[("orders", 2_501)]), "tanaka")),
    ]
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn check(name: &str, got: &str) {
    let path = golden(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs from its golden file");
}

#[test]
fn exports_match_the_golden_files() {
    for (name, inv) in cases() {
        let one = std::slice::from_ref(&inv);
        check(&format!("{name}.json"), &invoice::to_json(one));
        check(&format!("{name}.csv"), &invoice::to_csv(one));
    }
    let all: Vec<Invoice> = cases().into_iter().map(|(_, i)| i).collect();
    check("all.html", &invoice::to_html(&all));
}

/// The amounts, worked out by hand.
#[test]
fn amounts() {
    let c: BTreeMap<&str, Invoice> = cases().into_iter().collect();
    let amounts =
        |name: &str| -> Vec<String> { c[name].lines().iter().map(|l| c[name].currency.format(l.amount)).collect() };
    // 13,345 units, 500 included: 12,845 chargeable = 1,000 × 0.01 + 9,000 × 0.005 + 2,845 × 0.0025 (7.1125 → 7.11).
    assert_eq!(amounts("tiered"), ["49.00", "0.00", "10.00", "45.00", "7.11"]);
    assert_eq!(c["tiered"].currency.format(c["tiered"].total), "111.11");
    // Volume: 12,345 units all at the third tier's 0.0025 = 30.8625 → 30.86.
    assert_eq!(amounts("volume"), ["0.00", "30.86"]);
    // Weighted: 1,000 + 333 × 5 = 2,665 units × 0.002 = 5.33.
    assert_eq!(amounts("weighted_route"), ["10.00", "5.33"]);
    assert_eq!(c["weighted_route"].priced.total_units, 2_665);
    // Free tier: 999 of 1,000 included.
    assert_eq!(amounts("free_tier"), ["0.00", "0.00"]);
    // SLA: 50,321 × 0.0004 = 20.1284 → 20.13; availability 150,321 / 151,000 = 99.5503 % < 99.9 %,
    // P99 120 ms > 100 ms: credit 10 % of 199.99 = 19.999 → 20.00.
    assert_eq!(amounts("sla_credit"), ["199.99", "0.00", "20.13", "-20.00"]);
    assert_eq!(c["sla_credit"].currency.format(c["sla_credit"].total), "200.12");
    // JPY: 1,000 × 0.7 + 1,501 × 0.35 = 700 + 525.35 → 525; 5,000 + 700 + 525 = 6,225 < 10,000: 3,775 top-up.
    assert_eq!(amounts("jpy"), ["5000", "700", "525", "3775"]);
    assert_eq!(c["jpy"].currency.format(c["jpy"].total), "10000");
    // Every invoice: the lines sum to the total exactly.
    for inv in c.values() {
        assert_eq!(inv.lines().iter().map(|l| l.amount).sum::<Decimal>(), inv.total);
    }
}
