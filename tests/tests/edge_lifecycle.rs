//! The edge's lifecycle through the real binary: `/readyz`, graceful shutdown (stop accepting,
//! drain in-flight calls within `edge.shutdown_grace_ms`, close idle connections, flush the
//! events), the spool taking an outage's events within seconds (a missing topic's too) and the
//! next start replaying them, after a clean exit or a crash, and API keys made by `tollgate-edge gen-key`, rotated and revoked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_demo::traffic::{self, Caller};
use tollgate_e2e::*;
use tollgate_schemas::Outcome;

fn config(brokers: &str, topic: &str, upstream: std::net::SocketAddr, spool: &std::path::Path, keys: &str) -> String {
    format!(
        "[edge]\ninstance_id = \"edge-life\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         shutdown_grace_ms = 2500\n\
         [kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\
         [spool]\ndir = \"{}\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.big]\nrate_per_second = 100000\n\
         [[consumers]]\nid = \"acme\"\nplan = \"big\"\nkeys = [{keys}]\n",
        spool.display()
    )
}

/// `requests` calls of consumer acme to `path`, `concurrency` at a time, without pauses.
fn acme_calls(requests: usize, concurrency: usize, path: &str) -> Caller {
    Caller {
        label: "acme".into(),
        key: Some("key-acme".into()),
        requests,
        concurrency,
        pause: Duration::ZERO,
        path: path.into(),
    }
}

fn acme_key() -> String {
    format!("{{ id = \"acme-1\", sha256 = \"{}\" }}", sha256_hex("key-acme"))
}

/// `/readyz`: (status, body).
async fn readyz(admin: std::net::SocketAddr) -> (u16, String) {
    let (status, _, body) = Http::new().get(admin, "/readyz", &[]).await;
    (status, body)
}

/// One request on its own connection (`Connection: close`): the status and body, or `None`
/// when the connection ended without a response.
async fn request(addr: std::net::SocketAddr, path: &str, key: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: api.example\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_calls_and_meters_them() {
    let dir = TempDir::new("e2e_lifecycle");
    let topic = unique("life");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let (mut edge, addr, admin) =
        start_edge(dir.path(), "edge", &config(&kafka(), &topic, upstream, &dir.path().join("spool"), &acme_key()))
            .await;
    // Ready once the producer's probe has reached Kafka.
    let ready = wait_until(Duration::from_secs(10), || async {
        readyz(admin).await == (200, "ready\nkafka: reachable\nspool: ok\n".to_owned())
    })
    .await;
    assert!(ready, "{:?}\n{}", readyz(admin).await, edge.log_tail());

    // An idle keep-alive connection, a call that ends within the grace and one that does not.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /echo/idle HTTP/1.1\r\nHost: api.example\r\nx-api-key: key-acme\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut rest = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(300), idle.read(&mut rest)).await;
    let quick = tokio::spawn(request(addr, "/echo/quick?delay_ms=1000", "key-acme"));
    let slow = tokio::spawn(request(addr, "/echo/slow?delay_ms=15000", "key-acme"));
    // And one whose client gives up during the drain, before the grace is over.
    let gone = tokio::spawn(request(addr, "/echo/gone?delay_ms=15000", "key-acme"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    edge.signal("TERM");
    let term = Instant::now();
    // Load balancers are told at once; the admin port stays up while the calls drain.
    let draining = wait_until(Duration::from_secs(2), || async {
        readyz(admin).await == (503, "not ready\nkafka: reachable\nspool: ok\nshutdown: draining\n".to_owned())
    })
    .await;
    assert!(draining, "{:?}", readyz(admin).await);
    gone.abort();
    // New connections are refused; the idle connection is closed (no request of its own
    // in flight), long before the grace is over.
    let refused = wait_until(Duration::from_secs(2), || async { TcpStream::connect(addr).await.is_err() }).await;
    assert!(refused, "the edge still accepts connections after SIGTERM");
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the idle connection is still open: {closed:?}");

    // The call that fits in the grace completes normally.
    let (status, body) = quick.await.unwrap().expect("the in-flight call got no answer");
    assert_eq!(status, 200);
    assert!(body.contains("\"/echo/quick\""), "{body}");
    // The other is cut at the deadline, and the edge exits then, not when it would have ended.
    assert_eq!(slow.await.unwrap(), None, "the call past the grace was answered");
    let exit = edge.wait(Duration::from_secs(10)).expect("the edge did not exit");
    let took = term.elapsed();
    assert!(exit.success(), "{exit:?}\n{}", edge.log_tail());
    assert!(took >= Duration::from_millis(2000), "exited after {took:?}: it did not wait for the in-flight call");
    assert!(took < Duration::from_secs(9), "exited after {took:?}: the grace (2.5 s) was not enforced");

    // Every call is metered, all flushed to Kafka before the exit: the one the edge cut as
    // the edge's doing (no answer was made: 503), the one whose client left as a client abort.
    let events = read_events(&topic, |e| e.len() >= 4).await;
    assert_eq!(events.len(), 4, "{events:?}");
    let by_path = |p: &str| events.iter().find(|e| e.path == p).unwrap_or_else(|| panic!("no event for {p}"));
    assert_eq!((by_path("/echo/idle").status, by_path("/echo/idle").outcome), (200, Outcome::Forwarded));
    assert_eq!((by_path("/echo/quick").status, by_path("/echo/quick").outcome), (200, Outcome::Forwarded));
    assert!(by_path("/echo/quick").latency_us >= 1_000_000);
    let cut = by_path("/echo/slow");
    assert_eq!((cut.status, cut.outcome), (503, Outcome::EdgeShutdown));
    assert!(cut.latency_us >= 2_000_000 && cut.latency_us < 9_000_000, "{cut:?}");
    let gone = by_path("/echo/gone");
    assert_eq!((gone.status, gone.outcome), (499, Outcome::ClientAborted));
    assert!(gone.latency_us < 2_000_000, "{gone:?}");
    assert!(edge.log_tail().contains("shutdown grace over"), "{}", edge.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_mid_body_at_the_end_of_the_grace_keeps_its_status_and_bytes() {
    // An upstream that sends its status line, headers and 10 of 1,000 body bytes, then stalls.
    let stalling = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = stalling.local_addr().unwrap();
    let stall = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = stalling.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789").await;
            held.push(s);
        }
    });
    let dir = TempDir::new("e2e_lifecycle_cut");
    let topic = unique("life-cut");
    create_topic(&topic, 1).await;
    let (mut edge, addr, admin) =
        start_edge(dir.path(), "edge", &config(&kafka(), &topic, upstream, &dir.path().join("spool"), &acme_key()))
            .await;
    let ready = wait_until(Duration::from_secs(10), || async { readyz(admin).await.0 == 200 }).await;
    assert!(ready, "{:?}\n{}", readyz(admin).await, edge.log_tail());

    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET /echo/stream HTTP/1.1\r\nHost: api.example\r\nx-api-key: key-acme\r\n\r\n").await.unwrap();
    // The head and the first 10 bytes arrive.
    let mut got = Vec::new();
    let arrived = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"0123456789") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(arrived.is_ok() && got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    edge.signal("TERM");
    let exit = edge.wait(Duration::from_secs(10)).expect("the edge did not exit");
    assert!(exit.success(), "{exit:?}\n{}", edge.log_tail());
    // The client sees the connection end before the announced 1,000 bytes.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut rest)).await;
    assert!(rest.len() < 990, "{} more bytes", rest.len());

    let events = read_events(&topic, |e| !e.is_empty()).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!((e.path.as_str(), e.status, e.outcome), ("/echo/stream", 200, Outcome::EdgeShutdown));
    assert_eq!(e.response_bytes, 10);
    assert!(e.latency_us >= 2_000_000, "{e:?}");
    stall.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_on_disk_within_seconds_and_replayed_by_the_next_start() {
    let dir = TempDir::new("e2e_lifecycle_spool");
    let mut broker = PrivateBroker::start().await;
    let topic = unique("life-spool");
    create_topic_on(&broker.addr, &topic, 2).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let cfg = config(&broker.addr, &topic, upstream, &spool, &acme_key());
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let reachable =
        wait_until(Duration::from_secs(10), || async { readyz(admin).await.1.contains("kafka: reachable") }).await;
    assert!(reachable, "{}", edge.log_tail());
    let caller = |n| acme_calls(n, 2, "/echo/x");
    let before = traffic::run(&format!("http://{addr}"), vec![caller(50)]).await;
    let produced = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_events_produced_total").await >= 50
    })
    .await;
    assert!(produced, "{}", edge.log_tail());

    // Kafka goes down and calls go on at once: the first of them reach librdkafka's queue
    // before the edge notices, the rest come after.
    broker.stop();
    let during = traffic::run(&format!("http://{addr}"), vec![caller(300)]).await;
    for t in [&before, &during] {
        assert_eq!(t.transport_errors, 0);
        assert_eq!(t.by_status.values().sum::<u64>(), t.by_status.get(&("acme".to_owned(), 200)).copied().unwrap_or(0));
    }
    // Within seconds every one of them is on disk: those queued in librdkafka are purged into
    // the spool once the probe finds Kafka gone, later ones go there directly. Nothing waits
    // in memory for the 30 s message timeout, where a crash would lose it.
    let t0 = Instant::now();
    let spooled = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_events_spooled_total").await >= 300
    })
    .await;
    assert!(
        spooled,
        "{} of 300 spooled after {:?}\n{}",
        metric(admin, "tollgate_edge_events_spooled_total").await,
        t0.elapsed(),
        edge.log_tail()
    );
    assert_eq!(metric(admin, "tollgate_edge_events_spooled_total").await, 300);
    // Kafka down: still ready, because the spool can take the events.
    assert_eq!(readyz(admin).await, (200, "ready\nkafka: unreachable\nspool: ok\n".to_owned()));
    assert_eq!(metric(admin, "tollgate_edge_kafka_reachable").await, 0);
    // A clean shutdown with the outage on: nothing is left in memory to flush.
    edge.signal("TERM");
    let exit = edge.wait(Duration::from_secs(15)).expect("the edge did not exit");
    assert!(exit.success(), "{exit:?}\n{}", edge.log_tail());
    let files: Vec<String> =
        std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(files.iter().any(|f| f.ends_with(".spool")), "nothing was spooled\n{}", edge.log_tail());
    // The log says why, once: not a line per event.
    let log = std::fs::read_to_string(&edge.log).unwrap();
    let lines = log.lines().filter(|l| l.contains("Kafka does not answer")).count();
    assert_eq!(lines, 1, "{}", edge.log_tail());
    // A clean exit closes the last segment (a `.open` marker would mean a crash).
    assert!(!files.iter().any(|f| f.ends_with(".open")), "{files:?}\n{}", edge.log_tail());

    // Next start, with Kafka back: the spool is replayed.
    broker.resume().await;
    let (mut next, _, next_admin) = start_edge(dir.path(), "edge2", &cfg).await;
    let ids: BTreeSet<String> =
        before.request_ids.iter().chain(&during.request_ids).map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 350);
    let events = read_events_on(&broker.addr, &topic, |e| {
        e.iter().map(|e| e.event_id.to_string()).collect::<BTreeSet<_>>().len() >= ids.len()
    })
    .await;
    let got: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(got, ids, "the events in Kafka are not the calls made");
    assert!(metric(next_admin, "tollgate_edge_events_replayed_total").await >= 1);
    assert_eq!(metric(next_admin, "tollgate_edge_events_dropped_total").await, 0);
    assert!(next.terminate(Duration::from_secs(15)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_overflows_into_the_spool_and_nothing_is_dropped() {
    let dir = TempDir::new("e2e_lifecycle_overflow");
    let topic = unique("life-overflow");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    // A queue of one event between the requests and the producer task, which drains it once
    // per millisecond: concurrent calls overflow it at once.
    let cfg = config(&kafka(), &topic, upstream, &dir.path().join("spool"), &acme_key())
        .replace("[kafka]\n", "[kafka]\nqueue_capacity = 1\n");
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let ready = wait_until(Duration::from_secs(10), || async { readyz(admin).await.0 == 200 }).await;
    assert!(ready, "{:?}\n{}", readyz(admin).await, edge.log_tail());
    let calls = traffic::run(&format!("http://{addr}"), vec![acme_calls(400, 16, "/echo/burst")]).await;
    assert_eq!(calls.by_status.get(&("acme".to_owned(), 200)), Some(&400), "{:?}", calls.by_status);
    let ids: BTreeSet<String> = calls.request_ids.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 400);

    // Some went through the spool (the overflow happened), none was dropped, and every call is
    // in Kafka once the spool is replayed.
    let events = read_events(&topic, |e| e.iter().map(|e| e.event_id).collect::<BTreeSet<_>>().len() >= 400).await;
    let got: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(got, ids, "the events in Kafka are not the calls made");
    assert_eq!(metric(admin, "tollgate_edge_events_dropped_total").await, 0, "{}", edge.log_tail());
    let spooled = metric(admin, "tollgate_edge_events_spooled_total").await;
    assert!(spooled > 0, "no event overflowed into the spool: the test proves nothing");
    assert_eq!(metric(admin, "tollgate_edge_events_enqueued_total").await, 400);
    assert!(edge.terminate(Duration::from_secs(15)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_reported_and_its_events_survive_a_crash_until_it_exists() {
    let dir = TempDir::new("e2e_lifecycle_topic");
    let topic = unique("life-missing"); // not created (the local broker does not create topics)
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let cfg = config(&kafka(), &topic, upstream, &spool, &acme_key());
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let want = (200, "ready\nkafka: topic not found (kafka.topic)\nspool: ok\n".to_owned());
    let reported = wait_until(Duration::from_secs(10), || async { readyz(admin).await == want }).await;
    assert!(reported, "{:?}\n{}", readyz(admin).await, edge.log_tail());
    assert_eq!(metric(admin, "tollgate_edge_kafka_reachable").await, 1);
    assert_eq!(metric(admin, "tollgate_edge_kafka_topic_missing").await, 1);
    // The log names the config key and the topic.
    let log = std::fs::read_to_string(&edge.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("does not exist") && l.contains("(kafka.topic)") && l.contains(&topic)),
        "{}",
        edge.log_tail()
    );

    let calls = traffic::run(&format!("http://{addr}"), vec![acme_calls(100, 2, "/echo/x")]).await;
    assert_eq!(calls.transport_errors, 0);
    assert_eq!(calls.by_status.get(&("acme".to_owned(), 200)), Some(&100));
    // Straight to disk: not into librdkafka's queue to wait there for the topic.
    let spooled = wait_until(Duration::from_secs(5), || async {
        metric(admin, "tollgate_edge_events_spooled_total").await >= 100
    })
    .await;
    assert!(spooled, "{}", metrics_text(admin).await);
    assert_eq!(metric(admin, "tollgate_edge_events_spooled_total").await, 100);
    assert_eq!(metric(admin, "tollgate_edge_events_produced_total").await, 0);

    // A crash, then the topic is created: the next start replays the segment the crashed
    // edge was writing, and the topic holds exactly the calls made.
    edge.kill9();
    create_topic(&topic, 1).await;
    let (mut next, _, next_admin) = start_edge(dir.path(), "edge2", &cfg).await;
    let ids: BTreeSet<String> = calls.request_ids.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(ids.len(), 100);
    let events =
        read_events(&topic, |e| e.iter().map(|e| e.event_id.to_string()).collect::<BTreeSet<_>>().len() >= ids.len())
            .await;
    let got: BTreeSet<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(got, ids, "the events in Kafka are not the calls made");
    assert_eq!(metric(next_admin, "tollgate_edge_kafka_topic_missing").await, 0);
    assert_eq!(metric(next_admin, "tollgate_edge_events_replayed_total").await, 100);
    assert!(next.terminate(Duration::from_secs(15)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_keys_authenticate_rotate_and_revoke() {
    let dir = TempDir::new("e2e_lifecycle_keys");
    let topic = unique("life-keys");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let out = std::process::Command::new(bin("tollgate-edge"))
        .args(["gen-key", "--consumer", "acme", "--key-id", "acme-2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    // The key (shown once), then the entry to paste.
    let key = lines.iter().find(|l| l.starts_with("tg_live_")).expect("no key printed").to_string();
    let entry = lines.iter().find(|l| l.starts_with("{ id = \"acme-2\"")).expect("no config entry printed").to_string();
    assert!(entry.contains(&sha256_hex(&key)), "{entry}");
    assert!(!entry.contains(&key), "the config entry holds the key itself");
    let other = std::process::Command::new(bin("tollgate-edge"))
        .args(["gen-key", "--consumer", "x", "--key-id", "y"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&other.stdout).contains(&key), "two runs printed the same key");

    // Rotation: the old and the new key both work, each metered under its own credential id.
    let spool = dir.path().join("spool");
    let (mut edge, addr, _admin) = start_edge(
        dir.path(),
        "edge",
        &config(&kafka(), &topic, upstream, &spool, &format!("{}, {entry}", acme_key())),
    )
    .await;
    assert_eq!(request(addr, "/echo/old", "key-acme").await.unwrap().0, 200);
    assert_eq!(request(addr, "/echo/new", &key).await.unwrap().0, 200);
    // Revocation: the old key's entry removed, then a reload.
    std::fs::write(dir.path().join("edge.toml"), config(&kafka(), &topic, upstream, &spool, &entry)).unwrap();
    edge.signal("HUP");
    let revoked = wait_until(Duration::from_secs(10), || async {
        request(addr, "/echo/old", "key-acme").await.unwrap().0 == 401
    })
    .await;
    assert!(revoked, "the removed key still works\n{}", edge.log_tail());
    assert_eq!(request(addr, "/echo/new", &key).await.unwrap().0, 200);
    let events = read_events(&topic, |e| e.iter().any(|e| e.status == 401)).await;
    let cred =
        |p: &str, s: u16| events.iter().find(|e| e.path == p && e.status == s).and_then(|e| e.credential_id.clone());
    assert_eq!(cred("/echo/old", 200).as_deref(), Some("acme-1"));
    assert_eq!(cred("/echo/new", 200).as_deref(), Some("acme-2"));
    assert!(edge.terminate(Duration::from_secs(15)));
}
