//! End to end: client → edge → Kafka → ingest → ClickHouse, with the real binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tollgate_demo::traffic::{self, Caller};
use tollgate_e2e::*;

fn edge_config(topic: &str, upstream: std::net::SocketAddr) -> String {
    let hash = sha256_hex;
    format!(
        r#"
[edge]
instance_id = "edge-e2e"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
[[routes]]
id = "echo"
path_prefix = "/echo"
upstream = "http://{upstream}"
[plans.roomy]
rate_per_second = 100000
[plans.tight]
rate_per_second = 1
burst = 20
[[consumers]]
id = "acme"
plan = "roomy"
keys = [{{ id = "acme-1", sha256 = "{a}" }}]
[[consumers]]
id = "globex"
plan = "roomy"
keys = [{{ id = "globex-1", sha256 = "{g}" }}]
[[consumers]]
id = "initech"
plan = "tight"
keys = [{{ id = "initech-1", sha256 = "{i}" }}]
"#,
        kafka = kafka(),
        a = hash("key-acme"),
        g = hash("key-globex"),
        i = hash("key-initech"),
    )
}

/// 1,000 requests across three consumers, a bad key and an over-limit burst: ClickHouse holds
/// exactly one row per request, and counts per consumer, outcome and status equal what the
/// client saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_requests_one_row_each_counts_match_the_client() {
    let dir = TempDir::new("e2e_pipeline");
    let topic = unique("api_calls");
    let db = unique("e2e");
    let ch_url = clickhouse();
    create_topic(&topic, 3).await;
    let (upstream, echo) = start_echo().await;
    let mut ingest = start_ingest(dir.path(), "ingest", &ingest_config(&topic, &db, &unique("g"), &ch_url));
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &edge_config(&topic, upstream)).await;

    let caller = |label: &str, key: Option<&str>, n: usize, conc: usize| Caller {
        label: label.into(),
        key: key.map(str::to_owned),
        requests: n,
        concurrency: conc,
        pause: Duration::ZERO,
        path: "/echo/things?x=1".into(),
    };
    let mix = vec![
        caller("acme", Some("key-acme"), 400, 4),
        caller("globex", Some("key-globex"), 300, 4),
        // initech: burst 20 at 1/s, 200 requests at once: most are 429.
        caller("initech", Some("key-initech"), 200, 8),
        caller("bad-key", Some("key-wrong"), 60, 2),
        caller("no-key", None, 40, 2),
    ];
    let tally = traffic::run(&format!("http://{addr}"), mix).await;
    assert_eq!(tally.total(), 1000);
    assert_eq!(tally.transport_errors, 0);

    // What the client saw, as (consumer column, outcome, status) → count.
    let mut want: BTreeMap<(String, String, u16), u64> = BTreeMap::new();
    for ((label, status), n) in &tally.by_status {
        let consumer = if label == "bad-key" || label == "no-key" { String::new() } else { label.clone() };
        let outcome = match status {
            200 => "forwarded",
            401 => "unauthenticated",
            429 => "rate_limited",
            other => panic!("unexpected status {other} for {label}"),
        };
        *want.entry((consumer, outcome.to_owned(), *status)).or_default() += n;
    }
    assert!(want.keys().any(|(c, o, _)| c == "initech" && o == "rate_limited"), "the burst was not limited: {want:?}");
    assert_eq!(
        echo.requests.load(std::sync::atomic::Ordering::Relaxed),
        tally.by_status.iter().filter(|((_, s), _)| *s == 200).map(|(_, n)| n).sum::<u64>()
    );

    let arrived = wait_until(Duration::from_secs(60), || async {
        try_ch(&ch_url, &format!("SELECT count() FROM {db}.api_calls FINAL"))
            .await
            .map(|s| s.trim() == "1000")
            .unwrap_or(false)
    })
    .await;
    assert!(arrived, "not all events arrived; ingest log:\n{}\nedge log:\n{}", ingest.log_tail(), edge.log_tail());

    // Exactly one row per request: raw rows (without FINAL) too, and the ids are the ones the client got.
    assert_eq!(ch_u64(&ch_url, &format!("SELECT count() FROM {db}.api_calls")).await, 1000);
    let ids: BTreeSet<String> = ch(&ch_url, &format!("SELECT toString(event_id) FROM {db}.api_calls FORMAT TSV"))
        .await
        .lines()
        .map(str::to_owned)
        .collect();
    let client_ids: BTreeSet<String> = tally.request_ids.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 1000);
    assert_eq!(ids, client_ids);

    let rows = ch(&ch_url, &format!("SELECT consumer_id, toString(outcome), status, count() FROM {db}.api_calls FINAL GROUP BY consumer_id, outcome, status FORMAT TSV")).await;
    let mut got: BTreeMap<(String, String, u16), u64> = BTreeMap::new();
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        got.insert((f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap()), f[3].parse().unwrap());
    }
    assert_eq!(got, want);

    // The documented per-key query (schemas/queries/usage_by_api_key.sql), its month bounds
    // widened so a run across a month's end cannot move a row out: per consumer and key, all
    // calls and the billable (forwarded, < 500) ones, as the client saw them.
    let sql = std::fs::read_to_string(repo_root().join("schemas/queries/usage_by_api_key.sql"))
        .unwrap()
        .replace("addMonths(toStartOfMonth(now()), 1)", "toDateTime(4000000000)")
        .replace("toStartOfMonth(now())", "toDateTime(0)")
        .replace("FROM api_calls", &format!("FROM {db}.api_calls"));
    let sql: String = sql.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n");
    let rows =
        ch(&ch_url, &format!("SELECT consumer_id, credential_id, calls, billable_calls FROM ({sql}) FORMAT TSV")).await;
    let seen = |label: &str, status: Option<u16>| -> u64 {
        tally.by_status.iter().filter(|((l, s), _)| l == label && status.is_none_or(|w| *s == w)).map(|(_, n)| n).sum()
    };
    let expected: String = ["acme", "globex", "initech"]
        .iter()
        .map(|c| format!("{c}\t{c}-1\t{}\t{}\n", seen(c, None), seen(c, Some(200))))
        .collect();
    assert_eq!(rows, expected);

    // Every row carries the metered facts.
    let bad = ch_u64(
        &ch_url,
        &format!(
            "SELECT count() FROM {db}.api_calls WHERE edge_id != 'edge-e2e' OR latency_us = 0 OR method != 'GET' \
             OR path != '/echo/things' OR client_ip != '127.0.0.1' OR length(trace_id) != 32 OR response_bytes = 0 \
             OR (outcome = 'forwarded') != isNotNull(upstream_latency_us) OR (consumer_id != '') != (credential_id != '') \
             OR upstream_target != if(outcome = 'forwarded', 'http://{upstream}', '') OR isNotNull(grpc_status)"
        ),
    )
    .await;
    assert_eq!(bad, 0);

    assert_eq!(metric(admin, "tollgate_edge_events_dropped_total").await, 0);
    assert_eq!(metric(admin, "tollgate_edge_events_delivery_failed_total").await, 0);
    assert_eq!(metric(admin, "tollgate_edge_events_spooled_total").await, 0);
    assert_eq!(metric(admin, "tollgate_edge_events_produced_total").await, 1000);

    assert!(edge.terminate(Duration::from_secs(15)), "edge did not stop on SIGTERM");
    assert!(ingest.terminate(Duration::from_secs(15)), "ingest did not stop on SIGTERM");
    let _ = ch(&ch_url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// Two edge replicas in front of one pipeline (edges are stateless replicas): each meters its
/// own calls under its `edge_id`, and ClickHouse holds every call of both once, with the
/// counts the clients saw per edge and per consumer. Rate limits are per replica (README): a
/// consumer's burst of 20 is granted by each edge, so the two together let 2 × 20 through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edge_replicas_meter_into_one_pipeline_each_call_once() {
    let dir = TempDir::new("e2e_two_edges");
    let topic = unique("api_calls_2e");
    let db = unique("e2e2e");
    let ch_url = clickhouse();
    create_topic(&topic, 3).await;
    let (upstream, echo) = start_echo().await;
    let mut ingest = start_ingest(dir.path(), "ingest", &ingest_config(&topic, &db, &unique("g"), &ch_url));
    let mut edges = Vec::new();
    for id in ["edge-a", "edge-b"] {
        let cfg =
            edge_config(&topic, upstream).replace("instance_id = \"edge-e2e\"", &format!("instance_id = \"{id}\""));
        edges.push((id, start_edge(dir.path(), id, &cfg).await));
    }
    let caller = |label: &str, key: &str, n: usize| Caller {
        label: label.into(),
        key: Some(key.to_owned()),
        requests: n,
        concurrency: 4,
        pause: Duration::ZERO,
        path: "/echo/two".into(),
    };
    // Per edge: acme 150 calls; initech 60 at once against its burst of 20 at 1/s.
    let mut want: BTreeMap<(String, String, u16), u64> = BTreeMap::new();
    let (mut initech_ok, mut elapsed) = (0, 0.0);
    for (id, (_, addr, _)) in &edges {
        let t = std::time::Instant::now();
        let tally = traffic::run(
            &format!("http://{addr}"),
            vec![caller("acme", "key-acme", 150), caller("initech", "key-initech", 60)],
        )
        .await;
        let took = t.elapsed().as_secs_f64();
        assert_eq!((tally.total(), tally.transport_errors), (210, 0));
        for ((label, status), n) in &tally.by_status {
            *want.entry(((*id).to_owned(), label.clone(), *status)).or_default() += n;
        }
        // This replica grants the burst, plus what refills at 1/s while the calls run.
        let ok = tally.by_status.get(&("initech".to_owned(), 200)).copied().unwrap_or(0);
        assert!(ok >= 20 && ok as f64 <= 20.0 + took + 1.0, "{id}: initech got {ok} in {took:.1} s");
        (initech_ok, elapsed) = (initech_ok + ok, elapsed + took);
    }
    // More than one limiter could have granted over the whole time: each replica has its own.
    assert!(initech_ok as f64 > 20.0 + elapsed + 1.0, "initech got {initech_ok} in {elapsed:.1} s");
    assert_eq!(echo.requests.load(std::sync::atomic::Ordering::Relaxed), 300 + initech_ok);

    let arrived = wait_until(Duration::from_secs(60), || async {
        try_ch(&ch_url, &format!("SELECT count() FROM {db}.api_calls FINAL")).await.is_ok_and(|s| s.trim() == "420")
    })
    .await;
    assert!(arrived, "not all events arrived; ingest log:\n{}", ingest.log_tail());
    assert_eq!(ch_u64(&ch_url, &format!("SELECT count() FROM {db}.api_calls")).await, 420, "a call twice");
    let rows = ch(
        &ch_url,
        &format!(
            "SELECT edge_id, consumer_id, status, count() FROM {db}.api_calls FINAL \
             GROUP BY edge_id, consumer_id, status FORMAT TSV"
        ),
    )
    .await;
    let mut got: BTreeMap<(String, String, u16), u64> = BTreeMap::new();
    for line in rows.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        got.insert((f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap()), f[3].parse().unwrap());
    }
    assert_eq!(got, want);
    for (_, (mut edge, _, admin)) in edges {
        assert_eq!(metric(admin, "tollgate_edge_events_produced_total").await, 210);
        assert!(edge.terminate(Duration::from_secs(15)));
    }
    assert!(ingest.terminate(Duration::from_secs(15)));
    let _ = ch(&ch_url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
