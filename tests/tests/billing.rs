//! Billing end to end: events of last month → ingest → aggregator → `tollgate-billing close`.
//! Invoice totals equal an independent computation from the raw table (SQL here, not the
//! billing code); closing twice at once gives one invoice per consumer; exports of a closed
//! period are byte-identical; a late event after the close leaves the invoice unchanged and
//! shows up as an adjustment on the next period's invoice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

use tollgate_common::time;
use tollgate_e2e::*;
use tollgate_schemas::{Encoder, Outcome};

/// `n` calls of `consumer` on `plan` at `ts_s`: every 4th on route `search`, every 10th a 503,
/// every 7th rate limited.
fn calls(consumer: &str, plan: &str, n: usize, ts_s: i64) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    (0..n)
        .map(|i| {
            let mut e = sample_event(consumer, ts_s * 1_000_000 + i as i64 * 1000);
            e.plan_id = Some(plan.to_owned());
            if i % 4 == 0 {
                e.route_id = Some("search".into());
            }
            if i % 10 == 0 {
                e.status = 503;
            } else if i % 7 == 0 {
                (e.status, e.outcome) = (429, Outcome::RateLimited);
            }
            (consumer.to_owned(), enc.encode(&e).unwrap())
        })
        .collect()
}

fn billing(cfg: &std::path::Path, args: &[&str]) -> Output {
    let out = Command::new(bin("tollgate-billing")).args(args).arg("--config").arg(cfg).output().unwrap();
    assert!(out.status.success(), "billing {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Expected totals in minor units, computed from `api_calls FINAL` with the plans' rules
/// written out in SQL: growth = 10.00 USD + 100 free units, then 0.01 up to 1,000 units and
/// 0.005 above, route `search` weighs 3, and a 10 % credit on the fee when availability
/// (attempted calls not answered 5xx) is below 99.9 %; tokyo = 1,000 JPY + 0.35 per call. Billable:
/// forwarded with a status below 500. Rounding half away from zero, per line.
async fn expected_minor(db: &str, start: i64, end: i64) -> String {
    ch(
        &clickhouse(),
        &format!(
            "SELECT consumer_id, \
               if(plan = 'growth', 1000 + least(greatest(weighted - 100, 0), 1000) + intDiv(greatest(weighted - 1100, 0) + 1, 2) \
                  - if(failed * 1000 > attempted, 100, 0), \
                  1000 + intDiv(plain * 35 + 50, 100)) AS minor \
             FROM (SELECT consumer_id, argMax(plan_id, start_time_us) AS plan, \
                          toInt64(sumIf(if(route_id = 'search', 3, 1), outcome = 'forwarded' AND status < 500)) AS weighted, \
                          toInt64(countIf(outcome = 'forwarded' AND status < 500)) AS plain, \
                          countIf(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout')) AS attempted, \
                          countIf(outcome IN ('forwarded', 'upstream_error', 'upstream_timeout') AND status >= 500) AS failed \
                   FROM {db}.api_calls FINAL WHERE ts >= toDateTime({start}) AND ts < toDateTime({end}) GROUP BY consumer_id) \
             ORDER BY consumer_id FORMAT TSV"
        ),
    )
    .await
}

/// Totals of the finalized invoices in minor units (`111.11` → 11111).
async fn invoiced_minor(db: &str, period: &str) -> String {
    ch(&clickhouse(), &format!("SELECT consumer_id, toInt64(replaceAll(total, '.', '')) FROM {db}.invoices FINAL WHERE period = '{period}' ORDER BY consumer_id FORMAT TSV")).await
}

async fn wait_usage_complete(db: &str, procs: &[&Proc]) {
    let url = clickhouse();
    let ok = wait_until(Duration::from_secs(90), || async {
        let raw = try_ch(&url, &format!("SELECT count() FROM {db}.api_calls FINAL")).await.unwrap_or_default();
        let used =
            try_ch(&url, &format!("SELECT sum(requests) FROM {db}.usage_minute FINAL")).await.unwrap_or_default();
        !raw.trim().is_empty() && raw.trim() != "0" && raw.trim() == used.trim()
    })
    .await;
    let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log_tail())).collect();
    assert!(ok, "usage did not catch up\n{}", logs.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn close_is_exact_idempotent_and_late_usage_becomes_an_adjustment() {
    let dir = TempDir::new("billing");
    let (topic, db) = (unique("bill_calls"), unique("billing"));
    create_topic(&topic, 2).await;
    let now = now_us() / 1_000_000;
    let this_month = time::month_start(now);
    let last_month = time::month_start(this_month - 1);
    let period = time::month_label(last_month);
    let mid = last_month + 10 * 86_400;
    let mut events = calls("alpha", "growth", 1_500, mid);
    events.extend(calls("bravo", "growth", 120, mid + 3600));
    events.extend(calls("chiyo", "tokyo", 777, mid + 7200));
    produce_all(&producer(), &topic, &events).await;

    let ingest =
        start_ingest(dir.path(), "ingest", &ingest_config(&topic, &db, &format!("{db}-ingest"), &clickhouse()));
    let agg = start_aggregator(
        dir.path(),
        "agg",
        &aggregator_config(
            &topic,
            &db,
            &format!("{db}-agg"),
            "agg",
            &format!("{db}-ingest"),
            "[windows]\nallowed_lateness_s = 1\nidle_close_ms = 500\n",
        ),
    );
    wait_usage_complete(&db, &[&ingest, &agg]).await;

    let cfg = dir.path().join("billing.toml");
    std::fs::write(
        &cfg,
        format!(
            "[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n[seller]\nname = \"Test Seller\"\naddress = \"1 Test Street\"\n\
             [billing]\ngrace_hours = 0\n\
             [plans.growth]\ncurrency = \"USD\"\nmonthly_fee = \"10.00\"\nincluded_units = 100\n\
             tiers = [{{ up_to = 1000, unit_price = \"0.01\" }}, {{ unit_price = \"0.005\" }}]\nroute_weights = {{ search = 3 }}\n\
             [plans.growth.sla]\navailability_percent = \"99.9\"\ncredit_percent = \"10\"\n\
             [plans.tokyo]\ncurrency = \"JPY\"\nmonthly_fee = \"1000\"\ntiers = [{{ unit_price = \"0.35\" }}]\n",
            clickhouse()
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();

    // This month cannot be closed yet.
    let early = Command::new(bin("tollgate-billing"))
        .args(["close", "--period", &time::month_label(now), "--config", cfg_s])
        .output()
        .unwrap();
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("can be closed from"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );

    // Two closes at once: one invoice per consumer.
    let spawn_close =
        || Command::new(bin("tollgate-billing")).args(["close", "--period", &period, "--config", cfg_s]).output();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn_close);
        let b = s.spawn(spawn_close);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let url = clickhouse();
    assert_eq!(ch_u64(&url, &format!("SELECT count() FROM {db}.invoices FINAL WHERE period = '{period}'")).await, 3);
    assert_eq!(
        ch_u64(&url, &format!("SELECT uniqExact(invoice_number) FROM {db}.invoices WHERE period = '{period}'")).await,
        3
    );

    // Totals = the independent SQL computation from the raw table.
    let expected = expected_minor(&db, last_month, this_month).await;
    assert_eq!(invoiced_minor(&db, &period).await, expected);
    assert_eq!(expected.lines().count(), 3);

    // A third close writes nothing; exports are byte-identical, in every format.
    let third = billing(&cfg, &["close", "--period", &period]);
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("(0 written by this close)"),
        "{}",
        String::from_utf8_lossy(&third.stdout)
    );
    let export = |format: &str| billing(&cfg, &["invoice", "--period", &period, "--format", format]).stdout;
    let (csv, json, html) = (export("csv"), export("json"), export("html"));
    assert_eq!(csv, export("csv"));
    let csv_text = String::from_utf8(csv.clone()).unwrap();
    assert!(csv_text.starts_with("invoice_number,status,"), "{csv_text}");
    assert!(csv_text.lines().skip(1).all(|l| l.contains(",final,")), "{csv_text}");
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[2]["currency"], "JPY");
    // 10 % of alpha's calls were 503s: the SLA credit is on its invoice.
    let credit = invoice_line(&v[0], "sla_credit");
    assert_eq!(credit["amount"], "-1.00");
    assert!(credit["description"].as_str().unwrap().contains("availability"), "{credit}");
    assert!(String::from_utf8_lossy(&html).matches("<section class=\"page\">").count() == 3);

    // A late event for the closed period: its invoice stays, next period gets the difference.
    let before = expected;
    produce_all(&producer(), &topic, &calls("alpha", "growth", 40, mid + 60)).await;
    let ok = wait_until(Duration::from_secs(60), || async {
        try_ch(&url, &format!("SELECT sum(requests) FROM {db}.usage_minute FINAL WHERE consumer_id = 'alpha'"))
            .await
            .unwrap_or_default()
            .trim()
            == "1540"
    })
    .await;
    assert!(ok, "the late events were not aggregated\n{}", agg.log_tail());
    assert_eq!(export("csv"), csv, "a closed invoice never changes");
    assert_eq!(export("json"), json);
    assert_eq!(export("html"), html);
    let after = expected_minor(&db, last_month, this_month).await;
    let minor = |text: &str, who: &str| -> i64 {
        text.lines().find_map(|l| l.strip_prefix(&format!("{who}\t"))).unwrap().parse().unwrap()
    };
    let diff = minor(&after, "alpha") - minor(&before, "alpha");
    assert!(diff > 0);
    let next =
        billing(&cfg, &["invoice", "--period", &time::month_label(now), "--consumer", "alpha", "--format", "json"])
            .stdout;
    let v: serde_json::Value = serde_json::from_slice(&next).unwrap();
    let line = invoice_line(&v[0], "adjustment");
    assert_eq!(line["amount"].as_str().unwrap().replace('.', "").parse::<i64>().unwrap(), diff, "{line}");
    assert!(line["description"].as_str().unwrap().contains(&period));
    drop((ingest, agg));
}

/// The invoice's line of `kind` (JSON export); fails the test, showing the invoice, if absent.
fn invoice_line(invoice: &serde_json::Value, kind: &str) -> serde_json::Value {
    invoice["lines"]
        .as_array()
        .and_then(|lines| lines.iter().find(|l| l["kind"] == kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} line in {invoice}"))
}
