//! Config reload under load: SIGHUP swaps routes, plans and consumers without failing a
//! request; an invalid file is rejected and the running config stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_demo::traffic::{self, Caller};
use tollgate_e2e::*;

fn config(
    topic: &str,
    upstream: std::net::SocketAddr,
    spool: &std::path::Path,
    rate: u32,
    with_globex: bool,
) -> String {
    let mut c = format!(
        "[edge]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\n[spool]\ndir = \"{}\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.p]\nrate_per_second = {rate}\n\
         [[consumers]]\nid = \"acme\"\nplan = \"p\"\nkeys = [{{ id = \"a\", sha256 = \"{}\" }}]\n",
        kafka(),
        spool.display(),
        sha256_hex("key-acme")
    );
    if with_globex {
        c.push_str(&format!(
            "[[consumers]]\nid = \"globex\"\nplan = \"p\"\nkeys = [{{ id = \"g\", sha256 = \"{}\" }}]\n",
            sha256_hex("key-globex")
        ));
    }
    c
}

/// A GET with `key`: the answer's status and headers (its body read and dropped).
async fn get(addr: std::net::SocketAddr, path: &str, key: &str) -> (u16, http::HeaderMap) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let _ = resp.into_body().collect().await;
    (status, headers)
}

async fn status(addr: std::net::SocketAddr, path: &str, key: &str) -> u16 {
    get(addr, path, key).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_rejects_a_bad_file() {
    let dir = TempDir::new("e2e_reload");
    let topic = unique("reload");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let (mut edge, addr, admin) =
        start_edge(dir.path(), "edge", &config(&topic, upstream, &spool, 100_000, false)).await;
    let cfg_path = dir.path().join("edge.toml");
    assert_eq!(status(addr, "/echo/x", "key-globex").await, 401);

    let load = tokio::spawn(async move {
        let caller = Caller {
            label: "acme".into(),
            key: Some("key-acme".into()),
            requests: 4000,
            concurrency: 4,
            pause: Duration::from_millis(1),
            path: "/echo/load".into(),
        };
        traffic::run(&format!("http://{addr}"), vec![caller]).await
    });
    for i in 0..6u32 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        std::fs::write(&cfg_path, config(&topic, upstream, &spool, 100_000 + i, i % 2 == 1)).unwrap();
        edge.signal("HUP");
    }
    // Last valid config: globex present.
    tokio::time::sleep(Duration::from_millis(250)).await;
    std::fs::write(&cfg_path, config(&topic, upstream, &spool, 100_000, true)).unwrap();
    edge.signal("HUP");
    let reloaded =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-globex").await == 200 }).await;
    assert!(reloaded, "globex's key never became valid:\n{}", edge.log_tail());

    // An invalid file is rejected; the running config keeps serving.
    let failures_before = metric(admin, "tollgate_edge_config_reload_failures_total").await;
    std::fs::write(
        &cfg_path,
        config(&topic, upstream, &spool, 100_000, true).replace("plan = \"p\"", "plan = \"nope\""),
    )
    .unwrap();
    edge.signal("HUP");
    let rejected = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reload_failures_total").await > failures_before
    })
    .await;
    assert!(rejected, "the invalid config was not rejected:\n{}", edge.log_tail());
    assert!(edge.log_tail().contains("consumers[0].plan"), "the rejection does not name the key:\n{}", edge.log_tail());
    assert_eq!(status(addr, "/echo/x", "key-globex").await, 200);
    assert_eq!(status(addr, "/echo/x", "key-acme").await, 200);

    let tally = load.await.unwrap();
    assert_eq!(tally.transport_errors, 0);
    assert_eq!(tally.by_status.get(&("acme".to_owned(), 200)).copied(), Some(4000), "{:?}", tally.by_status);
    assert!(metric(admin, "tollgate_edge_config_reloads_total").await >= 7);
    assert_eq!(metric(admin, "tollgate_edge_kafka_reachable").await, 1);

    // Consumers in a JSON Lines file: loaded with the config, and a change to that file alone
    // is a reload.
    let line = |id: &str, key: &str| {
        format!(
            "{{\"id\": \"{id}\", \"plan\": \"p\", \"keys\": [{{\"id\": \"{id}-1\", \"sha256\": \"{}\"}}]}}\n",
            sha256_hex(key)
        )
    };
    let consumers = dir.path().join("consumers.jsonl");
    std::fs::write(&consumers, format!("# consumers managed elsewhere\n\n{}", line("initech", "key-initech"))).unwrap();
    let with_file =
        format!("consumers_file = \"consumers.jsonl\"\n{}", config(&topic, upstream, &spool, 100_000, true));
    std::fs::write(&cfg_path, with_file).unwrap();
    edge.signal("HUP");
    let from_file =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-initech").await == 200 }).await;
    assert!(from_file, "the consumers_file's consumer was not loaded:\n{}", edge.log_tail());
    assert_eq!(status(addr, "/echo/x", "key-acme").await, 200, "[[consumers]] and the file both count");
    assert_eq!(status(addr, "/echo/x", "key-umbrella").await, 401);
    let mut lines = std::fs::read_to_string(&consumers).unwrap();
    lines.push_str(&line("umbrella", "key-umbrella"));
    std::fs::write(&consumers, &lines).unwrap();
    let watched =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-umbrella").await == 200 }).await;
    assert!(watched, "a change to the consumers_file alone was not reloaded:\n{}", edge.log_tail());
    // A bad line is rejected with its line number; the running consumers stay.
    let failures_before = metric(admin, "tollgate_edge_config_reload_failures_total").await;
    lines.push_str("{\"id\": \"hooli\", \"plan\": \"p\", \"keys\": [{\"id\": \"h\", \"sha256\": \"zz\"}]}\n");
    std::fs::write(&consumers, &lines).unwrap();
    let rejected = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reload_failures_total").await > failures_before
    })
    .await;
    assert!(rejected, "the bad consumers_file was not rejected:\n{}", edge.log_tail());
    let log = edge.log_tail();
    assert!(log.contains("consumers.jsonl line 5") && log.contains("keys[0].sha256"), "{log}");
    assert_eq!(status(addr, "/echo/x", "key-umbrella").await, 200);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// One HTTP/1.1 exchange on a fresh connection (`request` sent whole, or head then nothing):
/// the status line's code and the whole answer, read until the edge closes or 5 s pass.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text, t.elapsed())
}

/// `[edge]`'s HTTP limits and timeouts are applied by a reload (they needed a restart before):
/// `trusted_hops`, the header limits and `body_read_timeout_ms` from the next request,
/// `header_read_timeout_ms` for connections accepted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_and_timeouts_apply_at_reload() {
    let dir = TempDir::new("e2e_reload_http");
    let topic = unique("reload_http");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let config = |edge_settings: &str| {
        format!(
            "{}[spool]\ndir = \"{}\"\n[[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n{}",
            edge_head("edge-reload-http", &topic).replacen("[edge]\n", &format!("[edge]\n{edge_settings}"), 1),
            spool.display(),
            acme_with_key(1000)
        )
    };
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &config("")).await;
    let cfg_path = dir.path().join("edge.toml");
    let get = |extra: &str| {
        format!("GET /echo/x HTTP/1.1\r\nHost: edge\r\nx-api-key: key-acme\r\nConnection: close\r\n{extra}\r\n")
            .into_bytes()
    };
    let post_10_of_100 =
        b"POST /echo/x HTTP/1.1\r\nHost: edge\r\nx-api-key: key-acme\r\nContent-Length: 100\r\n\r\n0123456789";
    let spoofed = "X-Forwarded-For: 198.51.100.7\r\n";
    let big = format!("x-big: {}\r\n", "b".repeat(2000));

    // Before: no trusted hop (the spoofed entry is replaced by the peer), 2 KB of headers pass,
    // and a stalled body waits out the default 10 s (not waited for here).
    let (status, answer, _) = exchange(addr, &get(spoofed)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"x-forwarded-for\":\"127.0.0.1\""), "{answer}");
    assert_eq!(exchange(addr, &get(&big)).await.0, 200);

    let after =
        config("trusted_hops = 1\nmax_header_bytes = 1024\nbody_read_timeout_ms = 300\nheader_read_timeout_ms = 400\n");
    reload_edge(&edge, admin, &cfg_path, &after).await;
    assert!(!edge.log_tail().contains("needs a restart"), "{}", edge.log_tail());

    // After: the trusted hop's entry is the client (kept in the chain), 2 KB of headers are
    // over the new limit, a stalled body is cut after 300 ms, and a connection that sends
    // half a head is closed after 400 ms.
    let (status, answer, _) = exchange(addr, &get(spoofed)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"x-forwarded-for\":\"198.51.100.7, 127.0.0.1\""), "{answer}");
    let (status, answer, _) = exchange(addr, &get(&big)).await;
    assert_eq!(status, 431, "{answer}");
    assert!(answer.contains("the limit is 1024"), "{answer}");
    let (status, answer, waited) = exchange(addr, post_10_of_100).await;
    assert_eq!(status, 408, "{answer}");
    assert!(answer.contains("no request body bytes came for 300 ms"), "{answer}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let (status, answer, waited) = exchange(addr, b"GET /echo/x HTTP/1.1\r\nHost: ed").await;
    assert!(waited < Duration::from_secs(3), "the half head was waited for {waited:?}: {status} {answer}");
    assert!(metric(admin, "tollgate_edge_connections_timed_out_total{reason=\"request_head\"}").await >= 1);
}

/// A consumer's answer: its status and `X-RateLimit-Remaining`.
async fn limited(addr: std::net::SocketAddr, key: &str) -> (u16, u32) {
    let (status, headers) = get(addr, "/echo/x", key).await;
    (status, headers["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap())
}

/// A reload (here: a consumer added, as a `consumers_file` change would) keeps what each
/// consumer has spent of its rate limit; a reload that changes the plan's rate starts the
/// consumer over at the new rate. (A burst of 20 refilling at 1 per second: a fresh limiter
/// would say 19 remaining after one call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_spent_rate_limits() {
    let dir = TempDir::new("e2e_reload_limits");
    let topic = unique("reload_limits");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let config = |burst: u32, with_globex: bool| {
        config(&topic, upstream, &spool, 1, with_globex)
            .replace("rate_per_second = 1\n", &format!("rate_per_second = 1\nburst = {burst}\n"))
    };
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(20, false)).await;
    let cfg_path = dir.path().join("edge.toml");
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(limited(addr, "key-acme").await.0);
    }
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    assert_eq!(limited(addr, "key-acme").await.0, 429);

    reload_edge(&edge, admin, &cfg_path, &config(20, true)).await;
    // At most a couple of seconds' refill, not a fresh burst.
    let (status, remaining) = limited(addr, "key-acme").await;
    assert!(remaining <= 2, "acme's spent budget came back with the reload: {status}, {remaining} remaining");
    assert_eq!(limited(addr, "key-globex").await, (200, 19), "the new consumer starts full");

    // The plan's burst changed: acme starts over at the new one.
    reload_edge(&edge, admin, &cfg_path, &config(40, true)).await;
    assert_eq!(limited(addr, "key-acme").await, (200, 39));
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// The access log's lines in `path` (none while it does not exist).
fn access_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// Waits (up to 5 s) until the access log at `path` has `n` lines; returns them.
async fn access_lines_n(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let ok = wait_until(Duration::from_secs(5), || async { access_lines(path).len() >= n }).await;
    let lines = access_lines(path);
    assert!(ok && lines.len() == n, "{} lines in {}, expected {n}: {lines:?}", lines.len(), path.display());
    lines
}

/// `edge.access_log`: a JSON line per call, refusals included, with the fields of the call's
/// event; SIGHUP reopens the file after logrotate moved it; a reload switches it to another
/// file or off; the last lines are written at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_the_events_fields_and_follows_logrotate_and_reloads() {
    let dir = TempDir::new("e2e_access_log");
    let topic = unique("access_log");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let log = dir.path().join("access.log");
    let with_log = |file: &str| {
        config(&topic, upstream, &spool, 100, false)
            .replace("[kafka]", &format!("access_log = \"{}\"\n[kafka]", dir.path().join(file).display()))
    };
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &with_log("access.log")).await;
    let cfg_path = dir.path().join("edge.toml");

    // Three forwarded calls, a wrong key (401) and no route (404).
    let mut ids = Vec::new();
    for (path, key, status) in [
        ("/echo/a", "key-acme", 200),
        ("/echo/b?secret=1", "key-acme", 200),
        ("/echo/c", "key-acme", 200),
        ("/echo/d", "key-wrong", 401),
        ("/nowhere", "key-acme", 404),
    ] {
        let (got, headers) = get(addr, path, key).await;
        assert_eq!(got, status, "{path}");
        ids.push(headers["x-request-id"].to_str().unwrap().to_owned());
    }
    let lines = access_lines_n(&log, 5).await;
    let events = read_events(&topic, |e| e.len() >= 5).await;
    for (i, id) in ids.iter().enumerate() {
        let line = lines.iter().find(|l| l["event_id"] == id.as_str()).unwrap_or_else(|| panic!("no line for {id}"));
        let event = events.iter().find(|e| e.event_id.to_string() == *id).unwrap();
        // The line says what the event says.
        assert_eq!(line["status"], event.status, "{line}");
        assert_eq!(line["outcome"], event.outcome.as_str(), "{line}");
        assert_eq!(line["path"], event.path.as_str(), "{line}");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["consumer_id"].as_str(), event.consumer_id.as_deref(), "{line}");
        assert_eq!(line["route_id"].as_str(), event.route_id.as_deref(), "{line}");
        assert_eq!(line["latency_us"], event.latency_us, "{line}");
        assert_eq!(line["response_bytes"], event.response_bytes, "{line}");
        assert_eq!(line["upstream_target"].as_str(), event.upstream_target.as_deref(), "{line}");
        assert_eq!(line["client_ip"], "127.0.0.1");
        assert_eq!(line["trace_id"].as_str(), event.trace_id.as_deref());
        let time = line["time"].as_str().unwrap();
        assert_eq!(tollgate_common::time::format_utc_micros(event.start_time_us), time);
        assert_eq!(i < 3, line["upstream_target"].is_string(), "{line}");
    }
    let by_id = |id: &str| lines.iter().find(|l| l["event_id"] == id).unwrap().clone();
    assert_eq!((by_id(&ids[0])["status"].as_u64(), by_id(&ids[0])["consumer_id"].as_str()), (Some(200), Some("acme")));
    // The query string is not logged (it may hold secrets), as it is not in the event.
    assert_eq!(by_id(&ids[1])["path"], "/echo/b");
    assert!(!std::fs::read_to_string(&log).unwrap().contains("secret"));
    assert_eq!(
        (
            by_id(&ids[3])["status"].as_u64(),
            by_id(&ids[3])["outcome"].as_str(),
            by_id(&ids[3])["consumer_id"].is_null()
        ),
        (Some(401), Some("unauthenticated"), true)
    );
    assert_eq!(
        (by_id(&ids[4])["status"].as_u64(), by_id(&ids[4])["outcome"].as_str(), by_id(&ids[4])["route_id"].is_null()),
        (Some(404), Some("no_route"), true)
    );

    // logrotate: move the file away, then SIGHUP. New lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    reload_edge(&edge, admin, &cfg_path, &with_log("access.log")).await;
    assert_eq!(get(addr, "/echo/e", "key-acme").await.0, 200);
    assert_eq!(access_lines_n(&log, 1).await[0]["path"], "/echo/e");
    assert_eq!(access_lines(&rotated).len(), 5);

    // A reload to another file, then one without an access log.
    let other = dir.path().join("other.log");
    reload_edge(&edge, admin, &cfg_path, &with_log("other.log")).await;
    assert_eq!(get(addr, "/echo/f", "key-acme").await.0, 200);
    assert_eq!(access_lines_n(&other, 1).await[0]["path"], "/echo/f");
    reload_edge(&edge, admin, &cfg_path, &config(&topic, upstream, &spool, 100, false)).await;
    assert_eq!(get(addr, "/echo/g", "key-acme").await.0, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!((access_lines(&log).len(), access_lines(&other).len()), (1, 1));

    // On again; the last call's line is written at shutdown (SIGTERM right after the call).
    reload_edge(&edge, admin, &cfg_path, &with_log("other.log")).await;
    assert_eq!(get(addr, "/echo/h", "key-acme").await.0, 200);
    assert_eq!(metric(admin, "tollgate_edge_access_log_dropped_total").await, 0);
    assert!(edge.terminate(Duration::from_secs(15)));
    let last = access_lines(&other);
    assert_eq!(last.iter().map(|l| l["path"].as_str().unwrap()).collect::<Vec<_>>(), ["/echo/f", "/echo/h"]);
}
