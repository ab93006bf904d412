//! Ingest throughput: a topic pre-filled with N events on Tansu (memory storage), then
//! `tollgate-ingest` (release) from offset 0 into a fresh ClickHouse database.
//! Baselines in the same run, on the same data:
//! - consume-only: ingest's own Kafka consumer reading the N messages, doing nothing with them;
//! - decode+insert-only: decoding the N payloads and inserting them with the same sink code,
//!   no Kafka.
//!
//! The pipeline cannot beat the slower baseline; the ratio to it shows what the pipeline's
//! overlap of reading and writing achieves.

use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use tollgate_ingest::sink::{self, RawRow};
use tollgate_schemas::{ApiCall, Decoder, Encoder, Outcome};

use crate::common::*;

fn events(n: usize) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    let base =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64 - 3_600_000_000;
    (0..n)
        .map(|i| {
            let consumer = format!("consumer-{}", i % 100);
            let call = ApiCall {
                event_id: uuid::Uuid::now_v7(),
                start_time_us: base + (i as i64) * 7,
                edge_id: "edge-bench".into(),
                consumer_id: Some(consumer.clone()),
                credential_id: Some(format!("{consumer}-key")),
                route_id: Some(format!("route-{}", i % 7)),
                method: "GET".into(),
                host: "api.example.com".into(),
                path: format!("/v1/items/{}", i % 1000),
                status: if i % 50 == 0 { 429 } else { 200 },
                outcome: if i % 50 == 0 { Outcome::RateLimited } else { Outcome::Forwarded },
                latency_us: 800 + (i as u64 % 5000),
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

/// Produces `items` as fast as the broker takes them; returns events/s.
pub(crate) async fn produce(broker: &str, topic: &str, items: &[(String, Vec<u8>)]) -> f64 {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let t = Instant::now();
    let mut pending = Vec::with_capacity(items.len());
    for (k, v) in items {
        let mut rec = FutureRecord::to(topic).key(k).payload(v);
        loop {
            match p.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((_, r)) => {
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    for f in pending {
        f.await.unwrap().unwrap();
    }
    items.len() as f64 / t.elapsed().as_secs_f64()
}

/// The same consumer (settings, static membership) as ingest's, doing nothing with messages.
async fn consume_only(broker: &str, topic: &str, n: usize) -> f64 {
    let group = format!("bench-consume-{}", uuid::Uuid::now_v7());
    let cfg = tollgate_ingest::config::KafkaConfig {
        brokers: broker.into(),
        topic: topic.into(),
        dlq_topic: format!("{topic}.dlq"),
        group_id: group.clone(),
        instance_id: format!("{group}-0"),
        stall_timeout: None,
        properties: Default::default(),
    };
    let c = tollgate_ingest::source::consumer(&cfg, &Default::default()).unwrap();
    let first = c.recv().await.unwrap();
    let mut bytes = first.payload().map_or(0, <[u8]>::len);
    drop(first);
    let t = Instant::now();
    for _ in 1..n {
        let m = c.recv().await.unwrap();
        bytes += m.payload().map_or(0, <[u8]>::len);
    }
    std::hint::black_box(bytes);
    (n - 1) as f64 / t.elapsed().as_secs_f64()
}

async fn decode_insert_only(ch_url: &str, items: &[(String, Vec<u8>)]) -> f64 {
    let db = format!("bench_insert_{}", std::process::id());
    let cfg = tollgate_ingest::config::ClickHouseConfig {
        url: ch_url.into(),
        database: db.clone(),
        user: "default".into(),
        password: String::new(),
        migrate_on_start: true,
    };
    sink::prepare(&cfg).await.unwrap();
    let client = sink::client(&cfg);
    let dec = Decoder::new().unwrap();
    let t = Instant::now();
    for chunk in items.chunks(50_000) {
        let rows: Vec<RawRow> =
            chunk.iter().map(|(_, p)| RawRow::from_event(dec.decode(p).unwrap()).unwrap()).collect();
        sink::insert(&client, &rows).await.unwrap();
    }
    let rate = items.len() as f64 / t.elapsed().as_secs_f64();
    ch(ch_url, &format!("DROP DATABASE {db}")).await;
    rate
}

/// Returns (seconds from process start to the first rows, sustained rate between 10 % and
/// 90 % of the events being in ClickHouse: start-up and the last partial batch excluded).
async fn ingest_once(
    ch_url: &str,
    broker: &str,
    topic: &str,
    n: usize,
    dir: &std::path::Path,
    run: usize,
) -> (f64, f64) {
    let db = format!("bench_ingest_{}_{run}", std::process::id());
    let group = format!("bench-ingest-{}-{run}", std::process::id());
    let cfg = dir.join(format!("ingest-{run}.toml"));
    std::fs::write(&cfg, ingest_config(broker, topic, &group, ch_url, &db)).unwrap();
    let t0 = Instant::now();
    let _p = spawn(
        Command::new(release_bin("tollgate-ingest")).arg("run").arg("--config").arg(&cfg).env("RUST_LOG", "warn"),
        &dir.join(format!("ingest-{run}.log")),
    );
    let (lo, hi) = (n as u64 / 10, n as u64 * 9 / 10);
    let (mut first, mut t_lo, mut t_hi) = (None, None, None);
    let (mut c_lo, mut c_hi) = (0, 0);
    loop {
        let c = ch_count(ch_url, &db).await;
        let now = Instant::now();
        if c > 0 && first.is_none() {
            first = Some(now);
        }
        if c >= lo && t_lo.is_none() {
            (t_lo, c_lo) = (Some(now), c);
        }
        if c >= hi && t_hi.is_none() {
            (t_hi, c_hi) = (Some(now), c);
        }
        if c >= n as u64 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "ingest stalled at {c}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (first, t_lo, t_hi) = (first.unwrap(), t_lo.unwrap(), t_hi.unwrap());
    ch(ch_url, &format!("DROP DATABASE {db}")).await;
    ((first - t0).as_secs_f64(), (c_hi - c_lo) as f64 / (t_hi - t_lo).as_secs_f64())
}

pub async fn run(ch_url: &str, n: usize, runs: usize) -> anyhow::Result<()> {
    let dir = workdir("ingest");
    let broker = Broker::start(&dir).await;
    let topic = "bench-api-calls";
    broker.create_topic(topic, 4).await;
    let items = events(n);
    let produce_rate = produce(&broker.addr, topic, &items).await;
    println!("prepared {n} events on Tansu memory:// ({produce_rate:.0} events/s produced)");

    let (mut consume, mut insert, mut startup, mut sustained) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        consume.push(consume_only(&broker.addr, topic, n).await);
        insert.push(decode_insert_only(ch_url, &items).await);
        let (a, b) = ingest_once(ch_url, &broker.addr, topic, n, &dir, run).await;
        startup.push(a);
        sustained.push(b);
        println!(
            "run {}: consume-only {:.0}/s, decode+insert-only {:.0}/s, ingest {:.0}/s sustained (first rows after {:.1} s)",
            run + 1,
            consume[run],
            insert[run],
            sustained[run],
            startup[run]
        );
    }
    let (c, i, e, s) = (median(&mut consume), median(&mut insert), median(&mut startup), median(&mut sustained));
    println!("\nmedian of {runs} runs, {n} events:");
    println!("  baseline consume-only (same consumer)     {c:>10.0} events/s");
    println!("  baseline decode+insert-only (no Kafka)     {i:>10.0} events/s");
    println!("  tollgate-ingest, sustained (10 %..90 %)    {s:>10.0} events/s");
    println!("  tollgate-ingest, start to first rows       {e:>10.1} s (group join, migrations, first batch)");
    println!("  ratio sustained / slower baseline          {:>10.2}", s / c.min(i));
    println!("  goal >= 100000 events/s sustained: {}", if s >= 100_000.0 { "met" } else { "NOT met" });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
