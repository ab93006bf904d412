//! Aggregation lag through the whole pipeline: requests at a fixed open-loop rate through the
//! real edge, ingest and aggregator (release builds, default `allowed_lateness_s` = 10), Tansu
//! on memory storage. For each full minute of load, two times measured from the end of the
//! minute's lateness window (minute end + allowed lateness, the earliest the minute can be
//! final):
//! - **usage**: until `usage_minute FINAL` holds all of the minute's calls (as many as the raw
//!   table has for it);
//! - **quota**: until the edge has applied a quota state counting the minute (its
//!   `tollgate_edge_quota_covered_until_seconds` gauge reaches the minute's end).
//!
//! Every call of a minute has the same lag past the window, so the per-call P99 is the
//! largest of the minutes' values. Polls run every 100 ms: figures are accurate to ~100 ms.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::Digest;

use crate::common::*;

const POLL: Duration = Duration::from_millis(100);
const CONSUMERS: usize = 8;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn edge_config(broker: &str, upstream: std::net::SocketAddr) -> String {
    let mut c = format!(
        "[edge]\ninstance_id = \"edge-bench\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{broker}\"\ntopic = \"bench-lag\"\nquota_topic = \"bench-lag-quota\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.metered]\nrate_per_second = 1000000\n"
    );
    for i in 0..CONSUMERS {
        let hash = hex::encode(sha2::Sha256::digest(format!("bench-key-{i}").as_bytes()));
        c.push_str(&format!(
            "[[consumers]]\nid = \"bench-{i}\"\nplan = \"metered\"\nkeys = [{{ id = \"bench-{i}-1\", sha256 = \"{hash}\" }}]\n"
        ));
    }
    c
}

fn aggregator_config(broker: &str, ch_url: &str, db: &str, lateness_s: u32) -> String {
    format!(
        "[kafka]\nbrokers = \"{broker}\"\ntopic = \"bench-lag\"\ngroup_id = \"{db}-agg\"\ninstance_id = \"{db}-agg-0\"\n\
         ingest_group_id = \"{db}-ingest\"\n[clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{db}\"\n\
         [windows]\nallowed_lateness_s = {lateness_s}\n\
         [quota]\ntopic = \"bench-lag-quota\"\n[quota.plans.metered]\nmonthly_calls = 1000000000000\n"
    )
}

async fn edge_gauge(admin: std::net::SocketAddr, name: &str) -> i64 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let Ok(resp) = client.get(format!("http://{admin}/metrics").parse().unwrap()).await else { return 0 };
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

fn per_minute(text: &str) -> BTreeMap<i64, u64> {
    text.lines()
        .filter_map(|l| {
            let (m, n) = l.split_once('\t')?;
            Some((m.parse().ok()?, n.parse().ok()?))
        })
        .collect()
}

pub async fn run(ch_url: &str, rate: u64, minutes: i64, lateness_s: u32) -> anyhow::Result<()> {
    let dir = workdir("lag");
    let broker = Broker::start(&dir).await;
    broker.create_topic("bench-lag", 4).await;
    broker.create_topic("bench-lag-quota", 1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream = listener.local_addr()?;
    tokio::spawn(tollgate_demo::upstream::serve(listener, Arc::default()));
    let db = format!("bench_lag_{}", std::process::id());
    std::fs::write(
        dir.join("ingest.toml"),
        ingest_config(&broker.addr, "bench-lag", &format!("{db}-ingest"), ch_url, &db),
    )?;
    std::fs::write(dir.join("aggregator.toml"), aggregator_config(&broker.addr, ch_url, &db, lateness_s))?;
    let run = |name: &str, args: &[&std::ffi::OsStr]| {
        spawn(Command::new(release_bin(name)).args(args).env("RUST_LOG", "warn"), &dir.join(format!("{name}.log")))
    };
    let _ingest = run("tollgate-ingest", &["run".as_ref(), "--config".as_ref(), dir.join("ingest.toml").as_os_str()]);
    let _agg =
        run("tollgate-aggregator", &["run".as_ref(), "--config".as_ref(), dir.join("aggregator.toml").as_os_str()]);
    let (_edge, edge, admin) = start_edge(&dir, &edge_config(&broker.addr, upstream)).await;
    let keys: Vec<String> = (0..CONSUMERS).map(|i| format!("bench-key-{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    // Warm-up (connections, group joins, tables), then start at a minute boundary.
    let _ = crate::freshness::load(edge, 200, 3, &keys).await;
    let first = (now_ms() / 60_000 + 1) * 60;
    tokio::time::sleep(Duration::from_millis((first * 1000 - now_ms()).max(0) as u64)).await;
    let last = first + (minutes - 1) * 60;
    println!(
        "load: {rate} requests/s from {} for {minutes} minutes; allowed lateness {lateness_s} s",
        tollgate_common_time(first)
    );

    let usage_at: Arc<Mutex<BTreeMap<i64, i64>>> = Arc::default();
    let quota_at: Arc<Mutex<BTreeMap<i64, i64>>> = Arc::default();
    let poller = {
        let (usage_at, quota_at, ch_url, db) =
            (Arc::clone(&usage_at), Arc::clone(&quota_at), ch_url.to_owned(), db.clone());
        tokio::spawn(async move {
            loop {
                let usage = per_minute(&ch(&ch_url, &format!("SELECT toUInt32(minute), sum(requests) FROM {db}.usage_minute FINAL WHERE minute >= toDateTime({first}) GROUP BY minute")).await);
                let raw = per_minute(&ch(&ch_url, &format!("SELECT toUInt32(toStartOfMinute(ts)) AS m, count() FROM {db}.api_calls FINAL WHERE ts >= toDateTime({first}) GROUP BY m")).await);
                let covered = edge_gauge(admin, "tollgate_edge_quota_covered_until_seconds").await;
                let t = now_ms();
                {
                    let mut u = usage_at.lock().unwrap();
                    for (m, n) in &usage {
                        if *n > 0 && raw.get(m) == Some(n) {
                            u.entry(*m).or_insert(t);
                        }
                    }
                    let mut q = quota_at.lock().unwrap();
                    let mut m = first;
                    while m <= last && covered >= m + 60 {
                        q.entry(m).or_insert(t);
                        m += 60;
                    }
                    if u.contains_key(&last) && q.contains_key(&last) {
                        return;
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        })
    };
    let done = crate::freshness::load(edge, rate, (minutes * 60) as u64 + 1, &keys).await;
    let wait = tokio::time::timeout(Duration::from_secs(u64::from(lateness_s) + 90), poller).await;
    println!(
        "{} requests sent; {}",
        done.len(),
        if wait.is_ok() { "every minute seen" } else { "timed out waiting for the last minute" }
    );
    let (usage_at, quota_at) = (usage_at.lock().unwrap().clone(), quota_at.lock().unwrap().clone());
    let (mut usage_lags, mut quota_lags) = (vec![], vec![]);
    println!("\nminute (UTC)          usage visible after window   quota at edge after window");
    let mut m = first;
    while m <= last {
        let window_end = (m + 60 + i64::from(lateness_s)) * 1000;
        let u = usage_at.get(&m).map(|t| (t - window_end) as f64 / 1000.0);
        let q = quota_at.get(&m).map(|t| (t - window_end) as f64 / 1000.0);
        let show = |v: Option<f64>| v.map_or_else(|| "not seen".to_owned(), |v| format!("{v:.2} s"));
        println!("{}      {:>12}                  {:>12}", tollgate_common_time(m), show(u), show(q));
        usage_lags.extend(u);
        quota_lags.extend(q);
        m += 60;
    }
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let (u, q) = (max(&usage_lags), max(&quota_lags));
    println!("\nP99 over calls (= the largest minute, every call of a minute has its lag):");
    println!(
        "  usage visible {u:.2} s after the lateness window (goal < 2 s: {})",
        if u < 2.0 && usage_lags.len() as i64 == minutes { "met" } else { "NOT met" }
    );
    println!(
        "  quota at the edge {q:.2} s after the lateness window (goal < 2 s: {})",
        if q < 2.0 && quota_lags.len() as i64 == minutes { "met" } else { "NOT met" }
    );
    ch(ch_url, &format!("DROP DATABASE {db}")).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tollgate_common_time(secs: i64) -> String {
    let s = secs.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
