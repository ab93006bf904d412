//! Lossless metering: the Kafka broker is stopped during 10,000 requests and started again;
//! requests keep succeeding, and every event reaches ClickHouse exactly once (via librdkafka's
//! queue, the edge's on-disk spool and its replay).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tollgate_demo::traffic::{self, Caller};
use tollgate_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_during_10000_requests_all_events_arrive_once() {
    let dir = TempDir::new("e2e_outage");
    let mut broker = PrivateBroker::start().await;
    let (topic, db, group) = (unique("calls"), unique("outage"), unique("g"));
    let url = clickhouse();
    create_topic_on(&broker.addr, &topic, 2).await;
    let (upstream, _) = start_echo().await;
    let key_hash = sha256_hex("key-acme");
    // The edge's producer is not idempotent (Tansu 0.6's SQLite storage panics on an idempotent
    // producer's first batch after a broker restart, "more or less than one row" in
    // idempotent_message_check): the duplicates that retries make are absorbed by the event_id
    // deduplication this test checks.
    let edge_cfg = format!(
        "[edge]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\nmessage_timeout_ms = 3000\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.big]\nrate_per_second = 100000\n\
         [[consumers]]\nid = \"acme\"\nplan = \"big\"\nkeys = [{{ id = \"k\", sha256 = \"{key_hash}\" }}]\n",
        broker.addr
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &edge_cfg).await;
    let mut ingest = start_ingest(dir.path(), "ingest", &ingest_config_on(&broker.addr, &topic, &db, &group, &url));

    let load = tokio::spawn(async move {
        let caller = Caller {
            label: "acme".into(),
            key: Some("key-acme".into()),
            requests: 10_000,
            // About 500 requests/s: the load outlasts the outage.
            concurrency: 2,
            pause: Duration::from_millis(3),
            path: "/echo/x".into(),
        };
        traffic::run(&format!("http://{addr}"), vec![caller]).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!load.is_finished(), "the load ended before the outage was over; make it longer");
    broker.resume().await;
    let tally = load.await.unwrap();
    assert_eq!(tally.transport_errors, 0);
    assert_eq!(tally.by_status.get(&("acme".to_owned(), 200)).copied(), Some(10_000), "{:?}", tally.by_status);

    let arrived = wait_until(Duration::from_secs(180), || async {
        try_ch(&url, &format!("SELECT count() FROM {db}.api_calls FINAL"))
            .await
            .map(|s| s.trim() == "10000")
            .unwrap_or(false)
    })
    .await;
    let have = try_ch(&url, &format!("SELECT count() FROM {db}.api_calls FINAL")).await.unwrap_or_default();
    assert!(arrived, "{} of 10000 arrived\nedge:\n{}\ningest:\n{}", have.trim(), edge.log_tail(), ingest.log_tail());
    assert_eq!(ch_u64(&url, &format!("SELECT uniqExact(event_id) FROM {db}.api_calls")).await, 10_000);
    let ids: std::collections::BTreeSet<String> =
        ch(&url, &format!("SELECT toString(event_id) FROM {db}.api_calls FINAL FORMAT TSV"))
            .await
            .lines()
            .map(str::to_owned)
            .collect();
    let client_ids: std::collections::BTreeSet<String> =
        tally.request_ids.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids, client_ids);

    assert_eq!(metric(admin, "tollgate_edge_events_dropped_total").await, 0);
    let spooled = metric(admin, "tollgate_edge_events_spooled_total").await;
    let replayed = metric(admin, "tollgate_edge_events_replayed_total").await;
    eprintln!("spooled {spooled}, replayed {replayed}");
    assert!(spooled > 0, "the outage never reached the spool");
    assert!(replayed > 0);
    assert!(edge.terminate(Duration::from_secs(30)));
    assert!(ingest.terminate(Duration::from_secs(15)));
    let _ = ch(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
