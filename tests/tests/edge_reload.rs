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
