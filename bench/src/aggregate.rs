//! Aggregator replay throughput: a topic pre-filled with N events over 60 minutes (Tansu on
//! memory storage), already written to ClickHouse by ingest; then `tollgate-aggregator`
//! (release) from offset 0 into an empty `usage_minute`, timed until its rows add up to N.
//! Baselines in the same run, on the same data:
//! - read+decode-only: the aggregator's Kafka consumer settings, decoding every message and
//!   doing nothing else (the floor of reading the log);
//! - recompute-only: recomputing and writing all 60 minutes from the raw table with the
//!   aggregator's own code, no Kafka (the floor of the ClickHouse side).

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use tollgate_schemas::{ApiCall, Decoder, Encoder, Outcome};

use crate::common::*;

const MINUTES: i64 = 60;
const CONSUMERS: usize = 100;

fn events(n: usize, base_s: i64) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    let step_us = MINUTES * 60_000_000 / n as i64;
    (0..n)
        .map(|i| {
            let consumer = format!("consumer-{}", i % CONSUMERS);
            let call = ApiCall {
                event_id: uuid::Uuid::now_v7(),
                start_time_us: base_s * 1_000_000 + i as i64 * step_us,
                edge_id: "edge-bench".into(),
                consumer_id: Some(consumer.clone()),
                credential_id: Some(format!("{consumer}-key")),
                route_id: Some(format!("route-{}", i % 7)),
                method: "GET".into(),
                host: "api.example.com".into(),
                path: format!("/v1/items/{}", i % 1000),
                status: [200, 200, 200, 200, 200, 200, 404, 429, 503][i % 9],
                outcome: if i % 9 == 7 { Outcome::RateLimited } else { Outcome::Forwarded },
                latency_us: 200 + (i as u64 * 7919) % 200_000,
                upstream_latency_us: Some(700),
                request_bytes: 120,
                response_bytes: 2400,
                client_ip: "10.1.2.3".into(),
                user_agent: Some("bench/1".into()),
                trace_id: Some(format!("{:032x}", i)),
                plan_id: Some("pro".into()),
                upstream_target: Some("http://10.0.0.5:8080".into()),
                grpc_status: None,
            };
            (consumer, enc.encode(&call).unwrap())
        })
        .collect()
}

fn aggregator_config(broker: &str, topic: &str, group: &str, ingest_group: &str, ch_url: &str, db: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{broker}\"\ntopic = \"{topic}\"\ngroup_id = \"{group}\"\ninstance_id = \"{group}-0\"\n\
         ingest_group_id = \"{ingest_group}\"\n[clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{db}\"\n"
    )
}

/// The aggregator's consumer settings, decoding each message, nothing else.
async fn read_decode_only(broker: &str, topic: &str, n: usize) -> f64 {
    let group = format!("bench-readdecode-{}", uuid::Uuid::now_v7());
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", &group)
        .set("group.instance.id", format!("{group}-0"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let dec = Decoder::new().unwrap();
    let first = c.recv().await.unwrap();
    let mut sum = dec.summarize(first.payload().unwrap()).unwrap().start_time_us;
    drop(first);
    let t = Instant::now();
    for _ in 1..n {
        let m = c.recv().await.unwrap();
        sum = sum.wrapping_add(dec.summarize(m.payload().unwrap()).unwrap().start_time_us);
    }
    std::hint::black_box(sum);
    (n - 1) as f64 / t.elapsed().as_secs_f64()
}

/// Recomputes and writes every minute with the aggregator's store code, no Kafka.
async fn recompute_only(ch_url: &str, db: &str, base_s: i64, n: usize) -> f64 {
    let client = clickhouse::Client::default().with_url(ch_url).with_database(db).with_validation(false);
    let consumers: std::collections::BTreeSet<String> = (0..CONSUMERS).map(|i| format!("consumer-{i}")).collect();
    let t = Instant::now();
    for m in 0..MINUTES {
        let rows = tollgate_aggregator::store::recompute(&client, base_s + m * 60, &consumers, 1).await.unwrap();
        tollgate_aggregator::store::write(&client, &rows).await.unwrap();
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    ch(ch_url, &format!("TRUNCATE TABLE {db}.usage_minute")).await;
    rate
}

/// Minutes with rows (each holds n / 60 events); a light query, so that polling does not
/// take ClickHouse's CPU from the run.
async fn minutes_written(ch_url: &str, db: &str) -> u64 {
    ch(ch_url, &format!("SELECT uniqExact(minute) FROM {db}.usage_minute")).await.trim().parse().unwrap_or(0)
}

async fn usage_sum(ch_url: &str, db: &str) -> u64 {
    ch(ch_url, &format!("SELECT sum(requests) FROM {db}.usage_minute FINAL")).await.trim().parse().unwrap_or(0)
}

/// What every run shares.
struct Setup<'a> {
    ch_url: &'a str,
    broker: &'a str,
    topic: &'a str,
    ingest_group: &'a str,
    db: &'a str,
    n: usize,
    dir: &'a std::path::Path,
}

/// Returns (seconds from start to all rows, sustained rate between 10 % and 90 %).
async fn aggregate_once(setup: &Setup<'_>, run: usize) -> (f64, f64) {
    let Setup { ch_url, broker, topic, ingest_group, db, n, dir } = *setup;
    let group = format!("bench-agg-{}-{run}", std::process::id());
    let cfg = dir.join(format!("aggregator-{run}.toml"));
    std::fs::write(&cfg, aggregator_config(broker, topic, &group, ingest_group, ch_url, db)).unwrap();
    let t0 = Instant::now();
    let _p = spawn(
        Command::new(release_bin("tollgate-aggregator")).arg("run").arg("--config").arg(&cfg).env("RUST_LOG", "warn"),
        &dir.join(format!("aggregator-{run}.log")),
    );
    let minutes = MINUTES as u64;
    let (lo, hi) = (minutes / 10, minutes * 9 / 10);
    let (mut t_lo, mut t_hi, mut c_lo, mut c_hi) = (None, None, 0, 0);
    loop {
        let c = minutes_written(ch_url, db).await;
        let now = Instant::now();
        if c >= lo && t_lo.is_none() {
            (t_lo, c_lo) = (Some(now), c);
        }
        if c >= hi && t_hi.is_none() {
            (t_hi, c_hi) = (Some(now), c);
        }
        if c >= minutes && usage_sum(ch_url, db).await >= n as u64 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "aggregator stalled at {c} minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_minute = n as f64 / minutes as f64;
    let total = t0.elapsed().as_secs_f64();
    ch(ch_url, &format!("TRUNCATE TABLE {db}.usage_minute")).await;
    (total, (c_hi - c_lo) as f64 * per_minute / (t_hi.unwrap() - t_lo.unwrap()).as_secs_f64())
}

pub async fn run(ch_url: &str, n: usize, runs: usize) -> anyhow::Result<()> {
    let dir = workdir("aggregate");
    let broker = Broker::start(&dir).await;
    let topic = "bench-agg-calls";
    broker.create_topic(topic, 4).await;
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let base_s = (now_s / 60 - 3 * MINUTES) * 60;
    let items = events(n, base_s);
    crate::ingest::produce(&broker.addr, topic, &items).await;
    // Ingest the raw table once (not timed): the aggregator recomputes minutes from it.
    let db = format!("bench_agg_{}", std::process::id());
    let ingest_group = format!("{db}-ingest");
    std::fs::write(dir.join("ingest.toml"), ingest_config(&broker.addr, topic, &ingest_group, ch_url, &db))?;
    let ingest = spawn(
        Command::new(release_bin("tollgate-ingest"))
            .arg("run")
            .arg("--config")
            .arg(dir.join("ingest.toml"))
            .env("RUST_LOG", "warn"),
        &dir.join("ingest.log"),
    );
    while ch_count(ch_url, &db).await < n as u64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // its last offsets committed
    drop(ingest);
    println!("prepared {n} events over {MINUTES} minutes, {CONSUMERS} consumers, in Kafka and in ClickHouse");

    let (mut decode, mut recompute, mut total, mut sustained) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        decode.push(read_decode_only(&broker.addr, topic, n).await);
        recompute.push(recompute_only(ch_url, &db, base_s, n).await);
        let setup = Setup { ch_url, broker: &broker.addr, topic, ingest_group: &ingest_group, db: &db, n, dir: &dir };
        let (a, b) = aggregate_once(&setup, run).await;
        total.push(a);
        sustained.push(b);
        println!(
            "run {}: read+decode-only {:.0}/s, recompute-only {:.0}/s, aggregator {:.0}/s sustained ({:.1} s start to all rows = {:.0}/s overall)",
            run + 1,
            decode[run],
            recompute[run],
            sustained[run],
            total[run],
            n as f64 / total[run]
        );
    }
    let (d, r, s, t) = (median(&mut decode), median(&mut recompute), median(&mut sustained), median(&mut total));
    println!("\nmedian of {runs} runs, {n} events:");
    println!("  baseline read+decode-only {d:.0} events/s; baseline recompute-only {r:.0} events/s");
    println!(
        "  aggregator replay {s:.0} events/s sustained ({:.2}x read+decode-only: minutes seen whole are written from memory, so reading the log is the bound), {:.0} events/s from start (includes the group join)",
        s / d,
        n as f64 / t
    );
    println!("  goal >= 200,000 events/s: {}", if s >= 200_000.0 { "met" } else { "NOT met" });
    ch(ch_url, &format!("DROP DATABASE {db}")).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
