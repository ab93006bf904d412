//! Several targets per upstream through the real edge: round robin, retries on another target
//! only for idempotent bodiless requests whose connection failed, and passive health ejecting
//! a dead target so later requests stop paying for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;

fn config(topic: &str, a: std::net::SocketAddr, b: std::net::SocketAddr, dead: u16) -> String {
    let head = edge_head("edge-upstreams", topic);
    format!(
        r#"{head}
[[routes]]
id = "lb"
path_prefix = "/lb"
upstreams = ["http://{a}", "http://127.0.0.1:{dead}", "http://{b}"]
auth = "none"
max_fails = 2
fail_timeout_ms = 60000
[[routes]]
id = "noeject"
path_prefix = "/noeject"
upstreams = ["http://127.0.0.1:{dead}", "http://{a}"]
auth = "none"
max_fails = 1000000
connect_timeout_ms = 500
"#
    )
}

async fn send(addr: std::net::SocketAddr, method: &str, path: &str, body: &'static [u8]) -> u16 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    client.request(req).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_retry_and_passive_health() {
    let dir = TempDir::new("e2e_edge_upstreams");
    let topic = unique("edge_upstreams");
    create_topic(&topic, 1).await;
    let (a, a_stats) = start_echo().await;
    let (b, b_stats) = start_echo().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, a, b, dead)).await;

    // GETs: every one answered although a third of the targets is dead; the dead target is
    // ejected after max_fails = 2 connect failures, each of which was retried elsewhere.
    for i in 0..30 {
        assert_eq!(send(addr, "GET", &format!("/lb/{i}"), b"").await, 200, "GET {i}");
    }
    let (na, nb) = (a_stats.requests.load(Ordering::SeqCst), b_stats.requests.load(Ordering::SeqCst));
    assert_eq!(na + nb, 30);
    assert!(na >= 5 && nb >= 5, "round robin over the live targets: {na} / {nb}");
    assert_eq!(metric(admin, "tollgate_edge_upstream_ejections_total").await, 1);
    assert_eq!(metric(admin, "tollgate_edge_upstream_retries_total").await, 2);

    // POSTs are never retried: with a dead target that is never ejected, the calls that land
    // on it get 502 and the upstream sees exactly the others, once each.
    let before = a_stats.requests.load(Ordering::SeqCst);
    let mut ok = 0;
    let mut bad_gateway = 0;
    for i in 0..10 {
        match send(addr, "POST", &format!("/noeject/{i}"), b"payload").await {
            200 => ok += 1,
            502 => bad_gateway += 1,
            s => panic!("POST {i}: {s}"),
        }
    }
    assert_eq!((ok, bad_gateway), (5, 5), "round robin over [dead, live], no retry");
    assert_eq!(a_stats.requests.load(Ordering::SeqCst) - before, 5);
    // The same route retries bodiless GETs, so none fails, and each reaches the upstream once.
    let before = a_stats.requests.load(Ordering::SeqCst);
    for i in 0..10 {
        assert_eq!(send(addr, "GET", &format!("/noeject/{i}"), b"").await, 200, "GET {i}");
    }
    assert_eq!(a_stats.requests.load(Ordering::SeqCst) - before, 10);
    let retries = metric(admin, "tollgate_edge_upstream_retries_total").await - 2;
    assert!((1..=10).contains(&retries), "{retries} retries");
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());

    // The events name the target each call was last sent to: a retried call the live target
    // that answered it, a POST refused with 502 the dead one.
    let events = read_events(&topic, |e| e.len() >= 50).await;
    let dead_target = format!("http://127.0.0.1:{dead}");
    for e in &events {
        let target = e.upstream_target.as_deref();
        match e.status {
            200 => assert!(target == Some(&*format!("http://{a}")) || target == Some(&*format!("http://{b}")), "{e:?}"),
            502 => assert_eq!(target, Some(dead_target.as_str()), "{e:?}"),
            s => panic!("status {s}: {e:?}"),
        }
    }
    assert_eq!(events.iter().filter(|e| e.status == 502).count(), 5);
}

/// Weighted targets (a canary): each target gets its weight's share of the requests, a target
/// of weight 0 none (drained), and a reload moves the shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_targets_share_the_requests_by_weight_and_a_reload_moves_them() {
    let dir = TempDir::new("e2e_edge_weights");
    let topic = unique("edge_weights");
    create_topic(&topic, 1).await;
    let (stable, stable_stats) = start_echo().await;
    let (canary, canary_stats) = start_echo().await;
    let (drained, drained_stats) = start_echo().await;
    let spool = dir.path().join("spool");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = |w_stable: u32, w_canary: u32| {
        format!(
            "{}[spool]\ndir = \"{}\"\n[[routes]]\nid = \"w\"\npath_prefix = \"/w\"\nauth = \"none\"\n\
             upstreams = [{{ url = \"http://{stable}\", weight = {w_stable} }}, {{ url = \"http://{canary}\", weight = {w_canary} }}, \
             {{ url = \"http://{drained}\", weight = 0 }}]\n\
             [[routes]]\nid = \"dead\"\npath_prefix = \"/dead\"\nauth = \"none\"\nretries = 1\n\
             upstreams = [\"http://127.0.0.1:{dead}\", {{ url = \"http://{drained}\", weight = 0 }}]\n",
            edge_head("edge-weights", &topic),
            spool.display()
        )
    };
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &config(9, 1)).await;
    let counts = || [&stable_stats, &canary_stats, &drained_stats].map(|s| s.requests.load(Ordering::SeqCst));

    // 9:1:0 over 200 calls (whole cycles of 10): exactly 180, 20 and none, on any mix of the
    // edge's worker threads.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        calls.spawn(async move { send(addr, "GET", &format!("/w/{i}"), b"").await });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(counts(), [180, 20, 0]);
    // A retry never goes to a drained target (nor counts as one): the only target in service
    // is down, so 502 after one attempt.
    assert_eq!(send(addr, "GET", "/dead/x", b"").await, 502);
    assert_eq!(metric(admin, "tollgate_edge_upstream_retries_total").await, 0);
    assert_eq!(counts(), [180, 20, 0]);

    // Promote the canary: 0:1 after a reload; the stable target gets nothing more.
    reload_edge(&edge, admin, &dir.path().join("edge.toml"), &config(0, 1)).await;
    for i in 0..20 {
        assert_eq!(send(addr, "GET", "/w/after", b"").await, 200, "call {i}");
    }
    assert_eq!(counts(), [180, 40, 0]);

    // Each call's event names the target it went to (`upstream_target`).
    let events = read_events(&topic, |e| e.len() >= 221).await;
    let sent_to = |target: std::net::SocketAddr| {
        events.iter().filter(|e| e.upstream_target.as_deref() == Some(&*format!("http://{target}"))).count()
    };
    assert_eq!((sent_to(stable), sent_to(canary), sent_to(drained)), (180, 40, 0));
}

/// Active health checks: a target whose health endpoint fails (twice in a row) is taken out of
/// service although it still answers requests (passive health would never notice), stays out
/// across a reload, and comes back once its checks pass again; no client request is spent as a
/// probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_target_out_and_bring_it_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let dir = TempDir::new("e2e_edge_health");
    let topic = unique("edge_health");
    create_topic(&topic, 1).await;
    let (a, _) = start_echo().await;
    let (sick, served) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let b = {
        let (sick, served) = (Arc::clone(&sick), Arc::clone(&served));
        serve_http(move |req: http::Request<hyper::body::Incoming>| {
            let (sick, served) = (Arc::clone(&sick), Arc::clone(&served));
            async move {
                let status = if req.uri().path() == "/health" {
                    if sick.load(Ordering::SeqCst) { 503 } else { 200 }
                } else {
                    served.fetch_add(1, Ordering::SeqCst);
                    200
                };
                http::Response::builder().status(status).body(Full::new(Bytes::from_static(b"b"))).unwrap()
            }
        })
        .await
    };
    let cfg = format!(
        "{}[[routes]]\nid = \"hc\"\npath_prefix = \"/hc\"\nauth = \"none\"\nupstreams = [\"http://{a}\", \"http://{b}\"]\n\
         health_check = {{ path = \"/health\", interval_ms = 200, timeout_ms = 150, fails = 2, passes = 2 }}\n",
        edge_head("edge-health", &topic)
    );
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let calls = |n: usize| async move {
        for i in 0..n {
            assert_eq!(send(addr, "GET", &format!("/hc/{i}"), b"").await, 200, "call {i}");
        }
    };
    let checks = |result: &'static str| async move {
        metric(admin, &format!("tollgate_edge_health_checks_total{{result=\"{result}\"}}")).await
    };
    let passed = wait_until(Duration::from_secs(5), || async { checks("passed").await >= 2 }).await;
    assert!(passed, "no health check passed:\n{}", edge.log_tail());
    calls(20).await;
    assert_eq!(served.load(Ordering::SeqCst), 10, "round robin over two healthy targets");

    // B's health endpoint fails: out of service within a check or two, though it serves fine.
    sick.store(true, Ordering::SeqCst);
    let out = wait_until(Duration::from_secs(5), || async {
        metric(admin, "tollgate_edge_upstream_ejections_total").await == 1
    })
    .await;
    assert!(out, "B was not taken out:\n{}", edge.log_tail());
    assert!(checks("failed").await >= 2, "out after fewer than `fails` failed checks");
    calls(20).await;
    assert_eq!(served.load(Ordering::SeqCst), 10, "calls went to a target that failed its checks");
    // A reload keeps B out (its health carries over; a fresh start would send it half the calls
    // until its next check).
    reload_edge(&edge, admin, &dir.path().join("edge.toml"), &cfg).await;
    calls(20).await;
    assert_eq!(served.load(Ordering::SeqCst), 10, "the reload put B back in service");
    let up = |target: std::net::SocketAddr| async move {
        metric(admin, &format!("tollgate_edge_upstream_target_up{{route=\"hc\",target=\"http://{target}\"}}")).await
    };
    assert_eq!((up(a).await, up(b).await), (1, 0));
    assert!(edge.log_tail().contains("failed its health check"), "{}", edge.log_tail());

    // Healthy again: back once a check passes (not through a client's request).
    sick.store(false, Ordering::SeqCst);
    let back = wait_until(Duration::from_secs(5), || async { edge.log_tail().contains("back in service") }).await;
    assert!(back, "B did not come back:\n{}", edge.log_tail());
    assert_eq!(served.load(Ordering::SeqCst), 10, "a client request was used as a probe");
    assert_eq!(up(b).await, 1);
    calls(20).await;
    assert_eq!(served.load(Ordering::SeqCst), 20);
}

/// `max_in_flight`: a route's calls in flight at once are capped; more get 503 (problem
/// document, `Retry-After`, outcome `upstream_error` with no target in the event) without
/// reaching the upstream; a call holds its place until its response body has been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_caps_the_calls_a_route_sends_at_once() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("e2e_edge_in_flight");
    let topic = unique("edge_in_flight");
    create_topic(&topic, 1).await;
    let (up, stats) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"lim\"\npath_prefix = \"/lim\"\nauth = \"none\"\nupstream = \"http://{up}\"\nmax_in_flight = 2\n",
        edge_head("edge-in-flight", &topic)
    );
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;

    // Six at once, each answered after 1 s: two go through, four are refused at once.
    let calls = (0..6).map(|i| {
        tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let req = http::Request::get(format!("http://{addr}/lim/{i}?delay_ms=1000"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            (parts, String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap())
        })
    });
    let mut answers = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        answers.push(c.await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|(p, _)| p.status.as_u16()).collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 2, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 4, "{statuses:?}");
    for (parts, body) in answers.iter().filter(|(p, _)| p.status == 503) {
        assert_eq!(parts.headers["content-type"], "application/problem+json");
        assert_eq!(parts.headers["retry-after"], "1");
        assert!(body.contains("upstream-overloaded") && body.contains("2 calls in flight"), "{body}");
    }
    assert_eq!(stats.requests.load(Ordering::SeqCst), 2, "refused calls reached the upstream");
    assert_eq!(metric(admin, "tollgate_edge_in_flight_refusals_total{limit=\"route\"}").await, 4);
    assert_eq!(metric(admin, "tollgate_edge_route_in_flight{route=\"lim\"}").await, 0);

    // Two large answers whose clients stop reading hold both places while their bodies are
    // unsent: the next call is refused; once those clients go away, it goes through.
    let mut slow_readers = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /lim/big?bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        slow_readers.push(s);
    }
    assert_eq!(send(addr, "GET", "/lim/x", b"").await, 503);
    assert_eq!(metric(admin, "tollgate_edge_route_in_flight{route=\"lim\"}").await, 2);
    drop(slow_readers);
    let room = wait_until(Duration::from_secs(5), || async { send(addr, "GET", "/lim/x", b"").await == 200 }).await;
    assert!(room, "the places of the abandoned calls were not given back:\n{}", edge.log_tail());

    // The refusals' events: outcome upstream_error, 503, sent to no target.
    let events = read_events(&topic, |e| e.iter().filter(|e| e.status == 503).count() >= 5).await;
    for e in events.iter().filter(|e| e.status == 503) {
        assert_eq!((e.outcome, e.upstream_target.as_deref()), (tollgate_schemas::Outcome::UpstreamError, None));
    }
}

/// `queue_timeout_ms`: a call that finds its route (or every target) at `max_in_flight` waits
/// for a place instead of the immediate 503, and gets the 503 when none comes in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_makes_calls_wait_for_a_place() {
    use http_body_util::BodyExt;
    let dir = TempDir::new("e2e_edge_queue");
    let topic = unique("edge_queue");
    create_topic(&topic, 1).await;
    let (up, _) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"q\"\npath_prefix = \"/q\"\nauth = \"none\"\nupstream = \"http://{up}\"\n\
         max_in_flight = 1\nqueue_timeout_ms = 5000\n\
         [[routes]]\nid = \"short\"\npath_prefix = \"/short\"\nauth = \"none\"\nupstream = \"http://{up}\"\n\
         max_in_flight = 1\nqueue_timeout_ms = 300\n\
         [[routes]]\nid = \"t\"\npath_prefix = \"/t\"\nauth = \"none\"\n\
         upstreams = [{{ url = \"http://{up}\", max_in_flight = 1 }}]\nqueue_timeout_ms = 5000\n\
         [[routes]]\nid = \"full\"\npath_prefix = \"/full\"\nauth = \"none\"\nupstream = \"http://{up}\"\n\
         max_in_flight = 1\nqueue_timeout_ms = 5000\nmax_queued = 1\n",
        edge_head("edge-queue", &topic)
    );
    let (_edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let call = |path: String| async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let started = std::time::Instant::now();
        let resp = client
            .request(http::Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (parts.status.as_u16(), body, started.elapsed())
    };

    // Three at once on a route of one place, each answered after 300 ms: all served, one
    // after the other (the last waited for two).
    for prefix in ["/q", "/t"] {
        let calls: Vec<_> = (0..3).map(|i| tokio::spawn(call(format!("{prefix}/{i}?delay_ms=300")))).collect();
        let mut took = Vec::new();
        for c in calls {
            let (status, body, elapsed) = c.await.unwrap();
            assert_eq!(status, 200, "{prefix}: {body}");
            took.push(elapsed);
        }
        took.sort();
        assert!(took[2] >= Duration::from_millis(850), "{prefix}: not one after the other: {took:?}");
    }
    assert_eq!(metric(admin, "tollgate_edge_queued_calls_total{result=\"admitted\"}").await, 4);

    // Five calls 40 ms apart behind a call of 700 ms: served in the order they came, while
    // /metrics shows them queued.
    let holder = tokio::spawn(call("/q/hold?delay_ms=700".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut queued = Vec::new();
    for i in 0..5 {
        let served = call(format!("/q/{i}?delay_ms=10"));
        queued.push(tokio::spawn(async move { (served.await, std::time::Instant::now(), i) }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(metric(admin, "tollgate_edge_queue_length{route=\"q\",place=\"route\"}").await, 5);
    assert_eq!(holder.await.unwrap().0, 200);
    let mut finished = Vec::new();
    for q in queued {
        let ((status, body, _), at, i) = q.await.unwrap();
        assert_eq!(status, 200, "{body}");
        finished.push((at, i));
    }
    finished.sort();
    assert_eq!(finished.iter().map(|(_, i)| *i).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert_eq!(metric(admin, "tollgate_edge_queue_length{route=\"q\",place=\"route\"}").await, 0);
    assert_eq!(metric(admin, "tollgate_edge_queued_calls_total{result=\"admitted\"}").await, 9);

    // A queue of 300 ms behind a call of 1.5 s: the 503 comes after the wait, not at once and
    // not when the place comes free.
    let holder = tokio::spawn(call("/short/hold?delay_ms=1500".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body, waited) = call("/short/x".into()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream-overloaded"), "{body}");
    assert!(waited >= Duration::from_millis(280) && waited < Duration::from_millis(1200), "{waited:?}");
    assert_eq!(holder.await.unwrap().0, 200);
    assert_eq!(metric(admin, "tollgate_edge_queued_calls_total{result=\"timed_out\"}").await, 1);
    assert_eq!(metric(admin, "tollgate_edge_in_flight_refusals_total{limit=\"route\"}").await, 1);

    // `max_queued = 1`: one call in flight, one waiting; the next is refused at once, and the
    // waiting one is still served.
    let holder = tokio::spawn(call("/full/hold?delay_ms=800".into()));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let waiting = tokio::spawn(call("/full/wait".into()));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, body, waited) = call("/full/x".into()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("queue for a place is full"), "{body}");
    assert!(waited < Duration::from_millis(400), "not refused at once: {waited:?}");
    assert_eq!(holder.await.unwrap().0, 200);
    assert_eq!(waiting.await.unwrap().0, 200);
    assert_eq!(metric(admin, "tollgate_edge_queued_calls_total{result=\"queue_full\"}").await, 1);
}

/// `upstreams[].max_in_flight` (nginx's `max_conns`): a target at its limit is passed over for
/// the route's others; when every target in service is at its limit, 503 without reaching any;
/// a call holds its target's place until its response has been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_at_its_max_in_flight_is_passed_over() {
    use http_body_util::BodyExt;
    let dir = TempDir::new("e2e_edge_target_in_flight");
    let topic = unique("edge_target_in_flight");
    create_topic(&topic, 1).await;
    let ((a, a_stats), (b, b_stats)) = (start_echo().await, start_echo().await);
    let cfg = format!(
        "{}[[routes]]\nid = \"cap\"\npath_prefix = \"/cap\"\nauth = \"none\"\n\
         upstreams = [{{ url = \"http://{a}\", max_in_flight = 1 }}, {{ url = \"http://{b}\", max_in_flight = 2 }}]\n",
        edge_head("edge-target-in-flight", &topic)
    );
    let (_edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let call = |path: String| async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = client
            .request(http::Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (parts, String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap())
    };

    // Five at once, each answered after 1 s: the targets take 1 + 2, the other two are refused
    // at once (whatever the round robin's turn: a full target is passed over).
    let calls: Vec<_> = (0..5).map(|i| tokio::spawn(call(format!("/cap/{i}?delay_ms=1000")))).collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile: each target's gauge is at its limit.
    assert_eq!(
        metric(admin, &format!("tollgate_edge_upstream_target_in_flight{{route=\"cap\",target=\"http://{a}\"}}")).await,
        1
    );
    assert_eq!(
        metric(admin, &format!("tollgate_edge_upstream_target_in_flight{{route=\"cap\",target=\"http://{b}\"}}")).await,
        2
    );
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let statuses: Vec<u16> = answers.iter().map(|(p, _)| p.status.as_u16()).collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 3, "{statuses:?}");
    for (parts, body) in answers.iter().filter(|(p, _)| p.status != 200) {
        assert_eq!(parts.status, 503, "{body}");
        assert_eq!(parts.headers["retry-after"], "1");
        assert!(body.contains("upstream-overloaded") && body.contains("every target"), "{body}");
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!((a_stats.requests.load(Ordering::SeqCst), b_stats.requests.load(Ordering::SeqCst)), (1, 2));
    assert_eq!(metric(admin, "tollgate_edge_in_flight_refusals_total{limit=\"target\"}").await, 2);
    assert_eq!(metric(admin, "tollgate_edge_in_flight_refusals_total{limit=\"route\"}").await, 0);
    // Done: the places are free again, both targets take calls.
    let next: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(call(format!("/cap/after{i}")).await.0.status.as_u16());
        }
        v
    };
    assert_eq!(next, [200; 4]);
    assert_eq!((a_stats.requests.load(Ordering::SeqCst), b_stats.requests.load(Ordering::SeqCst)), (3, 4));

    // A client that stops reading a large answer holds its target's place until it goes away.
    let in_flight = || async {
        let mut sum = 0;
        for t in [a, b] {
            sum += metric(
                admin,
                &format!("tollgate_edge_upstream_target_in_flight{{route=\"cap\",target=\"http://{t}\"}}"),
            )
            .await;
        }
        sum
    };
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /cap/big?bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(in_flight().await, 1, "the unsent answer's place was given back");
    }
    assert!(wait_until(Duration::from_secs(5), || async { in_flight().await == 0 }).await);

    // The refusals' events: outcome upstream_error, 503, sent to no target.
    let events = read_events(&topic, |e| e.len() >= 10).await;
    let refused: Vec<_> = events.iter().filter(|e| e.status == 503).collect();
    assert_eq!(refused.len(), 2);
    for e in refused {
        assert_eq!((e.outcome, e.upstream_target.as_deref()), (tollgate_schemas::Outcome::UpstreamError, None));
    }
}

/// An HTTP/2-only upstream (h2c with prior knowledge, or with `tls` TLS offering only `h2` by
/// ALPN; HTTP/1.1 is a protocol error to it). It answers `<version> <method> <path?query>
/// te=<te> consumer=<x-consumer-id> host=<Host header> body=<bytes>`, with the trailer
/// `grpc-status: 0`, and counts the connections it accepted (over TLS: those that negotiated
/// `h2`).
async fn start_h2(tls: bool) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&conns);
    let acceptor = tls.then(|| {
        let mut config = test_server_tls();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let (parts, body) = req.into_parts();
                let n = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                let header =
                    |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                // gRPC answers: `…/unavailable` fails in its trailers (UNAVAILABLE), `…/missing`
                // has no message and its status in the headers (NOT_FOUND, "trailers-only").
                let path = parts.uri.path();
                let (grpc, in_headers, in_trailers) = match () {
                    _ if path.ends_with("/unavailable") => (true, None, Some("14")),
                    _ if path.ends_with("/missing") => (true, Some("5"), None),
                    _ => (false, None, Some("0")),
                };
                let text = match in_headers {
                    Some(_) => String::new(),
                    None => format!(
                        "{:?} {} {} te={} consumer={} host={} body={n}",
                        parts.version,
                        parts.method,
                        parts.uri.path_and_query().map_or("", |p| p.as_str()),
                        header("te"),
                        header("x-consumer-id"),
                        header("host"),
                    ),
                };
                let trailers = in_trailers.map(|code| {
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static(code));
                    t
                });
                let body = Full::new(Bytes::from(text)).with_trailers(async move { trailers.map(Ok) });
                let mut resp = http::Response::new(body);
                if grpc {
                    resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
                }
                if let Some(code) = in_headers {
                    resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static(code));
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let (acceptor, counted) = (acceptor.clone(), Arc::clone(&counted));
            tokio::spawn(async move {
                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let _ = match acceptor {
                    None => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        h2.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else { return };
                        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        h2.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await
                    }
                };
            });
        }
    });
    (addr, conns)
}

/// The body of a GET over HTTP/1.1.
async fn send_h1(addr: std::net::SocketAddr, path: &str) -> String {
    use http_body_util::BodyExt;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(format!("http://{addr}{path}").parse().unwrap()).await.unwrap();
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// `upstream_protocol = "h2"`: requests go to the targets over HTTP/2 (h2c here), multiplexed
/// on one connection per worker thread, whatever the client spoke; trailers (gRPC's status)
/// come back to HTTP/2 clients, `TE: trailers` goes through; health checks speak HTTP/2 too;
/// the call is metered like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstreams_get_http2_multiplexed_with_trailers() {
    use http_body_util::BodyExt;
    let dir = TempDir::new("e2e_edge_h2_upstream");
    let topic = unique("edge_h2_upstream");
    create_topic(&topic, 1).await;
    let (up, conns) = start_h2(false).await;
    let (checked, _) = start_h2(false).await;
    let (secure, secure_conns) = start_h2(true).await;
    let ca = repo_root().join("tests/testdata/tls/ca.pem");
    let cfg = format!(
        "{}{}[[routes]]\nid = \"g\"\npath_prefix = \"/g\"\nupstream = \"http://{up}\"\nupstream_protocol = \"h2\"\n\
         [[routes]]\nid = \"hc\"\npath_prefix = \"/hc\"\nauth = \"none\"\nupstream = \"http://{checked}\"\n\
         upstream_protocol = \"h2\"\nhealth_check = {{ path = \"/health\", interval_ms = 200, timeout_ms = 150 }}\n\
         [[routes]]\nid = \"gs\"\npath_prefix = \"/gs\"\nauth = \"none\"\nupstream = \"https://localhost:{}\"\n\
         upstream_protocol = \"h2\"\n",
        edge_head("edge-h2-upstream", &topic)
            .replace("[edge]\n", &format!("[edge]\nworker_threads = 2\ntls_ca_file = \"{}\"\n", ca.display())),
        acme_with_key(100_000),
        secure.port()
    );
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;

    // An HTTP/1.1 client: the upstream gets HTTP/2 with the path, query, body and consumer,
    // and its authority as `:authority` (no Host header); the client gets HTTP/1.1.
    let h1: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{addr}/g/echo?x=1"))
        .header("x-api-key", "key-acme")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(vec![b'a'; 1000])))
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_11));
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(text, "HTTP/2.0 POST /g/echo?x=1 te=trailers consumer=acme host= body=1000");
    // A body far over HTTP/2's initial flow-control window (64 KiB) streams through.
    let req = http::Request::put(format!("http://{addr}/g/upload"))
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::from(vec![b'u'; 3 << 20])))
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with(&format!("body={}", 3 << 20)), "{text}");

    // An HTTP/2 client gets the upstream's trailers.
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::get(format!("http://{addr}/g/t"))
        .header("x-api-key", "key-acme")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().and_then(|t| t.get("grpc-status")).unwrap(), "0");

    // gRPC: HTTP 200 either way; a failure is in `grpc-status` (trailers, or the headers of an
    // answer without messages), and the event's status says what it means.
    let req = http::Request::get(format!("http://{addr}/g/svc/unavailable"))
        .header("x-api-key", "key-acme")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().and_then(|t| t.get("grpc-status")).unwrap(), "14");
    let req = http::Request::get(format!("http://{addr}/g/svc/missing"))
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers()["grpc-status"].to_str().unwrap()), (200, "5"));

    // 64 calls at once from 64 HTTP/1.1 connections: multiplexed over one upstream connection
    // per worker thread (2), not one each.
    let calls: Vec<_> = (0..64)
        .map(|i| {
            tokio::spawn(async move {
                let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
                let req = http::Request::get(format!("http://{addr}/g/{i}"))
                    .header("x-api-key", "key-acme")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let text = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8(text.to_vec()).unwrap())
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let (status, text) = call.await.unwrap();
        assert_eq!(status, 200);
        assert!(text.starts_with(&format!("HTTP/2.0 GET /g/{i} ")), "{text}");
    }
    let opened = conns.load(Ordering::SeqCst);
    assert!((1..=2).contains(&opened), "{opened} upstream connections for the 69 calls so far");

    // Over TLS: ALPN `h2`, the certificate verified against the test CA.
    let answer = send_h1(addr, "/gs/x").await;
    assert_eq!(answer, "HTTP/2.0 GET /gs/x te= consumer= host= body=0");
    assert_eq!(secure_conns.load(Ordering::SeqCst), 1, "no TLS connection negotiated h2");

    // Health checks over HTTP/2 pass (HTTP/1.1 ones would fail on an h2c-only target).
    let passed = wait_until(Duration::from_secs(5), || async {
        metric(admin, "tollgate_edge_health_checks_total{result=\"passed\"}").await >= 2
    })
    .await;
    assert!(passed, "no health check passed:\n{}", edge.log_tail());
    assert_eq!(metric(admin, "tollgate_edge_health_checks_total{result=\"failed\"}").await, 0);

    // Metered: the 70 calls, forwarded, with the target and the bytes; the gRPC failures with
    // the HTTP status their grpc-status means (UNAVAILABLE 503, NOT_FOUND 404).
    let events = read_events(&topic, |e| e.len() >= 70).await;
    // The gRPC code itself is kept too (schema v5's `grpc_status`).
    let status_of = |path: &str| events.iter().find(|e| e.path == path).map(|e| (e.status, e.outcome, e.grpc_status));
    assert_eq!(status_of("/g/svc/unavailable"), Some((503, tollgate_schemas::Outcome::Forwarded, Some(14))));
    assert_eq!(status_of("/g/svc/missing"), Some((404, tollgate_schemas::Outcome::Forwarded, Some(5))));
    let events: Vec<_> =
        events.into_iter().filter(|e| e.route_id.as_deref() == Some("g") && !e.path.starts_with("/g/svc/")).collect();
    let odd: Vec<_> =
        events.iter().filter(|e| e.outcome != tollgate_schemas::Outcome::Forwarded || e.status != 200).collect();
    assert!(odd.is_empty(), "{odd:?}");
    // Not gRPC (no application/grpc content type): no code, although their trailers carry one.
    assert!(events.iter().all(|e| e.grpc_status.is_none()), "{events:?}");
    assert!(events.iter().all(|e| e.upstream_target.as_deref() == Some(format!("http://{up}").as_str())));
    assert_eq!(events.iter().find(|e| e.method == "POST").unwrap().request_bytes, 1000);
    assert_eq!(events.iter().find(|e| e.method == "PUT").unwrap().request_bytes, 3 << 20);
}

/// A plan's `max_in_flight` caps each consumer's calls in flight: beyond it, 429
/// `concurrency-limited` (outcome `rate_limited`), without spending the consumer's rate
/// budget; another consumer on the same plan is not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_max_in_flight_caps_each_consumers_calls() {
    use http_body_util::BodyExt;
    let dir = TempDir::new("e2e_edge_plan_in_flight");
    let topic = unique("edge_plan_in_flight");
    create_topic(&topic, 1).await;
    let (up, _) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{up}\"\n\
         [plans.p]\nrate_per_second = 1\nburst = 3\nmax_in_flight = 2\n\
         [[consumers]]\nid = \"acme\"\nplan = \"p\"\nkeys = [{{ id = \"a\", sha256 = \"{}\" }}]\n\
         [[consumers]]\nid = \"globex\"\nplan = \"p\"\nkeys = [{{ id = \"g\", sha256 = \"{}\" }}]\n",
        edge_head("edge-plan-in-flight", &topic),
        sha256_hex("key-acme"),
        sha256_hex("key-globex")
    );
    let (_edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let call = |key: &'static str, i: usize| async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = http::Request::get(format!("http://{addr}/echo/{i}?delay_ms=300"))
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let (status, retry_after) = (resp.status().as_u16(), resp.headers().get("retry-after").cloned());
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        (status, retry_after, body)
    };
    // Four of acme's at once and two of globex's: acme's third and fourth are refused.
    let acme: Vec<_> = (0..4).map(|i| tokio::spawn(call("key-acme", i))).collect();
    let globex: Vec<_> = (0..2).map(|i| tokio::spawn(call("key-globex", i))).collect();
    let mut acme_statuses = Vec::new();
    for c in acme {
        let (status, retry_after, body) = c.await.unwrap();
        if status == 429 {
            assert!(body.contains("concurrency-limited") && body.contains("2 calls of this consumer"), "{body}");
            assert_eq!(retry_after.unwrap(), "1");
        }
        acme_statuses.push(status);
    }
    acme_statuses.sort_unstable();
    assert_eq!(acme_statuses, vec![200, 200, 429, 429]);
    for c in globex {
        assert_eq!(c.await.unwrap().0, 200, "globex was held back by acme's calls");
    }
    assert_eq!(metric(admin, "tollgate_edge_in_flight_refusals_total{limit=\"plan\"}").await, 2);
    // The refused calls spent none of acme's burst of 3: one more call goes through.
    assert_eq!(call("key-acme", 9).await.0, 200);

    let events = read_events(&topic, |e| e.len() >= 7).await;
    let refused: Vec<_> = events.iter().filter(|e| e.status == 429).collect();
    assert_eq!(refused.len(), 2);
    assert!(refused.iter().all(|e| e.outcome == tollgate_schemas::Outcome::RateLimited
        && e.consumer_id.as_deref() == Some("acme")
        && e.upstream_target.is_none()));
}
