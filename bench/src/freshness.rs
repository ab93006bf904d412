//! Freshness: the time from the edge sending a response to that call's row being queryable
//! in ClickHouse, with requests at a fixed open-loop rate through the real edge and ingest
//! (release builds), Tansu on memory storage. A poller lists the run's event ids every
//! 100 ms, so figures are accurate to about 100 ms. The floor to compare with is ingest's
//! `batch.max_wait_ms` (250 ms here): a batch waits at most that long before it is written.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Digest;

use crate::common::*;

const POLL: Duration = Duration::from_millis(100);

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn edge_config(broker: &str, upstream: std::net::SocketAddr) -> String {
    let hash = hex::encode(sha2::Sha256::digest(b"bench-key"));
    format!(
        "[edge]\ninstance_id = \"edge-bench\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{broker}\"\ntopic = \"bench-fresh\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.unlimited]\nrate_per_second = 1000000\n\
         [[consumers]]\nid = \"bench\"\nplan = \"unlimited\"\nkeys = [{{ id = \"bench-1\", sha256 = \"{hash}\" }}]\n"
    )
}

/// Sends `rate` requests/s for `seconds`, with the API keys `keys` in turn; returns
/// (request id, response completion µs).
pub async fn load(edge: std::net::SocketAddr, rate: u64, seconds: u64, keys: &[&str]) -> Vec<(String, u64)> {
    let keys: Vec<http::HeaderValue> = keys.iter().map(|k| http::HeaderValue::from_str(k).unwrap()).collect();
    let mut next_key = 0;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(512).build_http();
    let done = Arc::new(Mutex::new(Vec::with_capacity((rate * seconds) as usize)));
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for _ in 0..seconds * 100 {
        tick.tick().await;
        for _ in 0..per_tick {
            let (client, done) = (client.clone(), Arc::clone(&done));
            let key = keys[next_key % keys.len()].clone();
            next_key += 1;
            tasks.push(tokio::spawn(async move {
                let req = http::Request::get(format!("http://{edge}/echo/fresh"))
                    .header("x-api-key", key)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(resp) = client.request(req).await {
                    let id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    let _ = resp.into_body().collect().await;
                    done.lock().unwrap().push((id, now_us()));
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }

    done.lock().unwrap().clone()
}

pub async fn run(ch_url: &str, rate: u64, seconds: u64, runs: usize) -> anyhow::Result<()> {
    let dir = workdir("freshness");
    let broker = Broker::start(&dir).await;
    broker.create_topic("bench-fresh", 4).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    tokio::spawn(tollgate_demo::upstream::serve(listener, Arc::default()));
    let db = format!("bench_fresh_{}", std::process::id());
    std::fs::write(dir.join("ingest.toml"), ingest_config(&broker.addr, "bench-fresh", &db, ch_url, &db))?;
    let _ingest = spawn(
        Command::new(release_bin("tollgate-ingest"))
            .arg("run")
            .arg("--config")
            .arg(dir.join("ingest.toml"))
            .env("RUST_LOG", "warn"),
        &dir.join("ingest.log"),
    );
    let (_edge, edge, _) = start_edge(&dir, &edge_config(&broker.addr, upstream)).await;
    // Warm-up: connections, group join, table creation.
    let _ = load(edge, 200, 2, &["bench-key"]).await;
    while ch_count(ch_url, &db).await < 400 {
        tokio::time::sleep(POLL).await;
    }

    let (mut p50s, mut p99s) = (vec![], vec![]);
    for run in 0..runs {
        let since = now_us();
        let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let (seen, stop, ch_url, db) = (Arc::clone(&seen), Arc::clone(&stop), ch_url.to_owned(), db.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let text = ch(
                        &ch_url,
                        &format!("SELECT toString(event_id) FROM {db}.api_calls WHERE start_time_us >= {since}"),
                    )
                    .await;
                    let t = now_us();
                    {
                        let mut s = seen.lock().unwrap();
                        for id in text.lines() {
                            s.entry(id.to_owned()).or_insert(t);
                        }
                    }
                    tokio::time::sleep(POLL).await;
                }
            })
        };
        let t = Instant::now();
        let done = load(edge, rate, seconds, &["bench-key"]).await;
        let achieved = done.len() as f64 / t.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.lock().unwrap().len() < done.len() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = poller.await;
        let seen = seen.lock().unwrap();
        let mut lags: Vec<f64> =
            done.iter().filter_map(|(id, at)| seen.get(id).map(|s| (s.saturating_sub(*at)) as f64 / 1000.0)).collect();
        let missing = done.len() - lags.len();
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p95, p99, max) = (
            percentile(&lags, 50.0),
            percentile(&lags, 95.0),
            percentile(&lags, 99.0),
            lags.last().copied().unwrap_or(f64::NAN),
        );
        println!(
            "run {}: {} requests at {achieved:.0}/s; freshness P50 {p50:.0} ms, P95 {p95:.0} ms, P99 {p99:.0} ms, max {max:.0} ms; {missing} not seen within 30 s",
            run + 1,
            done.len()
        );
        p50s.push(p50);
        p99s.push(p99);
    }
    let (p50, p99) = (median(&mut p50s), median(&mut p99s));
    println!("\nmedian of {runs} runs at {rate} requests/s for {seconds} s (poll resolution {} ms):", POLL.as_millis());
    println!(
        "  freshness P50 {p50:.0} ms, P99 {p99:.0} ms; floor = batch.max_wait_ms 250 ms; ratio P99/floor {:.1}",
        p99 / 250.0
    );
    println!("  goal P99 < 2000 ms: {}", if p99 < 2000.0 { "met" } else { "NOT met" });
    ch(ch_url, &format!("DROP DATABASE {db}")).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
