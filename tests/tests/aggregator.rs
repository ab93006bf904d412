//! The aggregator's exactly-once effect and percentiles, against the real broker and
//! ClickHouse: usage after a kill -9 and catch-up = usage of a from-scratch replay = usage of
//! two instances in one group = a direct SQL aggregation of the raw table (counts and bucket
//! counts exactly); late events still count and are counted; `usage` percentiles are within
//! the documented error of exact ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rand::{Rng, SeedableRng};
use tollgate_e2e::*;
use tollgate_schemas::{ApiCall, Encoder, Outcome};

const PARTITIONS: i32 = 3;
const WINDOWS: &str = "[windows]\nallowed_lateness_s = 2\nidle_close_ms = 1500\n";

/// `n` events spread over 5 minutes from `base_us`, sorted by time: 8 consumers and the
/// unauthenticated, two routes, a mix of outcomes and statuses, latencies over five decades.
fn workload(rng: &mut impl Rng, n: usize, base_us: i64) -> Vec<ApiCall> {
    let mut out: Vec<ApiCall> = (0..n)
        .map(|_| {
            let consumer = format!("c{}", rng.random_range(0..8));
            let mut e = sample_event(&consumer, base_us + rng.random_range(0..300_000_000));
            e.route_id = Some(["r0", "r1"][rng.random_range(0..2)].into());
            e.latency_us = 10f64.powf(rng.random_range(1.5..6.5)) as u64;
            e.request_bytes = rng.random_range(0..2000);
            e.response_bytes = rng.random_range(0..20_000);
            match rng.random_range(0..100) {
                0..70 => {}
                70..80 => e.status = 404,
                80..85 => e.status = 503,
                85..95 => (e.status, e.outcome) = (429, Outcome::RateLimited),
                _ => {
                    (e.status, e.outcome, e.consumer_id, e.credential_id) = (401, Outcome::Unauthenticated, None, None)
                }
            }
            e
        })
        .collect();
    out.sort_by_key(|e| e.start_time_us);
    out
}

fn encode(events: &[ApiCall]) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    events.iter().map(|e| (e.kafka_key().to_owned(), enc.encode(e).unwrap())).collect()
}

const USAGE_COLUMNS: &str = "minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
                             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count";

async fn usage_table(db: &str) -> String {
    ch(&clickhouse(), &format!("SELECT {USAGE_COLUMNS} FROM {db}.usage_minute FINAL ORDER BY minute, consumer_id, route_id, outcome, status_class FORMAT TSV")).await
}

/// The same rows straight from the raw table, with the HDR bucket bound computed in SQL
/// (2 significant digits: exact below 256, else the value with its low floor(log2 v) - 7
/// bits set).
async fn direct_sql(db: &str) -> String {
    ch(
        &clickhouse(),
        &format!(
            "SELECT toStartOfMinute(ts) AS minute, consumer_id, route_id, outcome, intDiv(status, 100) AS class, \
             count(), countIf(status >= 400 AND status < 500), countIf(status >= 500), sum(request_bytes), \
             sum(response_bytes), sum(latency_us), \
             sumMap([if(latency_us < 256, latency_us, bitOr(latency_us, toUInt64(bitShiftLeft(toUInt64(1), toUInt64(floor(log2(latency_us)) - 7)) - 1)))], [toUInt64(1)]) AS h, \
             tupleElement(h, 1), tupleElement(h, 2) \
             FROM {db}.api_calls FINAL GROUP BY minute, consumer_id, route_id, outcome, class \
             ORDER BY minute, consumer_id, route_id, outcome, class FORMAT TSV"
        ),
    )
    .await
    .lines()
    .map(|l| {
        // Drop the tuple column `h` (kept above only to name it).
        let mut cols: Vec<&str> = l.split('\t').collect();
        cols.remove(11);
        cols.join("\t")
    })
    .collect::<Vec<_>>()
    .join("\n")
        + "\n"
}

/// Waits until `db` has exactly `distinct` raw events and usage rows that add up to them.
/// Generous: several replays of the topic, by debug builds, share 2 cores with the other
/// tests; what is checked is the result, not the speed.
async fn wait_complete(db: &str, distinct: u64, procs: &[&Proc]) {
    let url = clickhouse();
    let counts = || async {
        let count = |sql: String| {
            let url = url.clone();
            async move { try_ch(&url, &sql).await.ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0) }
        };
        let raw = count(format!("SELECT count() FROM {db}.api_calls FINAL")).await;
        let used = count(format!("SELECT sum(requests) FROM {db}.usage_minute FINAL")).await;
        (raw, used)
    };
    let t = std::time::Instant::now();
    let ok = wait_until(Duration::from_secs(180), || async { counts().await == (distinct, distinct) }).await;
    let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.name, p.log_tail())).collect();
    let (raw, used) = counts().await;
    assert!(
        ok,
        "{db} did not reach {distinct} events in raw and usage in {:?}: raw {raw}, usage {used}\n{}",
        t.elapsed(),
        logs.join("\n")
    );
    eprintln!("{db}: {distinct} events in raw and usage after {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_catch_up_equals_replay_equals_two_instances_equals_sql() {
    let dir = TempDir::new("agg");
    let topic = unique("agg_calls");
    create_topic(&topic, PARTITIONS).await;
    let producer = producer();
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let base = (now_us() / 60_000_000 - 40) * 60_000_000; // a minute start, 40 minutes ago
    let events = workload(&mut rng, 12_000, base);
    let (first, second) = events.split_at(7_000);

    // Phase 1, with producer-retry duplicates right next to their originals.
    let mut log = Vec::new();
    for (i, e) in first.iter().enumerate() {
        log.push(e.clone());
        if i % 37 == 0 {
            log.push(e.clone());
        }
    }
    produce_all(&producer, &topic, &encode(&log)).await;

    let (db1, db2, db3) = (unique("agg_a"), unique("agg_b"), unique("agg_c"));
    let ingest1 =
        start_ingest(dir.path(), "ingest1", &ingest_config(&topic, &db1, &format!("{db1}-ingest"), &clickhouse()));
    let admin_port = free_port();
    let agg1_config = aggregator_config(
        &topic,
        &db1,
        &format!("{db1}-agg"),
        "agg1",
        &format!("{db1}-ingest"),
        &format!("{WINDOWS}[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n"),
    )
    // No commit before the kill: the restart re-reads minutes already written (recomputed
    // from the raw table) and minutes not written yet (from memory).
    .replace("ingest_group_id", "commit_interval_ms = 600000\ningest_group_id");
    let mut agg1 = start_aggregator(dir.path(), "agg1", &agg1_config);
    // kill -9 once some minutes are written, at a random moment after that.
    let url = clickhouse();
    let some = wait_until(Duration::from_secs(60), || async {
        try_ch(&url, &format!("SELECT count() FROM {db1}.usage_minute")).await.is_ok_and(|s| s.trim() != "0")
    })
    .await;
    assert!(some, "no usage written before the kill\n{}\n{}", agg1.log_tail(), ingest1.log_tail());
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
    agg1.kill9();

    // Phase 2 while it is down: new events, and duplicates of phase-1 events (spool replays).
    let mut log = second.to_vec();
    log.extend(first.iter().step_by(53).cloned());
    produce_all(&producer, &topic, &encode(&log)).await;
    let agg1 = start_aggregator(dir.path(), "agg1-restarted", &agg1_config);
    wait_complete(&db1, events.len() as u64, &[&agg1, &ingest1]).await;
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert_eq!(metric(admin, "tollgate_aggregator_partitions_assigned").await, PARTITIONS as u64);
    let (written, recomputed) = (
        metric(admin, "tollgate_aggregator_minutes_written_total").await,
        metric(admin, "tollgate_aggregator_minutes_recomputed_total").await,
    );
    assert!(
        recomputed > 0 && written > recomputed,
        "both paths after the restart: {written} written, {recomputed} recomputed"
    );

    // Late: events for the first minute, long closed, and duplicates of old events. (Whether
    // the phase-2 duplicates were late depended on how the partitions interleaved; these are
    // late for sure: every minute is closed.)
    let late_before = metric(admin, "tollgate_aggregator_late_events_total").await;
    let mut late = workload(&mut rng, 300, base);
    late.retain(|e| e.start_time_us < base + 60_000_000);
    let late_new = late.len();
    late.extend(first.iter().step_by(101).cloned());
    produce_all(&producer, &topic, &encode(&late)).await;
    let distinct = (events.len() + late_new) as u64;
    wait_complete(&db1, distinct, &[&agg1, &ingest1]).await;
    let late_seen = metric(admin, "tollgate_aggregator_late_events_total").await - late_before;
    assert_eq!(late_seen, late.len() as u64, "every late event counted, none else");

    // A from-scratch replay into a fresh database, and two instances in one group.
    let ingest2 =
        start_ingest(dir.path(), "ingest2", &ingest_config(&topic, &db2, &format!("{db2}-ingest"), &clickhouse()));
    let agg2 = start_aggregator(
        dir.path(),
        "agg2",
        &aggregator_config(&topic, &db2, &format!("{db2}-agg"), "agg2", &format!("{db2}-ingest"), WINDOWS),
    );
    let ingest3 =
        start_ingest(dir.path(), "ingest3", &ingest_config(&topic, &db3, &format!("{db3}-ingest"), &clickhouse()));
    let ports = [free_port(), free_port()];
    let two: Vec<Proc> = ["agg3a", "agg3b"]
        .iter()
        .zip(ports)
        .map(|(name, port)| {
            let extra = format!("{WINDOWS}[admin]\nlisten = \"127.0.0.1:{port}\"\n");
            start_aggregator(
                dir.path(),
                name,
                &aggregator_config(&topic, &db3, &format!("{db3}-agg"), name, &format!("{db3}-ingest"), &extra),
            )
        })
        .collect();
    wait_complete(&db2, distinct, &[&agg2, &ingest2]).await;
    wait_complete(&db3, distinct, &[&two[0], &two[1], &ingest3]).await;

    let after_kill = usage_table(&db1).await;
    let replay = usage_table(&db2).await;
    let two_instances = usage_table(&db3).await;
    let sql = direct_sql(&db1).await;
    assert!(after_kill.lines().count() > 300, "{after_kill}");
    assert_eq!(after_kill, sql, "kill -9 + catch-up vs direct SQL on the raw table");
    assert_eq!(replay, sql, "from-scratch replay vs direct SQL");
    assert_eq!(two_instances, sql, "two instances in one group vs direct SQL");
    // Both instances did work: each owns some partitions, and together they read every event.
    let (mut read, mut held) = (0, 0);
    for (p, port) in two.iter().zip(ports) {
        let admin = format!("127.0.0.1:{port}").parse().unwrap();
        let events = metric(admin, "tollgate_aggregator_events_total").await;
        assert!(events > 0, "{} read nothing\n{}", p.name, p.log_tail());
        read += events;
        let partitions = metric(admin, "tollgate_aggregator_partitions_assigned").await;
        assert!(partitions > 0, "{} holds no partition\n{}", p.name, p.log_tail());
        held += partitions;
        assert!(std::fs::read_to_string(&p.log).unwrap().contains("partitions assigned"), "{}", p.log_tail());
    }
    assert!(read >= distinct, "{read} events read by the two instances, {distinct} distinct");
    assert_eq!(held, PARTITIONS as u64, "the two instances share the topic's partitions");

    // The usage CLI: counts equal the raw table's; percentiles within 1/128 above the exact
    // nearest-rank percentiles of the raw latencies.
    let cfg = dir.path().join("cli.toml");
    std::fs::write(&cfg, &agg1_config).unwrap();
    let from = (base / 1_000_000).to_string();
    let out = std::process::Command::new(bin("tollgate-aggregator"))
        .args(["usage", "--config"])
        .arg(&cfg)
        .args(["--consumer", "c3", "--from", &from, "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v[0];
    assert_eq!(row["consumer"], "c3");
    let raw_latencies = ch(
        &url,
        &format!(
            "SELECT latency_us FROM {db1}.api_calls FINAL WHERE consumer_id = 'c3' ORDER BY latency_us FORMAT TSV"
        ),
    )
    .await;
    let sorted: Vec<u64> = raw_latencies.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(row["requests"].as_u64().unwrap(), sorted.len() as u64);
    let errors_5xx =
        ch_u64(&url, &format!("SELECT count() FROM {db1}.api_calls FINAL WHERE consumer_id = 'c3' AND status >= 500"))
            .await;
    assert_eq!(row["errors_5xx"].as_u64().unwrap(), errors_5xx);
    for (q, key) in [(0.5, "p50_us"), (0.95, "p95_us"), (0.99, "p99_us")] {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        let exact = sorted[rank - 1];
        let got = row[key].as_u64().unwrap();
        assert!(got >= exact && (got as f64) <= exact as f64 * (1.0 + 1.0 / 128.0), "{key}: {got} vs exact {exact}");
    }
    // The documented SQL (schemas/queries/usage_percentiles.sql) reads the same numbers.
    let doc = std::fs::read_to_string(repo_root().join("schemas/queries/usage_percentiles.sql")).unwrap();
    let window = "minute >= toStartOfMonth(now()) AND minute < now()";
    assert!(doc.contains(window));
    let sql: String = doc.lines().filter(|l| !l.starts_with("--")).collect::<Vec<_>>().join("\n").replace(window, "1");
    let rows = ch(
        &url,
        &format!(
            "SELECT consumer, calls, errors_5xx, p50_ms, p95_ms, p99_ms FROM ({sql}) WHERE consumer = 'c3' FORMAT TSV"
        )
        .replace("usage_minute_final", &format!("{db1}.usage_minute_final")),
    )
    .await;
    let ms = |key: &str| format!("{}", (row[key].as_u64().unwrap() as f64 / 10.0).round() / 100.0);
    assert_eq!(
        rows.trim(),
        format!("c3\t{}\t{errors_5xx}\t{}\t{}\t{}", sorted.len(), ms("p50_us"), ms("p95_us"), ms("p99_us")),
        "documented query vs CLI"
    );
    drop((ingest1, ingest2, ingest3, agg1, agg2, two));
}

/// The aggregator's stall watchdog: a coordinator that answers every SyncGroup "rebalance in
/// progress" (librdkafka's mock cluster; a real broker cannot be told to) leaves it without
/// partitions while events wait. It notices, restarts its run with a new consumer, and once
/// the coordinator behaves it reads every event (its `events_total` metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_rebalance_is_noticed_and_the_run_restarted() {
    use rdkafka::ClientConfig;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let dir = TempDir::new("e2e_agg_stuck");
    let (topic, db, group) = (unique("calls"), unique("aggstuck"), unique("agg"));
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&topic, 2, 1).unwrap();
    mock.create_topic(tollgate_schemas::topics::QUOTA_STATE, 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    produce_all(&producer, &topic, &encoded_events(1_000, &["a", "b"])).await;

    mock.request_errors(RDKafkaApiKey::SyncGroup, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 5_000]);
    let admin = free_port();
    let cfg = aggregator_config(&topic, &db, &group, &format!("{group}-0"), &unique("ingest"), "")
        .replace(&format!("brokers = \"{}\"", kafka()), &format!("brokers = \"{brokers}\""))
        .replace("ingest_group_id = ", "stall_timeout_ms = 2000\ningest_group_id = ")
        + &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n")
        + MOCK_GROUP_SESSION;
    let mut agg = start_aggregator(dir.path(), "aggregator", &cfg);
    let noticed = wait_until(Duration::from_secs(60), || async {
        std::fs::read_to_string(&agg.log).unwrap_or_default().contains("Kafka consumer stalled")
    })
    .await;
    assert!(noticed, "the watchdog did not notice:\n{}", agg.log_tail());
    let log = std::fs::read_to_string(&agg.log).unwrap();
    assert!(log.contains("no partition assigned while partition"), "{log}");

    mock.clear_request_errors(RDKafkaApiKey::SyncGroup);
    let http = Http::new();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let events = || async {
        let (_, _, body) = http.get(admin_addr, "/metrics", &[]).await;
        body.lines()
            .find_map(|l| l.strip_prefix("tollgate_aggregator_events_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let read = wait_until(Duration::from_secs(120), || async { events().await >= 1_000 }).await;
    assert!(read, "read {} of 1000:\n{}", events().await, std::fs::read_to_string(&agg.log).unwrap_or_default());
    assert!(agg.terminate(Duration::from_secs(15)), "the aggregator did not stop");
    let _ = ch(&clickhouse(), &format!("DROP DATABASE IF EXISTS {db}")).await;
}
