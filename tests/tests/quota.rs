//! Monthly quotas end to end: events → ingest → aggregator → `quota-state` → edge.
//! A hard quota of 100 calls: once the state has propagated, call 101 and later get 429
//! `quota-exceeded` with the quota headers, and the edge's local counting keeps the overshoot
//! at zero on one edge; with two edges the overshoot stays within what the other edge admits
//! before the next state; a consumer that used up its quota last month is let through in the
//! new month; a soft quota warns and lets calls through; the next state does not double count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tollgate_common::time;
use tollgate_e2e::*;
use tollgate_schemas::Encoder;

const PLANS: &str = "[plans.free]\nrate_per_second = 1000\n[plans.trial]\nrate_per_second = 1000\n";

fn consumer(id: &str, plan: &str) -> String {
    format!(
        "[[consumers]]\nid = \"{id}\"\nplan = \"{plan}\"\nkeys = [{{ id = \"{id}-1\", sha256 = \"{}\" }}]\n",
        sha256_hex(&format!("key-{id}"))
    )
}

/// `n` forwarded calls of `consumer` on plan `plan` at `ts_s`, encoded.
fn events(consumer: &str, plan: &str, n: usize, ts_s: i64) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    (0..n)
        .map(|i| {
            let mut e = sample_event(consumer, ts_s * 1_000_000 + i as i64);
            e.plan_id = Some(plan.to_owned());
            (consumer.to_owned(), enc.encode(&e).unwrap())
        })
        .collect()
}

async fn call(client: &Http, addr: std::net::SocketAddr, key: &str) -> (u16, http::HeaderMap, String) {
    client.get(addr, "/echo/q", &[("x-api-key", key)]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn hard_quota_rejects_call_101_soft_quota_warns_and_a_new_month_resets() {
    let dir = TempDir::new("quota");
    let (topic, quota_topic, db) = (unique("q_calls"), unique("q_state"), unique("quota"));
    create_topic(&topic, 2).await;
    create_topic(&quota_topic, 1).await;
    let now = now_us() / 1_000_000;
    let this_month = time::month_start(now);
    // History the aggregator reads first: acme used 60 of its 100 calls two minutes ago (in
    // this month), bob used all 100 last month, carol 9 of a soft 10.
    let recent = (now - 120).max(this_month + 1);
    let mut history = events("acme", "free", 60, recent);
    history.extend(events("bob", "free", 100, this_month - 120));
    history.extend(events("carol", "trial", 9, recent));
    history.extend(events("dave", "free", 60, recent));
    produce_all(&producer(), &topic, &history).await;

    let _ingest =
        start_ingest(dir.path(), "ingest", &ingest_config(&topic, &db, &format!("{db}-ingest"), &clickhouse()));
    let agg_cfg = aggregator_config(
        &topic,
        &db,
        &format!("{db}-agg"),
        "agg",
        &format!("{db}-ingest"),
        &format!(
            "[windows]\nallowed_lateness_s = 1\nidle_close_ms = 500\n[quota]\ntopic = \"{quota_topic}\"\n\
             [quota.plans.free]\nmonthly_calls = 100\nenforcement = \"hard\"\n\
             [quota.plans.trial]\nmonthly_calls = 10\nenforcement = \"soft\"\nwarning_percent = 80\n"
        ),
    );
    let agg = start_aggregator(dir.path(), "agg", &agg_cfg);
    let (upstream, _) = start_echo().await;
    let edge_cfg = format!(
        "{}quota_topic = \"{quota_topic}\"\n[[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n{PLANS}{}{}{}",
        edge_head("quota-edge", &topic),
        consumer("acme", "free"),
        consumer("bob", "free"),
        consumer("carol", "trial")
    ) + &consumer("dave", "free");
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &edge_cfg).await;

    // The states propagate: aggregator → quota-state → edge.
    let ok =
        wait_until(Duration::from_secs(90), || async { metric(admin, "tollgate_edge_quota_consumers").await == 4 })
            .await;
    assert!(ok, "quota states did not reach the edge\n{}\n{}", agg.log_tail(), edge.log_tail());
    let states = ch(
        &clickhouse(),
        &format!(
            "SELECT consumer_id, period, used, status FROM {db}.quota_state FINAL ORDER BY consumer_id FORMAT TSV"
        ),
    )
    .await;
    let last_month = time::month_label(this_month - 1);
    let month = time::month_label(now);
    assert_eq!(
        states,
        format!(
            "acme\t{month}\t60\tok\nbob\t{last_month}\t100\texceeded\ncarol\t{month}\t9\twarning\ndave\t{month}\t60\tok\n"
        ),
        "quota_state in ClickHouse"
    );

    // acme: 40 more calls pass, then every call is refused (one edge: no overshoot).
    let client = Http::new();
    let next_month = time::format_utc(time::next_month_start(now));
    let mut statuses = Vec::new();
    for i in 0..50 {
        let (status, headers, body) = call(&client, addr, "key-acme").await;
        statuses.push(status);
        assert_eq!(headers["x-quota-limit"], "100");
        assert_eq!(headers["x-quota-reset"], next_month.as_str());
        if i < 40 {
            assert_eq!(status, 200, "call {} of the month", 61 + i);
            assert_eq!(headers["x-quota-used"], (61 + i).to_string().as_str());
        } else {
            assert_eq!(status, 429, "call {} of the month", 61 + i);
            assert_eq!(headers["x-quota-used"], "100");
            assert_eq!(headers["content-type"], "application/problem+json");
            assert!(body.contains("https://tollgate.dev/problems/quota-exceeded"), "{body}");
            let retry: i64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry > 0 && retry <= time::next_month_start(now) - now + 5, "{retry}");
        }
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 40, "exactly the quota, no overshoot");

    // bob used up last month's quota; this month starts again.
    let (status, headers, _) = call(&client, addr, "key-bob").await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-quota-used"], "1");
    assert_eq!(headers["x-quota-reset"], next_month.as_str());

    // carol: soft quota, warned past 80 % and exceeded, never refused.
    for used in 10..=12 {
        let (status, headers, _) = call(&client, addr, "key-carol").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-quota-used"], used.to_string().as_str());
        assert!(headers["x-quota-warning"].to_str().unwrap().contains(&format!("{used} of 10")));
    }

    // Two edges: each counts only what it admits itself until the next state, so dave (60 of
    // 100 used) can get 40 calls through each: the overshoot is at most what the other edge
    // admits within the enforcement lag, here bounded by the 40 left (docs/ARCHITECTURE.md).
    let (edge2, addr2, admin2) = start_edge(dir.path(), "edge2", &edge_cfg.replace("quota-edge", "quota-edge-2")).await;
    let ok =
        wait_until(Duration::from_secs(30), || async { metric(admin2, "tollgate_edge_quota_consumers").await == 4 })
            .await;
    assert!(ok, "the second edge did not load the states\n{}", edge2.log_tail());
    let mut admitted_by = [0u64; 2];
    for i in 0..100 {
        let (status, _, _) = call(&client, if i % 2 == 0 { addr } else { addr2 }, "key-dave").await;
        admitted_by[i % 2] += u64::from(status == 200);
    }
    let admitted = admitted_by[0] + admitted_by[1];
    let overshoot = (60 + admitted).saturating_sub(100);
    eprintln!("two edges: {admitted} of dave's 100 calls admitted with 40 left in the quota: overshoot {overshoot}");
    assert!((40..=80).contains(&admitted), "{admitted}");
    assert!(overshoot <= 40, "overshoot {overshoot} beyond what the other edge can admit");

    // Once this minute closes, the aggregator's state counts acme's 100 forwarded calls (not
    // the 429s), and the edge does not count the calls it saw locally a second time.
    let applied = metric(admin, "tollgate_edge_quota_states_applied_total").await;
    let url = clickhouse();
    let ok = wait_until(Duration::from_secs(100), || async {
        ch(
            &url,
            &format!(
                "SELECT used FROM {db}.quota_state FINAL WHERE consumer_id = 'acme' AND period = '{month}' FORMAT TSV"
            ),
        )
        .await
        .trim()
            == "100"
            && metric(admin, "tollgate_edge_quota_states_applied_total").await > applied
    })
    .await;
    assert!(ok, "acme's state did not reach 100\n{}", agg.log_tail());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, headers, _) = call(&client, addr, "key-acme").await;
    assert_eq!((status, headers["x-quota-used"].to_str().unwrap()), (429, "100"));
    // acme's 10 refusals, and dave's on this edge.
    assert_eq!(metric(admin, "tollgate_edge_quota_rejected_total").await, 10 + 1 + (50 - admitted_by[0]));
    // The next state has both edges' calls for dave: both refuse him from then on.
    let want = (60 + admitted).to_string();
    let ok = wait_until(Duration::from_secs(100), || async {
        ch(
            &url,
            &format!(
                "SELECT used FROM {db}.quota_state FINAL WHERE consumer_id = 'dave' AND period = '{month}' FORMAT TSV"
            ),
        )
        .await
        .trim()
            == want
    })
    .await;
    assert!(ok, "dave's state does not count what both edges admitted ({want})\n{}", agg.log_tail());
    let ok = wait_until(Duration::from_secs(30), || async {
        call(&client, addr, "key-dave").await.0 == 429 && call(&client, addr2, "key-dave").await.0 == 429
    })
    .await;
    assert!(ok, "dave still admitted after the state with both edges' calls");
    drop(edge2);
}
