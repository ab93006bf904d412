//! SLO burn-rate alerts end to end: events → ingest → aggregator → `slo_burn_rate` and alert
//! notifications on a webhook (→ `slo_alerts`).
//!
//! One aggregator evaluates an availability objective over all calls and a latency objective
//! per consumer, with one rule (10-minute and 1-minute windows, 5x). History with a burst of
//! 5xx and timeouts, then live traffic, 50 % 5xx: the availability alert fires once (after the
//! webhook's first 500, retried), with exactly the counts of the windows it names (calls
//! refused before forwarding count neither way); the slow consumer's latency alert fires, the
//! fast one's does not. A restarted aggregator does not notify it again; once the live traffic
//! is healthy for a minute it resolves. The webhook's deliveries, `slo_alerts` and
//! `slo_burn_rate` agree with counts the test computes from its own events.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tollgate_common::time;
use tollgate_e2e::*;
use tollgate_schemas::{ApiCall, Encoder, Outcome};

const AVAILABILITY: &str = "api/page/10m-1m";
const SLOW: &str = "lat/page/10m-1m/slowco";

/// An event as the test remembers it: time, and whether the availability objective counts it
/// and as bad.
#[derive(Clone, Copy)]
struct Seen {
    ts_us: i64,
    counted: bool,
    bad: bool,
}

fn seen(e: &ApiCall) -> Seen {
    let counted = matches!(e.outcome, Outcome::Forwarded | Outcome::UpstreamError | Outcome::UpstreamTimeout);
    let bad = matches!(e.outcome, Outcome::UpstreamError | Outcome::UpstreamTimeout)
        || (e.outcome == Outcome::Forwarded && e.status >= 500);
    Seen { ts_us: e.start_time_us, counted, bad }
}

/// (calls, bad calls) the availability objective counts in `[end - minutes, end)`.
fn expected(events: &[Seen], end_s: i64, minutes: i64) -> (u64, u64) {
    let (from, to) = ((end_s - minutes * 60) * 1_000_000, end_s * 1_000_000);
    let inside = events.iter().filter(|e| e.counted && e.ts_us >= from && e.ts_us < to);
    let calls = inside.clone().count() as u64;
    (calls, inside.filter(|e| e.bad).count() as u64)
}

fn event(consumer: &str, ts_us: i64, status: u16, outcome: Outcome, latency_us: u64) -> ApiCall {
    let mut e = sample_event(consumer, ts_us);
    (e.status, e.outcome, e.latency_us) = (status, outcome, latency_us);
    e
}

/// Minutes `m0 - 10 .. m0 - 1`: acme 20 calls a minute (one a 404), plus a 429 and a 401
/// that no objective counts; in the last 3 minutes half of acme's calls are 503s and one more
/// times out upstream. slowco: 10 calls of 500 ms a minute in the last 3 minutes.
fn history(m0: i64) -> Vec<ApiCall> {
    let mut out = Vec::new();
    for k in 1..=10 {
        let start = (m0 - k * 60) * 1_000_000;
        let burst = k <= 3;
        for i in 0..20 {
            let ts = start + i * 2_000_000;
            let status = match i {
                0 => 404,
                _ if burst && i % 2 == 1 => 503,
                _ => 200,
            };
            out.push(event("acme", ts, status, Outcome::Forwarded, 1_000));
        }
        out.push(event("acme", start + 41_000_000, 429, Outcome::RateLimited, 50));
        let mut anon = event("acme", start + 42_000_000, 401, Outcome::Unauthenticated, 50);
        (anon.consumer_id, anon.credential_id) = (None, None);
        out.push(anon);
        if burst {
            out.push(event("acme", start + 43_000_000, 504, Outcome::UpstreamTimeout, 30_000_000));
            for i in 0..10 {
                out.push(event("slowco", start + 44_000_000 + i * 1_000_000, 200, Outcome::Forwarded, 500_000));
            }
        }
    }
    out.sort_by_key(|e| e.start_time_us);
    out
}

/// What the tests start from: a directory, a topic of 2 partitions holding [`history`] up to
/// the current minute `m0`, and ingest writing it to a new database.
struct Setup {
    dir: TempDir,
    topic: String,
    db: String,
    m0: i64,
    past: Vec<ApiCall>,
    _ingest: Proc,
}

async fn start_with_history(prefix: &str) -> Setup {
    let dir = TempDir::new(prefix);
    let (topic, db) = (unique(&format!("{prefix}_calls")), unique(prefix));
    create_topic(&topic, 2).await;
    let m0 = now_us() / 60_000_000 * 60;
    let past = history(m0);
    produce_all(&producer(), &topic, &encode(&past)).await;
    let ingest =
        start_ingest(dir.path(), "ingest", &ingest_config(&topic, &db, &format!("{db}-ingest"), &clickhouse()));
    Setup { dir, topic, db, m0, past, _ingest: ingest }
}

fn encode(events: &[ApiCall]) -> Vec<(String, Vec<u8>)> {
    let enc = Encoder::new().unwrap();
    events.iter().map(|e| (e.kafka_key().to_owned(), enc.encode(e).unwrap())).collect()
}

/// The webhook: answers the first `fail_first` deliveries `fail_status`, then 200; keeps what
/// it accepted and what it refused.
struct Hook {
    /// Set to 0 to make a failing webhook recover.
    fail_first: AtomicUsize,
    fail_status: u16,
    attempts: AtomicUsize,
    accepted: Mutex<Vec<Value>>,
    refused: Mutex<Vec<Value>>,
}

impl Hook {
    fn of(&self, id: &str) -> Vec<Value> {
        // tollgate's notifications carry the alert's id; PagerDuty events as `dedup_key`.
        self.accepted.lock().unwrap().iter().filter(|n| n["id"] == id || n["dedup_key"] == id).cloned().collect()
    }
}

/// The webhook's URL (http, or https with the test certificate) and what it received; its
/// first `fail_first` answers are 500s.
async fn start_hook(fail_first: usize, https: bool) -> (String, Arc<Hook>) {
    start_hook_failing(fail_first, 500, https).await
}

/// [`start_hook`] answering its first `fail_first` deliveries `status` (with a reason in the
/// body, as receivers do).
async fn start_hook_failing(fail_first: usize, status: u16, https: bool) -> (String, Arc<Hook>) {
    let hook = Arc::new(Hook {
        fail_first: AtomicUsize::new(fail_first),
        fail_status: status,
        attempts: AtomicUsize::new(0),
        accepted: Mutex::new(Vec::new()),
        refused: Mutex::new(Vec::new()),
    });
    let h = Arc::clone(&hook);
    let handler = move |req: http::Request<hyper::body::Incoming>| {
        let h = Arc::clone(&h);
        async move {
            let token = req.headers().get("authorization").map(|v| v.as_bytes().to_vec());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap();
            let (status, reason) = if h.attempts.fetch_add(1, Ordering::SeqCst) < h.fail_first.load(Ordering::SeqCst) {
                h.refused.lock().unwrap().push(body);
                (h.fail_status, "{\"message\": \"Event object is invalid\"}")
            } else {
                assert_eq!(token.as_deref(), Some(&b"Bearer hook-secret"[..]));
                h.accepted.lock().unwrap().push(body);
                (200, "")
            };
            http::Response::builder().status(status).body(Full::new(Bytes::from(reason))).unwrap()
        }
    };
    let url = if https {
        format!("https://localhost:{}/alerts", serve_https(handler).await.port())
    } else {
        format!("http://{}/alerts", serve_http(handler).await)
    };
    (url, hook)
}

async fn wait_for(hook: &Hook, id: &str, n: usize, timeout: Duration) -> Vec<Value> {
    let ok = wait_until(timeout, || async { hook.of(id).len() >= n }).await;
    assert!(ok, "{id}: {} notification(s) after {timeout:?}, wanted {n}: {:?}", hook.of(id).len(), hook.of(id));
    hook.of(id)
}

fn window_end(n: &Value) -> i64 {
    time::parse_utc(n["window_end"].as_str().unwrap()).unwrap()
}

/// The notification's windows hold exactly the calls the test produced in them.
fn assert_counts(n: &Value, events: &[Seen]) {
    let end = window_end(n);
    for (w, minutes) in [("long_window", 10), ("short_window", 1)] {
        let (calls, bad) = expected(events, end, minutes);
        assert_eq!(n[w]["minutes"], minutes, "{n}");
        assert_eq!((n[w]["calls"].as_u64().unwrap(), n[w]["bad_calls"].as_u64().unwrap()), (calls, bad), "{w} of {n}");
        let burn = if calls == 0 { 0.0 } else { bad as f64 / calls as f64 / 0.01 };
        assert!((n[w]["burn_rate"].as_f64().unwrap() - burn).abs() < 1e-6, "{w} of {n}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn burning_slos_fire_once_survive_a_restart_and_resolve() {
    let setup = start_with_history("slo").await;
    let (dir, topic, db, m0, past) = (&setup.dir, &setup.topic, &setup.db, setup.m0, &setup.past);
    let (events, failing, live) = live_traffic(topic, past);

    let (hook_url, hook) = start_hook(1, false).await;
    let config = |admin: u16| slo_config(topic, db, "agg-1", admin, &hook_url, "");
    let admin = free_port();
    let mut agg = start_aggregator(dir.path(), "agg-1", &config(admin));

    // The availability alert fires once, after the webhook's first 500 was retried.
    let fired = wait_for(&hook, AVAILABILITY, 1, Duration::from_secs(120)).await;
    let n = &fired[0];
    assert_eq!(n["status"], "firing", "{n}");
    assert_eq!(
        (n["slo"].as_str(), n["kind"].as_str(), n["severity"].as_str()),
        (Some("api"), Some("availability"), Some("page"))
    );
    assert_eq!((n["consumer_id"].clone(), n["objective_percent"].as_f64()), (Value::Null, Some(99.0)));
    assert_counts(n, &events.lock().unwrap());
    assert!(
        metric(
            std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
            r#"tollgate_aggregator_slo_webhook_failures_total{receiver="webhook"}"#
        )
        .await
            >= 1
    );
    let fired_end = window_end(n);
    // Its burn rates are in ClickHouse, for every window of the evaluation that fired it.
    let burn = ch(
        &clickhouse(),
        &format!(
            "SELECT window_minutes, total, bad FROM {db}.slo_burn_rate FINAL WHERE slo_id = 'api' AND consumer_id = '' \
             AND minute = toDateTime({fired_end}) ORDER BY window_minutes FORMAT TSV"
        ),
    )
    .await;
    // Its windows: the rules' 1 and 10 minutes and the 30-day budget period (every event).
    let want: String = [1, 10, 43_200]
        .iter()
        .map(|&m| {
            let (c, b) = expected(&events.lock().unwrap(), fired_end, m);
            format!("{m}\t{c}\t{b}\n")
        })
        .collect();
    assert_eq!(burn, want);
    // The budget left over the period is exported, from an evaluation's period window: overspent
    // here (the bursts' bad calls are far beyond 1 % of all calls).
    let text = metrics_text(std::net::SocketAddr::from(([127, 0, 0, 1], admin))).await;
    let left: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_aggregator_slo_budget_remaining{slo=\"api\"} "))
        .unwrap_or_else(|| panic!("no budget metric:\n{text}"))
        .parse()
        .unwrap();
    let rows = ch(
        &clickhouse(),
        &format!(
            "SELECT 1 - burn_rate FROM {db}.slo_burn_rate FINAL WHERE slo_id = 'api' AND consumer_id = '' \
             AND window_minutes = 43200 FORMAT TSV"
        ),
    )
    .await;
    assert!(left < 0.0, "{left}");
    assert!(rows.lines().any(|r| (r.parse::<f64>().unwrap() - left).abs() < 1e-5), "{left} not in {rows}");
    // Per-consumer objectives have no such gauge (one series per consumer would be unbounded).
    assert!(!text.contains("slo_budget_remaining{slo=\"lat\"}"), "{text}");

    // The slow consumer's latency alert fires (all its calls are slow); acme's never does.
    let slow = wait_for(&hook, SLOW, 1, Duration::from_secs(60)).await;
    assert_eq!((slow[0]["status"].as_str(), slow[0]["consumer_id"].as_str()), (Some("firing"), Some("slowco")));
    let (long, short) = (&slow[0]["long_window"], &slow[0]["short_window"]);
    // 10 calls in each of its burst minutes inside the window.
    let slow_calls = |minutes: i64| {
        let end = window_end(&slow[0]);
        10 * (1..=3).filter(|k| (end - minutes * 60..end).contains(&(m0 - k * 60))).count() as u64
    };
    assert_eq!(
        (long["calls"].as_u64(), long["bad_calls"].as_u64()),
        (Some(slow_calls(10)), Some(slow_calls(10))),
        "{}",
        slow[0]
    );
    assert_eq!(
        (short["calls"].as_u64(), short["bad_calls"].as_u64()),
        (Some(slow_calls(1)), Some(slow_calls(1))),
        "{}",
        slow[0]
    );
    assert!((long["burn_rate"].as_f64().unwrap() - 10.0).abs() < 1e-6);

    // The documented query lists it as firing (recorded just after the webhook took it).
    let listed =
        wait_until(Duration::from_secs(10), || async { firing_now(db).await.contains(&AVAILABILITY.to_owned()) }).await;
    assert!(listed, "{:?}", firing_now(db).await);

    // A restarted aggregator takes the state from slo_alerts: the still-burning SLO is not
    // notified again.
    assert!(agg.terminate(Duration::from_secs(20)), "aggregator did not stop:\n{}", agg.log_tail());
    let admin2 = free_port();
    let mut agg2 = start_aggregator(dir.path(), "agg-2", &config(admin2));
    let admin2 = std::net::SocketAddr::from(([127, 0, 0, 1], admin2));
    let evaluated = wait_until(Duration::from_secs(90), || async { evaluations(admin2).await >= 1 }).await;
    assert!(evaluated, "the restarted aggregator did not evaluate:\n{}", agg2.log_tail());
    failing.store(false, Ordering::SeqCst);
    assert_eq!(hook.of(AVAILABILITY).len(), 1, "notified again after the restart: {:?}", hook.of(AVAILABILITY));

    // Healthy live traffic for a minute: it resolves, with the counts of its windows.
    let notes = wait_for(&hook, AVAILABILITY, 2, Duration::from_secs(200)).await;
    live.abort();
    let r = &notes[1];
    assert_eq!(r["status"], "resolved", "{r}");
    assert!(window_end(r) > fired_end);
    assert_counts(r, &events.lock().unwrap());
    assert!(
        r["short_window"]["burn_rate"].as_f64().unwrap() < 5.0 || r["long_window"]["burn_rate"].as_f64().unwrap() < 5.0
    );
    // Nothing for acme's latency; what was delivered is what slo_alerts holds.
    assert!(hook.of("lat/page/10m-1m/acme").is_empty());
    let recorded = ch(
        &clickhouse(),
        &format!("SELECT status, delivered, window_end FROM {db}.slo_alerts WHERE alert_id = '{AVAILABILITY}' ORDER BY at_us FORMAT TSV"),
    )
    .await;
    assert_eq!(
        recorded,
        format!("firing\t1\t{}\nresolved\t1\t{}\n", ch_time(fired_end).await, ch_time(window_end(r)).await)
    );
    assert_eq!(hook.of(AVAILABILITY).len(), 2);
    assert!(!firing_now(db).await.contains(&AVAILABILITY.to_owned()));
    assert!(agg2.terminate(Duration::from_secs(20)));
}

/// The alert ids `schemas/queries/slo_alerts_firing.sql` lists for `db`.
async fn firing_now(db: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(repo_root().join("schemas/queries/slo_alerts_firing.sql")).unwrap();
    let sql = doc.replace("FROM slo_alerts", &format!("FROM {db}.slo_alerts"));
    let rows = ch(&clickhouse(), &format!("SELECT alert_id FROM ({sql}) FORMAT TSV")).await;
    rows.lines().map(str::to_owned).collect()
}

/// Live traffic: 4 acme calls every 250 ms, half of them 503 while `failing` (true at first),
/// remembered after `past` in `events`.
fn live_traffic(
    topic: &str,
    past: &[ApiCall],
) -> (Arc<Mutex<Vec<Seen>>>, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let events = Arc::new(Mutex::new(past.iter().map(seen).collect::<Vec<_>>()));
    let failing = Arc::new(AtomicBool::new(true));
    let live = {
        let (events, failing, topic, producer) =
            (Arc::clone(&events), Arc::clone(&failing), topic.to_owned(), producer());
        tokio::spawn(async move {
            loop {
                let now = now_us();
                let batch: Vec<ApiCall> = (0..4)
                    .map(|i| {
                        let status = if failing.load(Ordering::SeqCst) && i % 2 == 0 { 503 } else { 200 };
                        event("acme", now + i, status, Outcome::Forwarded, 1_000)
                    })
                    .collect();
                produce_all(&producer, &topic, &encode(&batch)).await;
                events.lock().unwrap().extend(batch.iter().map(seen));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    (events, failing, live)
}

/// The aggregator's counter `name` (0 while its admin port is not up).
async fn agg_metric(admin: std::net::SocketAddr, name: &str) -> u64 {
    let text = try_metrics_text(admin).await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

/// The aggregator's SLO evaluations so far (0 while its admin port is not up).
async fn evaluations(admin: std::net::SocketAddr) -> u64 {
    agg_metric(admin, "tollgate_aggregator_slo_evaluations_total").await
}

/// ClickHouse's text for a DateTime of `s` (in the server's time zone).
async fn ch_time(s: i64) -> String {
    ch(&clickhouse(), &format!("SELECT toDateTime({s}) FORMAT TSV")).await.trim().to_owned()
}

/// An aggregator for `topic` → `db` (group `<db>-agg`) with an admin port, evaluating two
/// objectives with one rule (10 and 1 minutes, 5x), notifying the webhook at `hook`; `slo`:
/// more `[slo]` keys.
fn slo_config(topic: &str, db: &str, instance: &str, admin: u16, hook: &str, slo: &str) -> String {
    slo_config_receiving(
        topic,
        db,
        instance,
        admin,
        &format!("webhook_url = \"{hook}\"\nwebhook_headers = {{ authorization = \"Bearer hook-secret\" }}\n{slo}"),
        "",
    )
}

/// [`slo_config`] with `slo`: the `[slo]` keys and receivers; `rules`: more `[[slo.rules]]`.
fn slo_config_receiving(topic: &str, db: &str, instance: &str, admin: u16, slo: &str, rules: &str) -> String {
    aggregator_config(
        topic,
        db,
        &format!("{db}-agg"),
        instance,
        &format!("{db}-ingest"),
        &format!(
            "[windows]\nallowed_lateness_s = 2\nidle_close_ms = 1500\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [slo]\n{slo}\
             [[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 10\nshort_window_minutes = 1\nburn_rate = 5\n{rules}\
             [[slo.objectives]]\nid = \"api\"\nkind = \"availability\"\nobjective_percent = 99\n\
             [[slo.objectives]]\nid = \"lat\"\nkind = \"latency\"\nobjective_percent = 90\nlatency_threshold_ms = 100\n\
             per_consumer = true\n"
        ),
    )
}

/// Two aggregators in one group: only the one reading partition 0 evaluates, so every alert
/// is notified once when it fires and once when it resolves (the burst is history: one
/// minute later the 1-minute window is empty).
#[tokio::test(flavor = "multi_thread")]
async fn two_aggregators_in_a_group_notify_each_alert_once() {
    let setup = start_with_history("slo2").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (hook_url, hook) = start_hook(0, false).await;
    let (admin_a, admin_b) = (free_port(), free_port());
    let mut a = start_aggregator(dir.path(), "agg-a", &slo_config(topic, db, "agg-a", admin_a, &hook_url, ""));
    let mut b = start_aggregator(dir.path(), "agg-b", &slo_config(topic, db, "agg-b", admin_b, &hook_url, ""));
    for id in [AVAILABILITY, SLOW] {
        let notes = wait_for(&hook, id, 2, Duration::from_secs(180)).await;
        assert_eq!(
            (notes[0]["status"].as_str(), notes[1]["status"].as_str()),
            (Some("firing"), Some("resolved")),
            "{id}"
        );
    }
    // A few more evaluations: nothing more arrives.
    let (admin_a, admin_b) =
        (std::net::SocketAddr::from(([127, 0, 0, 1], admin_a)), std::net::SocketAddr::from(([127, 0, 0, 1], admin_b)));
    let before = evaluations(admin_a).await + evaluations(admin_b).await;
    assert!(
        wait_until(Duration::from_secs(90), || async {
            evaluations(admin_a).await + evaluations(admin_b).await > before
        })
        .await
    );
    for id in [AVAILABILITY, SLOW] {
        assert_eq!(hook.of(id).len(), 2, "{id}: {:?}", hook.of(id));
    }
    assert_eq!(hook.accepted.lock().unwrap().len(), 4, "{:?}", hook.accepted.lock().unwrap());
    assert!(a.terminate(Duration::from_secs(20)) && b.terminate(Duration::from_secs(20)));
}

/// The evaluator reads whole hours from its cache and only partial hours from ClickHouse; its
/// window counts equal one full read of each window (`window_sql`), also after a minute two
/// hours back is rewritten (new rows, higher version: the hour is read again), and an
/// evaluation with nothing rewritten reads no whole hour again.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_window_counts_equal_a_full_read_also_after_a_rewrite() {
    let url = clickhouse();
    let db = unique("slo_inc");
    let cfg = tollgate_aggregator::Config::parse(
        &format!(
            "[kafka]\nbrokers = \"127.0.0.1:9\"\n[clickhouse]\nurl = \"{url}\"\ndatabase = \"{db}\"\n\
             [[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 90\nshort_window_minutes = 5\nburn_rate = 2\n\
             [[slo.rules]]\nseverity = \"ticket\"\nlong_window_minutes = 300\nshort_window_minutes = 60\nburn_rate = 1\n\
             [[slo.objectives]]\nid = \"orders\"\nkind = \"availability\"\nobjective_percent = 99\nroute = \"orders\"\n\
             [[slo.objectives]]\nid = \"lat\"\nkind = \"latency\"\nobjective_percent = 95\nlatency_threshold_ms = 250\nper_consumer = true\n"
        ),
        &Default::default(),
    )
    .unwrap();
    tollgate_schemas::store::prepare(&cfg.clickhouse).await.unwrap();
    let client = tollgate_schemas::store::client(&cfg.clickhouse);
    let now = now_us() / 1_000_000;
    let end = now - now % 60 - 7 * 60;
    let start = end - 6 * 3600;
    // Six hours of minutes, 4 consumers, 2 routes, a mix of outcomes; a row every 7th minute
    // is missing so that some consumers have gaps.
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) \
             SELECT toDateTime({start} + intDiv(number, 8) * 60), concat('c', toString(number % 4)), \
             if(intDiv(number, 4) % 2 = 0, 'orders', 'search'), \
             ['forwarded', 'forwarded', 'upstream_timeout', 'rate_limited'][number % 13 % 4 + 1], \
             if(number % 11 = 0, 5, 2), 1 + number % 17, 0, 0, 0, 0, 0, [900, 260000], [number % 17, 1], 1 \
             FROM numbers({}) WHERE intDiv(number, 8) % 7 != 3",
            6 * 60 * 8 + 8 * 10
        ),
    )
    .await;
    // The days before: a few hundred minutes of calls spread over the last 6 days, c4 only
    // there (it has calls in the budget period, none in the rules' windows).
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) \
             SELECT toDateTime({start} - 3600 - (number % 6) * 86400 - intDiv(number, 6) * 97 * 60), \
             concat('c', toString(number % 5)), 'orders', 'forwarded', 2, 3, 0, 0, 0, 0, 0, [900, 260000], [number % 3, 1], 1 \
             FROM numbers(300)"
        ),
    )
    .await;
    // At the far end of the period: a minute inside the first evaluation's 30 days (and the
    // second's, on its first second), and one just before them.
    let far = end - 43_200 * 60;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) VALUES \
             (toDateTime({}), 'c2', 'orders', 'forwarded', 2, 11, 0, 0, 0, 0, 0, [300000], [11], 1), \
             (toDateTime({}), 'c2', 'orders', 'forwarded', 2, 13, 0, 0, 0, 0, 0, [300000], [13], 1)",
            far + 60,
            far - 60
        ),
    )
    .await;
    let objectives = &cfg.slo.objectives;
    // The budget period (30 days) is one of the windows of the objective over all calls; per
    // consumer it is read apart (by days).
    assert_eq!(cfg.slo.windows_for(false), vec![5, 60, 90, 300, 43_200]);
    assert_eq!(cfg.slo.windows_for(true), vec![5, 60, 90, 300]);
    let mut evaluator = tollgate_aggregator::slo::Evaluator::new(std::sync::Arc::clone(&cfg.slo), client.clone());

    // What the evaluator wrote to slo_burn_rate for `at`, against one full read per window: the
    // rules' windows (and the period, over all calls) for the consumers with calls in them,
    // and per consumer the period for the consumers with calls in it.
    let check = |at: i64| {
        let (url, db, slo) = (url.clone(), db.clone(), std::sync::Arc::clone(&cfg.slo));
        async move {
            let per_consumer_period = objectives.iter().filter(|o| o.per_consumer).map(|o| (o, vec![43_200]));
            for (o, windows) in
                objectives.iter().map(|o| (o, slo.windows_for(o.per_consumer))).chain(per_consumer_period)
            {
                let list = windows.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
                let got = ch(
                    &url,
                    &format!(
                        "SELECT consumer_id, window_minutes, total, bad FROM {db}.slo_burn_rate FINAL \
                         WHERE slo_id = '{}' AND minute = toDateTime({at}) AND window_minutes IN ({list}) \
                         ORDER BY consumer_id, window_minutes FORMAT TSV",
                        o.id
                    ),
                )
                .await;
                let full = tollgate_aggregator::slo::window_sql(o, &windows, &format!("toDateTime({at})"))
                    .replace("FROM usage_minute", &format!("FROM {db}.usage_minute"))
                    .replace("route_id = ?", "route_id = 'orders'");
                let rows = ch(
                    &url,
                    &format!("SELECT consumer_id, totals, bads FROM ({full}) ORDER BY consumer_id FORMAT TSV"),
                )
                .await;
                let mut want = String::new();
                for line in rows.lines() {
                    let cols: Vec<&str> = line.split('\t').collect();
                    let nums = |s: &str| -> Vec<u64> {
                        s.trim_matches(|c| c == '[' || c == ']').split(',').map(|v| v.parse().unwrap()).collect()
                    };
                    let (totals, bads) = (nums(cols[1]), nums(cols[2]));
                    if totals.iter().all(|&t| t == 0) {
                        continue;
                    }
                    for (i, w) in windows.iter().enumerate() {
                        want.push_str(&format!("{}\t{w}\t{}\t{}\n", cols[0], totals[i], bads[i]));
                    }
                }
                assert!(!want.is_empty(), "{}: no calls in the data", o.id);
                assert_eq!(got, want, "{} at {at}, windows {list}", o.id);
                if windows == [43_200] {
                    assert!(want.contains("c4\t43200"), "c4's calls before the rules' windows: {want}");
                }
            }
        }
    };
    evaluator.evaluate(end, 1).await.unwrap();
    check(end).await;
    let first = evaluator.hours_read();
    assert!(first >= 4, "whole hours read: {first}");

    // Minute end - 2 h rewritten: more calls, some 5xx and slow ones (higher version).
    let m = end - 2 * 3600 - (end - 2 * 3600) % 60;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) VALUES \
             (toDateTime({m}), 'c1', 'orders', 'forwarded', 5, 500, 0, 500, 0, 0, 0, [300000], [500], 9), \
             (toDateTime({m}), 'c9', 'orders', 'forwarded', 2, 40, 0, 0, 0, 0, 0, [900], [40], 9)"
        ),
    )
    .await;
    evaluator.evaluate(end + 60, 2).await.unwrap();
    check(end + 60).await;
    let second = evaluator.hours_read();
    assert!(second > first, "the rewritten hour was not read again");
    // Nothing rewritten: the whole hours come from the cache (only an hour that just became
    // whole, if the end crossed one, is read).
    evaluator.evaluate(end + 120, 3).await.unwrap();
    check(end + 120).await;
    assert!(evaluator.hours_read() - second <= 1, "{} whole hours read again", evaluator.hours_read() - second);

    // A minute three days back rewritten (a late replay): per consumer, the period's whole days
    // are fingerprinted again within the hour, and the period counts it.
    let old = start - 3600 - 3 * 86400;
    let old = old - old % 60;
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.usage_minute (minute, consumer_id, route_id, outcome, status_class, requests, errors_4xx, errors_5xx, \
             request_bytes, response_bytes, latency_sum_us, latency_le_us, latency_count, version) VALUES \
             (toDateTime({old}), 'c4', 'orders', 'forwarded', 2, 70, 0, 0, 0, 0, 0, [300000], [70], 9)"
        ),
    )
    .await;
    evaluator.evaluate(end + 3720, 4).await.unwrap();
    check(end + 3720).await;
    ch(&url, &format!("DROP DATABASE {db}")).await;
}

/// A webhook that rejects a notification with a 4xx (PagerDuty answers 400 to a wrong routing
/// key) would reject it again: it is tried once, the notification after it is still delivered
/// (a retried rejection would block every later alert), the rejection is counted, and
/// `slo_alerts` records the alert's state with `delivered` = 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_notification_is_not_retried_and_does_not_hold_up_the_next() {
    let setup = start_with_history("slo_rej").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (hook_url, hook) = start_hook_failing(1, 400, false).await;
    let admin = free_port();
    let mut agg = start_aggregator(dir.path(), "agg-1", &slo_config(topic, db, "agg-1", admin, &hook_url, ""));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    // The history fires both alerts at the first evaluation: the first notification is
    // rejected, the second delivered.
    let both = wait_until(Duration::from_secs(120), || async {
        !hook.refused.lock().unwrap().is_empty() && !hook.accepted.lock().unwrap().is_empty()
    })
    .await;
    assert!(both, "refused {:?}, accepted {:?}:\n{}", hook.refused.lock(), hook.accepted.lock(), agg.log_tail());
    let rejected = hook.refused.lock().unwrap()[0].clone();
    let delivered = hook.accepted.lock().unwrap()[0].clone();
    let mut ids = [rejected["id"].as_str().unwrap(), delivered["id"].as_str().unwrap()];
    ids.sort_unstable();
    assert_eq!(ids, [AVAILABILITY, SLOW]);
    assert_eq!((rejected["status"].as_str(), delivered["status"].as_str()), (Some("firing"), Some("firing")));
    let rejected_id = rejected["id"].as_str().unwrap();
    let recorded = |id: &str| {
        let sql = format!(
            "SELECT status, delivered FROM {db}.slo_alerts WHERE alert_id = '{id}' AND status = 'firing' FORMAT TSV"
        );
        async move { try_ch(&clickhouse(), &sql).await.unwrap_or_default() }
    };
    let both_recorded = wait_until(Duration::from_secs(20), || async {
        !recorded(rejected_id).await.is_empty() && !recorded(delivered["id"].as_str().unwrap()).await.is_empty()
    })
    .await;
    assert!(both_recorded, "not recorded:\n{}", agg.log_tail());
    assert_eq!(recorded(rejected_id).await, "firing\t0\n");
    assert_eq!(recorded(delivered["id"].as_str().unwrap()).await, "firing\t1\n");
    // Not retried: after many retry intervals (`[retry]` starts at 100 ms) the webhook has
    // seen the rejected alert's firing once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(hook.of(rejected_id).iter().all(|n| n["status"] != "firing"), "{:?}", hook.of(rejected_id));
    assert_eq!(hook.refused.lock().unwrap().len(), 1);
    assert_eq!(agg_metric(admin, r#"tollgate_aggregator_slo_webhook_rejected_total{receiver="webhook"}"#).await, 1);
    assert_eq!(agg_metric(admin, r#"tollgate_aggregator_slo_webhook_failures_total{receiver="webhook"}"#).await, 1);
    let log = std::fs::read_to_string(&agg.log).unwrap();
    assert!(log.contains("Event object is invalid"), "the receiver's reason is not logged:\n{}", agg.log_tail());
    assert!(agg.terminate(Duration::from_secs(20)));
}

/// Two receivers: `oncall` takes `page` alerts only, `chat` every severity. While `oncall` is
/// down, `chat` still gets every alert at once (each receiver has its own queue), the `ticket`
/// alerts (which only `chat` takes) are recorded, and the `page` alerts are not yet (they are
/// recorded once every receiver of theirs is done); once `oncall` is back, it gets exactly the
/// page alerts, each recorded once, delivered. The per-receiver metrics agree.
#[tokio::test(flavor = "multi_thread")]
async fn each_receiver_gets_its_severities_and_one_that_is_down_holds_up_only_itself() {
    let setup = start_with_history("slo_rcv").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (oncall_url, oncall) = start_hook(usize::MAX, false).await;
    let (chat_url, chat) = start_hook(0, false).await;
    let receivers = format!(
        "[slo.receivers.oncall]\nurl = \"{oncall_url}\"\nseverities = [\"page\"]\n\
         headers = {{ authorization = \"Bearer hook-secret\" }}\n\
         [slo.receivers.chat]\nurl = \"{chat_url}\"\nheaders = {{ authorization = \"Bearer hook-secret\" }}\n"
    );
    let ticket =
        "[[slo.rules]]\nseverity = \"ticket\"\nlong_window_minutes = 10\nshort_window_minutes = 2\nburn_rate = 2\n";
    let admin = free_port();
    let config = slo_config_receiving(topic, db, "agg-1", admin, &receivers, ticket);
    let mut agg = start_aggregator(dir.path(), "agg-1", &config);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    const AVAILABILITY_TICKET: &str = "api/ticket/10m-2m";
    const SLOW_TICKET: &str = "lat/ticket/10m-2m/slowco";
    let pages = [AVAILABILITY, SLOW];
    let tickets = [AVAILABILITY_TICKET, SLOW_TICKET];
    // The history fires all four at the first evaluation; chat gets them while oncall fails.
    for id in pages.iter().chain(&tickets) {
        let n = wait_for(&chat, id, 1, Duration::from_secs(120)).await;
        assert_eq!(n[0]["status"], "firing", "{id}");
    }
    assert!(oncall.accepted.lock().unwrap().is_empty());
    let failures = r#"tollgate_aggregator_slo_webhook_failures_total{receiver="oncall"}"#;
    assert!(wait_until(Duration::from_secs(10), || async { agg_metric(admin, failures).await >= 1 }).await);
    let firing_rows = |ids: &[&str]| {
        let list = ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT alert_id, delivered FROM {db}.slo_alerts WHERE alert_id IN ({list}) AND status = 'firing' \
             ORDER BY alert_id FORMAT TSV"
        );
        async move { try_ch(&clickhouse(), &sql).await.unwrap_or_default() }
    };
    let tickets_recorded = format!("{AVAILABILITY_TICKET}\t1\n{SLOW_TICKET}\t1\n");
    assert!(
        wait_until(Duration::from_secs(10), || async { firing_rows(&tickets).await == tickets_recorded }).await,
        "{:?}\n{}",
        firing_rows(&tickets).await,
        agg.log_tail()
    );
    // Several retries later the page alerts are still waiting for oncall: not recorded, queued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(firing_rows(&pages).await, "");
    let queued = r#"tollgate_aggregator_slo_notifications_queued{receiver="oncall"}"#;
    assert!(agg_metric(admin, queued).await >= 2, "{}", metrics_text(admin).await);
    assert_eq!(agg_metric(admin, r#"tollgate_aggregator_slo_notifications_queued{receiver="chat"}"#).await, 0);

    // oncall is back: it gets the page alerts (in order, firing first), and nothing else.
    oncall.fail_first.store(0, Ordering::SeqCst);
    for id in pages {
        let n = wait_for(&oncall, id, 1, Duration::from_secs(30)).await;
        assert_eq!(n[0]["status"], "firing", "{id}: {n:?}");
    }
    let pages_recorded = format!("{AVAILABILITY}\t1\n{SLOW}\t1\n");
    assert!(
        wait_until(Duration::from_secs(10), || async { firing_rows(&pages).await == pages_recorded }).await,
        "{:?}",
        firing_rows(&pages).await
    );
    assert!(oncall.accepted.lock().unwrap().iter().all(|n| n["severity"] == "page"), "{:?}", oncall.accepted.lock());
    assert!(oncall.of(AVAILABILITY_TICKET).is_empty() && oncall.of(SLOW_TICKET).is_empty());
    // Each receiver's delivered counter is what it accepted (resolutions may follow: the burst
    // is history); nothing is left queued once they are.
    for (name, hook) in [("oncall", &oncall), ("chat", &chat)] {
        let delivered = format!("tollgate_aggregator_slo_notifications_delivered_total{{receiver=\"{name}\"}}");
        let agree = wait_until(Duration::from_secs(10), || async {
            agg_metric(admin, &delivered).await == hook.accepted.lock().unwrap().len() as u64
        })
        .await;
        assert!(agree, "{name}: {} vs {:?}", agg_metric(admin, &delivered).await, hook.accepted.lock());
    }
    assert!(wait_until(Duration::from_secs(10), || async { agg_metric(admin, queued).await == 0 }).await);
    // Every firing recorded once, whatever resolved meanwhile.
    let once = ch(
        &clickhouse(),
        &format!("SELECT count(), uniqExact(alert_id) FROM {db}.slo_alerts WHERE status = 'firing' FORMAT TSV"),
    )
    .await;
    assert_eq!(once, "4\t4\n");
    assert!(agg.terminate(Duration::from_secs(20)));
}

/// An https webhook with a private CA: without `slo.webhook_ca_file` the aggregator refuses
/// the certificate (failures counted, nothing delivered, nothing recorded); restarted with
/// the test CA, it delivers the alert it could not.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_webhook_is_trusted_with_its_ca_file_only() {
    let setup = start_with_history("slo_tls").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (hook_url, hook) = start_hook(0, true).await;
    let admin = free_port();
    let mut agg = start_aggregator(dir.path(), "agg-1", &slo_config(topic, db, "agg-1", admin, &hook_url, ""));
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let refused = wait_until(Duration::from_secs(90), || async {
        agg_metric(admin_addr, r#"tollgate_aggregator_slo_webhook_failures_total{receiver="webhook"}"#).await > 0
    })
    .await;
    assert!(refused, "no failed delivery:\n{}", agg.log_tail());
    assert!(hook.accepted.lock().unwrap().is_empty());
    assert!(agg.terminate(Duration::from_secs(20)));
    let recorded = ch(&clickhouse(), &format!("SELECT count() FROM {db}.slo_alerts FORMAT TSV")).await;
    assert_eq!(recorded.trim(), "0", "an undelivered alert was recorded");

    let ca = repo_root().join("tests/testdata/tls/ca.pem");
    let config =
        slo_config(topic, db, "agg-1", free_port(), &hook_url, &format!("webhook_ca_file = \"{}\"\n", ca.display()));
    let mut agg = start_aggregator(dir.path(), "agg-2", &config);
    let fired = wait_for(&hook, AVAILABILITY, 1, Duration::from_secs(90)).await;
    assert_eq!(fired[0]["status"], "firing");
    assert!(agg.terminate(Duration::from_secs(20)));
}

/// Alerts still firing when their objective or rule leaves the configuration would never be
/// evaluated again: the next evaluation resolves them (reason `removed`), once, and records
/// that; alerts the configuration still has are left to their burn rates.
#[tokio::test(flavor = "multi_thread")]
async fn alerts_whose_objective_or_rule_was_removed_are_resolved_once() {
    let setup = start_with_history("slo_rm").await;
    let (dir, db) = (&setup.dir, &setup.db);
    let url = clickhouse();
    let exists = wait_until(Duration::from_secs(30), || async {
        try_ch(&url, &format!("EXISTS TABLE {db}.slo_alerts FORMAT TSV")).await.is_ok_and(|s| s.trim() == "1")
    })
    .await;
    assert!(exists, "no slo_alerts table");
    // What an earlier configuration left firing: an objective that is gone (`old`, per
    // consumer), a rule `api` no longer has (60m/5m), and `api`'s configured rule.
    let at_us = now_us() - 600_000_000;
    let row = |id: &str, slo: &str, consumer: &str, windows: (u32, u32)| {
        format!(
            "({at}, {at_us}, '{id}', '{slo}', '{consumer}', 'page', 'firing', {at}, {}, {}, 5, 7.5, 9.5, 1)",
            windows.0,
            windows.1,
            at = at_us / 1_000_000
        )
    };
    const OLD: &str = "old/page/10m-1m/acme";
    const RULE: &str = "api/page/60m-5m";
    ch(
        &url,
        &format!(
            "INSERT INTO {db}.slo_alerts VALUES {}, {}, {}",
            row(OLD, "old", "acme", (10, 1)),
            row(RULE, "api", "", (60, 5)),
            row(AVAILABILITY, "api", "", (10, 1))
        ),
    )
    .await;
    let (hook_url, hook) = start_hook(0, false).await;
    let admin = free_port();
    let mut agg = start_aggregator(dir.path(), "agg-1", &slo_config(&setup.topic, db, "agg-1", admin, &hook_url, ""));
    for (id, kind) in [(OLD, Value::Null), (RULE, Value::from("availability"))] {
        let n = &wait_for(&hook, id, 1, Duration::from_secs(90)).await[0];
        assert_eq!((n["status"].as_str(), n["reason"].as_str()), (Some("resolved"), Some("removed")), "{n}");
        assert_eq!(n["kind"], kind, "{n}");
        assert_eq!(n["long_window"]["calls"], Value::Null, "{n}");
    }
    assert_eq!(hook.of(OLD)[0]["consumer_id"], "acme");
    assert_eq!(
        (hook.of(RULE)[0]["long_window"]["minutes"].as_u64(), hook.of(RULE)[0]["objective_percent"].as_f64()),
        (Some(60), Some(99.0))
    );
    // Two more evaluations: nothing is resolved twice, and the configured alert was not
    // resolved as removed.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let now = evaluations(admin).await;
    assert!(wait_until(Duration::from_secs(150), || async { evaluations(admin).await >= now + 2 }).await);
    assert_eq!((hook.of(OLD).len(), hook.of(RULE).len()), (1, 1));
    assert!(hook.of(AVAILABILITY).iter().all(|n| n["reason"] == "burn_rate"), "{:?}", hook.of(AVAILABILITY));
    let state = ch(
        &url,
        &format!(
            "SELECT alert_id, argMax(status, at_us), argMax(delivered, at_us), count() FROM {db}.slo_alerts \
             WHERE alert_id IN ('{OLD}', '{RULE}') GROUP BY alert_id ORDER BY alert_id FORMAT TSV"
        ),
    )
    .await;
    assert_eq!(state, format!("{RULE}\tresolved\t1\t2\n{OLD}\tresolved\t1\t2\n"));
    assert!(agg.terminate(Duration::from_secs(20)));
}

/// `webhook_format = "pagerduty"`: each alert is a PagerDuty Events API v2 trigger, then a
/// resolve, deduplicated by the alert's id, with the routing key and the notification (exact
/// counts) as its details.
#[tokio::test(flavor = "multi_thread")]
async fn pagerduty_receives_a_trigger_then_a_resolve_per_alert() {
    let setup = start_with_history("slo_pd").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (hook_url, hook) = start_hook(0, false).await;
    let pd = "webhook_format = \"pagerduty\"\npagerduty_routing_key = \"pd-routing-key\"\n";
    let mut agg = start_aggregator(dir.path(), "agg-1", &slo_config(topic, db, "agg-1", free_port(), &hook_url, pd));
    let past: Vec<Seen> = setup.past.iter().map(seen).collect();
    for (id, severity) in [(AVAILABILITY, "critical"), (SLOW, "critical")] {
        let events = wait_for(&hook, id, 2, Duration::from_secs(180)).await;
        let (t, r) = (&events[0], &events[1]);
        assert_eq!(
            (t["event_action"].as_str(), r["event_action"].as_str()),
            (Some("trigger"), Some("resolve")),
            "{id}"
        );
        for e in [t, r] {
            assert_eq!((e["routing_key"].as_str(), e["client"].as_str()), (Some("pd-routing-key"), Some("tollgate")));
        }
        assert_eq!(t["payload"]["severity"], severity);
        assert_eq!(t["payload"]["source"], "tollgate-aggregator");
        let details = &t["payload"]["custom_details"];
        assert_eq!((details["id"].as_str(), details["status"].as_str()), (Some(id), Some("firing")));
        assert_eq!(t["payload"]["summary"], details["summary"]);
        if id == AVAILABILITY {
            assert_counts(details, &past);
        }
    }
    // What was delivered is recorded as usual.
    let recorded = ch(
        &clickhouse(),
        &format!(
            "SELECT status, delivered FROM {db}.slo_alerts WHERE alert_id = '{AVAILABILITY}' ORDER BY at_us FORMAT TSV"
        ),
    )
    .await;
    assert_eq!(recorded, "firing\t1\nresolved\t1\n");
    assert!(agg.terminate(Duration::from_secs(20)));
}

/// A Prometheus Alertmanager of its own (free port, data in `dir`) with the configuration
/// docker-compose.yml ships: its base URL.
async fn start_alertmanager(dir: &std::path::Path) -> (Proc, String) {
    let cfg = repo_root().join("config/compose/alertmanager.yml");
    let port = free_port();
    let am = Proc::spawn(
        "alertmanager",
        std::process::Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.join("alertmanager-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address="),
        dir.join("alertmanager.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    let ready = wait_until(Duration::from_secs(30), || async {
        try_get(&format!("{url}/-/ready")).await.is_ok_and(|(status, _)| status == 200)
    })
    .await;
    assert!(ready, "Alertmanager did not start:\n{}", am.log_tail());
    (am, url)
}

/// The alert `alert_id` as Alertmanager lists it (active ones only), if it does.
async fn alertmanager_alert(url: &str, alert_id: &str) -> Option<Value> {
    let (status, body) = try_get(&format!("{url}/api/v2/alerts")).await.ok()?;
    assert_eq!(status, 200, "{body}");
    let all: Vec<Value> = serde_json::from_str(&body).ok()?;
    all.into_iter().find(|a| a["labels"]["alert_id"] == alert_id)
}

/// `webhook_format = "alertmanager"` against a real Alertmanager: the burning SLO becomes an
/// active alert with the alert's labels; while it keeps firing every evaluation sends it again
/// (its `endsAt` moves on, so Alertmanager does not resolve it on its own); when the calls are
/// healthy again it is resolved. `slo_alerts` holds the two changes only.
#[tokio::test(flavor = "multi_thread")]
async fn alertmanager_keeps_a_firing_alert_active_and_resolves_it() {
    let setup = start_with_history("slo_am").await;
    let (dir, topic, db) = (&setup.dir, &setup.topic, &setup.db);
    let (_am, am_url) = start_alertmanager(dir.path()).await;
    let (_events, failing, live) = live_traffic(topic, &setup.past);
    let admin = free_port();
    let config = aggregator_config(
        topic,
        db,
        &format!("{db}-agg"),
        "agg-1",
        &format!("{db}-ingest"),
        &format!(
            "[windows]\nallowed_lateness_s = 2\nidle_close_ms = 1500\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [slo]\nwebhook_url = \"{am_url}/api/v2/alerts\"\nwebhook_format = \"alertmanager\"\n\
             [[slo.rules]]\nseverity = \"page\"\nlong_window_minutes = 10\nshort_window_minutes = 1\nburn_rate = 5\n\
             [[slo.objectives]]\nid = \"api\"\nkind = \"availability\"\nobjective_percent = 99\nroute = \"echo\"\n"
        ),
    );
    let mut agg = start_aggregator(dir.path(), "agg-1", &config);
    let fired =
        wait_until(Duration::from_secs(120), || async { alertmanager_alert(&am_url, AVAILABILITY).await.is_some() })
            .await;
    assert!(fired, "no active alert in Alertmanager:\n{}", agg.log_tail());
    let a = alertmanager_alert(&am_url, AVAILABILITY).await.unwrap();
    assert_eq!(a["status"]["state"], "active", "{a}");
    assert_eq!(
        a["labels"],
        serde_json::json!({
            "alertname": "TollgateSLOBurnRate", "alert_id": AVAILABILITY, "slo": "api", "severity": "page",
            "windows": "10m-1m"
        })
    );
    assert_eq!(a["annotations"]["route_id"], "echo");
    assert!(a["annotations"]["summary"].as_str().unwrap().starts_with("SLO api (99 %) burns its error budget"), "{a}");
    let ends = |a: &Value| time::parse_utc(&a["endsAt"].as_str().unwrap()[..19]).unwrap();
    let first_end = ends(&a);
    assert!(first_end > now_us() / 1_000_000 + 200, "{a}");
    // Still burning: the next evaluations send it again, later endsAt each time.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let now = evaluations(admin).await;
    assert!(wait_until(Duration::from_secs(120), || async { evaluations(admin).await >= now + 2 }).await);
    let again = alertmanager_alert(&am_url, AVAILABILITY).await.expect("still active");
    assert!(ends(&again) > first_end, "not sent again: {a} then {again}");
    assert_eq!(again["startsAt"], a["startsAt"]);
    // Healthy calls: resolved, and no longer active.
    failing.store(false, Ordering::SeqCst);
    let resolved =
        wait_until(Duration::from_secs(200), || async { alertmanager_alert(&am_url, AVAILABILITY).await.is_none() })
            .await;
    assert!(resolved, "still active in Alertmanager:\n{}", agg.log_tail());
    live.abort();
    // Recorded once delivered (just after Alertmanager took it).
    let sql = format!("SELECT status FROM {db}.slo_alerts WHERE alert_id = '{AVAILABILITY}' ORDER BY at_us FORMAT TSV");
    let recorded = wait_until(Duration::from_secs(10), || async {
        ch(&clickhouse(), &sql).await.lines().last() == Some("resolved")
    })
    .await;
    assert!(recorded);
    assert_eq!(ch(&clickhouse(), &sql).await, "firing\nresolved\n");
    assert!(agg.terminate(Duration::from_secs(20)));
}
