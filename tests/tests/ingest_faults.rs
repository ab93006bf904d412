//! Ingest under faults: kill -9 mid-stream, poison messages, ClickHouse down, a rebalance that
//! never completes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tollgate_e2e::*;

async fn count_final(url: &str, db: &str) -> u64 {
    try_ch(url, &format!("SELECT count() FROM {db}.api_calls FINAL"))
        .await
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// kill -9 in the middle of a stream, restart: no event lost, none counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing_counts_nothing_twice() {
    let dir = TempDir::new("e2e_kill9");
    let (topic, db, group) = (unique("calls"), unique("kill9"), unique("g"));
    let url = clickhouse();
    create_topic(&topic, 2).await;
    let producer = producer();
    let first = encoded_events(20_000, &["a", "b", "c"]);
    let t = std::time::Instant::now();
    produce_all(&producer, &topic, &first).await;
    eprintln!("produced 20000 in {:?}", t.elapsed());

    let mut cfg = ingest_config(&topic, &db, &group, &url);
    cfg = cfg.replace("max_rows = 2000", "max_rows = 500");
    let mut ingest = start_ingest(dir.path(), "ingest1", &cfg);
    let started = wait_until(Duration::from_secs(60), || async { count_final(&url, &db).await >= 1000 }).await;
    assert!(started, "ingest wrote nothing:\n{}", ingest.log_tail());
    ingest.kill9();
    let at_kill = ch_u64(&url, &format!("SELECT count() FROM {db}.api_calls")).await;
    assert!(at_kill < 20_000, "killed too late to test anything ({at_kill} rows)");

    // The stream goes on while ingest is dead.
    let second = encoded_events(20_000, &["a", "b", "c"]);
    produce_all(&producer, &topic, &second).await;
    let mut ingest = start_ingest(dir.path(), "ingest2", &cfg);
    let t = std::time::Instant::now();
    let done = wait_until(Duration::from_secs(120), || async { count_final(&url, &db).await >= 40_000 }).await;
    eprintln!("caught up in {:?}", t.elapsed());
    assert!(done, "only {} of 40000 arrived:\n{}", count_final(&url, &db).await, ingest.log_tail());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The documented queries: FINAL and the view; each event exactly once.
    assert_eq!(count_final(&url, &db).await, 40_000);
    assert_eq!(ch_u64(&url, &format!("SELECT count() FROM {db}.api_calls_unique")).await, 40_000);
    assert_eq!(ch_u64(&url, &format!("SELECT uniqExact(event_id) FROM {db}.api_calls")).await, 40_000);
    let per_consumer = ch(
        &url,
        &format!(
            "SELECT consumer_id, count() FROM {db}.api_calls FINAL GROUP BY consumer_id ORDER BY consumer_id FORMAT TSV"
        ),
    )
    .await;
    let mut want = std::collections::BTreeMap::<&str, u64>::new();
    for (key, _) in first.iter().chain(&second) {
        *want.entry(key.as_str()).or_default() += 1;
    }
    let want: String = want.iter().map(|(k, n)| format!("{k}\t{n}\n")).collect();
    assert_eq!(per_consumer, want);
    let raw = ch_u64(&url, &format!("SELECT count() FROM {db}.api_calls")).await;
    eprintln!("raw rows including redeliveries: {raw} (rows at kill: {at_kill})");
    assert!(ingest.terminate(Duration::from_secs(15)));
    let _ = ch(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// A poison message lands in the DLQ with the error; later good messages are ingested and the
/// partition's committed offset moves past the poison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dlq_and_the_partition_keeps_flowing() {
    let dir = TempDir::new("e2e_poison");
    let (topic, db, group) = (unique("calls"), unique("poison"), unique("g"));
    let dlq = format!("{topic}.dlq");
    let url = clickhouse();
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;

    let good = encoded_events(10, &["acme"]);
    let mut truncated = good[0].1.clone();
    truncated.truncate(truncated.len() - 3);
    let mut unknown_fp = good[1].1.clone();
    unknown_fp[4] ^= 0x55;
    let mut items = good[..5].to_vec();
    items.push(("acme".into(), b"{\"not\": \"avro\"}".to_vec()));
    items.push(("acme".into(), truncated.clone()));
    items.push(("acme".into(), unknown_fp.clone()));
    items.extend_from_slice(&good[5..]);
    let p = producer();
    produce_all(&p, &topic, &items).await;

    let (cfg, admin) = with_admin(&ingest_config(&topic, &db, &group, &url));
    let started = now_us() / 1_000_000;
    let mut ingest = start_ingest(dir.path(), "ingest", &cfg);
    let done = wait_until(Duration::from_secs(60), || async { count_final(&url, &db).await >= 10 }).await;
    assert!(done, "good messages not ingested:\n{}", ingest.log_tail());
    // The admin port counts what happened: 13 messages, 10 rows, 3 dead letters.
    let written = wait_until(Duration::from_secs(5), || async {
        metric(admin, "tollgate_ingest_rows_written_total").await == 10
    })
    .await;
    assert!(written, "{}", metrics_text(admin).await);
    for (name, value) in [
        ("tollgate_ingest_messages_total", 13),
        ("tollgate_ingest_dead_lettered_total", 3),
        ("tollgate_ingest_pending_rows", 0),
        ("tollgate_ingest_insert_failures_total", 0),
        ("tollgate_ingest_consumer_restarts_total", 0),
        ("tollgate_ingest_partitions_assigned", 1),
    ] {
        assert_eq!(metric(admin, name).await, value, "{name}");
    }
    // Every field reaches its column; here the gRPC code (schema v5): four of the ten good
    // events carry UNAVAILABLE, the others none.
    let grpc = ch(
        &url,
        &format!("SELECT countIf(grpc_status = 14 AND status = 503), countIf(isNull(grpc_status)) FROM {db}.api_calls FINAL FORMAT TSV"),
    )
    .await;
    assert_eq!(grpc.trim(), "4\t6");
    let last = metric(admin, "tollgate_ingest_last_write_seconds").await as i64;
    assert!(last >= started && last <= now_us() / 1_000_000, "{last}");
    assert_eq!(try_get(&format!("http://{admin}/healthz")).await.unwrap(), (200, "ok\n".to_owned()));

    // The DLQ holds the three poison messages, payload intact, with the error and source.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("DLQ message").unwrap();
        let headers = msg.headers().expect("DLQ headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        seen.push((
            msg.payload().unwrap().to_vec(),
            header("tollgate-error"),
            header("tollgate-source-offset"),
            header("tollgate-source-topic"),
        ));
    }
    assert_eq!(seen[0].0, b"{\"not\": \"avro\"}".to_vec());
    assert!(seen[0].1.contains("bad magic"), "{}", seen[0].1);
    assert_eq!(seen[0].2, "5");
    assert_eq!(seen[0].3, topic);
    assert_eq!(seen[1].0, truncated);
    assert!(seen[1].1.contains("truncated") || seen[1].1.contains("invalid Avro"), "{}", seen[1].1);
    assert_eq!(seen[2].0, unknown_fp);
    assert!(seen[2].1.contains("unknown writer schema fingerprint"), "{}", seen[2].1);

    assert!(ingest.terminate(Duration::from_secs(15)));
    assert_eq!(count_final(&url, &db).await, 10);
    // Everything, poison included, is committed.
    let check: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", kafka()).set("group.id", &group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    let committed = tokio::task::spawn_blocking(move || check.committed_offsets(tpl, Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(committed.find_partition(&topic, 0).unwrap().offset(), Offset::Offset(13));
    let _ = ch(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}

/// ClickHouse stopped while events flow, then started: all events arrive, none twice, and
/// ingest never gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_then_up_all_events_arrive_once() {
    let dir = TempDir::new("e2e_chdown");
    let (topic, db, group) = (unique("calls"), unique("chdown"), unique("g"));
    let mut private = PrivateClickHouse::start().await;
    let url = private.url();
    create_topic(&topic, 2).await;
    let p = producer();
    produce_all(&p, &topic, &encoded_events(5_000, &["a", "b"])).await;
    let (cfg, admin) = with_admin(&ingest_config(&topic, &db, &group, &url));
    let mut ingest = start_ingest(dir.path(), "ingest", &cfg);
    let first = wait_until(Duration::from_secs(60), || async { count_final(&url, &db).await >= 5_000 }).await;
    assert!(first, "first half not ingested:\n{}", ingest.log_tail());

    private.stop();
    produce_all(&p, &topic, &encoded_events(5_000, &["a", "b"])).await;
    // Let ingest fail and retry for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        ingest.child.try_wait().unwrap().is_none(),
        "ingest exited while ClickHouse was down:\n{}",
        ingest.log_tail()
    );
    assert!(
        ingest.log_tail().contains("ClickHouse insert failed"),
        "no failed insert was logged:\n{}",
        ingest.log_tail()
    );
    private.resume().await;

    let all = wait_until(Duration::from_secs(60), || async { count_final(&url, &db).await >= 10_000 }).await;
    assert!(all, "only {} of 10000:\n{}", count_final(&url, &db).await, ingest.log_tail());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count_final(&url, &db).await, 10_000);
    assert_eq!(ch_u64(&url, &format!("SELECT uniqExact(event_id) FROM {db}.api_calls")).await, 10_000);
    // The failed inserts are counted; every message was read once and every row written (a
    // row may be written twice if ClickHouse took an insert that then failed for ingest).
    assert!(metric(admin, "tollgate_ingest_insert_failures_total").await >= 1);
    assert_eq!(metric(admin, "tollgate_ingest_messages_total").await, 10_000);
    assert_eq!(metric(admin, "tollgate_ingest_consumer_restarts_total").await, 0);
    assert!(metric(admin, "tollgate_ingest_rows_written_total").await >= 10_000);
    assert_eq!(metric(admin, "tollgate_ingest_pending_rows").await, 0);
    assert_eq!(metric(admin, "tollgate_ingest_partitions_assigned").await, 2);
    assert!(ingest.terminate(Duration::from_secs(15)));
}

/// A group coordinator that never completes a rebalance (every SyncGroup answered "rebalance in
/// progress", as Tansu did after a broker restart or a member that died as leader) leaves ingest
/// without partitions while events wait. Its stall watchdog notices (no partition, unread
/// messages, no commits moving), rebuilds the consumer, and once the coordinator behaves every
/// event arrives exactly once. librdkafka's mock cluster plays the coordinator: a real broker
/// cannot be told to misbehave on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_rebalance_is_noticed_and_the_consumer_rebuilt() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let dir = TempDir::new("e2e_stuck");
    let (topic, db, group) = (unique("calls"), unique("stuck"), unique("g"));
    let url = clickhouse();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&topic, 2, 1).unwrap();
    mock.create_topic(&format!("{topic}.dlq"), 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let events = encoded_events(1_000, &["a", "b"]);
    produce_all(&producer, &topic, &events).await;

    // Every SyncGroup fails for now: ingest joins, never gets an assignment.
    mock.request_errors(RDKafkaApiKey::SyncGroup, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 5_000]);
    let cfg = ingest_config_on(&brokers, &topic, &db, &group, &url)
        .replace("instance_id = ", "stall_timeout_ms = 2000\ninstance_id = ")
        + MOCK_GROUP_SESSION;
    let (cfg, admin) = with_admin(&cfg);
    let mut ingest = start_ingest(dir.path(), "ingest", &cfg);
    let noticed = wait_until(Duration::from_secs(60), || async {
        std::fs::read_to_string(&ingest.log).unwrap_or_default().contains("Kafka consumer stalled")
    })
    .await;
    assert!(noticed, "the watchdog did not notice:\n{}", ingest.log_tail());
    assert_eq!(count_final(&url, &db).await, 0, "nothing can have been read without an assignment");
    let log = std::fs::read_to_string(&ingest.log).unwrap();
    assert!(log.contains("no partition assigned while partition"), "{log}");
    let rebuilt = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_ingest_consumer_restarts_total").await >= 1
    })
    .await;
    assert!(rebuilt, "{}", metrics_text(admin).await);
    assert_eq!(metric(admin, "tollgate_ingest_partitions_assigned").await, 0);

    // The coordinator behaves again: the rebuilt consumer gets the partitions.
    mock.clear_request_errors(RDKafkaApiKey::SyncGroup);
    let done = wait_until(Duration::from_secs(120), || async { count_final(&url, &db).await >= 1_000 }).await;
    assert!(
        done,
        "only {} of 1000 arrived:\n{}",
        count_final(&url, &db).await,
        std::fs::read_to_string(&ingest.log).unwrap_or_default()
    );
    assert_eq!(ch_u64(&url, &format!("SELECT uniqExact(event_id) FROM {db}.api_calls")).await, 1_000);
    assert_eq!(count_final(&url, &db).await, 1_000);
    assert!(ingest.terminate(Duration::from_secs(15)));
    let _ = ch(&url, &format!("DROP DATABASE IF EXISTS {db}")).await;
}
