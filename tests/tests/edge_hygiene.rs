//! HTTP hygiene at the edge, over raw sockets: request smuggling, slow headers, header and
//! body limits, hop-by-hop headers, spoofed X-Forwarded-For.
//!
//! Smuggling: every case hides a second request after the first one's body, framed so that a
//! parser disagreeing with the edge's would see it. Passing means: the edge answers 400 or
//! answers once and closes, the hidden request is never answered, and the upstream receives at
//! most the one request the client sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_e2e::*;

const KEY: &str = "key-acme";

fn config(topic: &str, upstream: std::net::SocketAddr) -> String {
    let hash = sha256_hex(KEY);
    format!(
        "[edge]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nheader_read_timeout_ms = 500\n\
         max_headers = 50\nmax_header_bytes = 8192\nmax_body_bytes = 1000\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.big]\nrate_per_second = 100000\n\
         [[consumers]]\nid = \"acme\"\nplan = \"big\"\nkeys = [{{ id = \"k\", sha256 = \"{hash}\" }}]\n",
        kafka()
    )
}

/// Sends raw bytes and reads until the edge closes or 3 s pass. Returns (status of the first
/// response or None, the raw answer, whether the connection was closed by the edge).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (Option<u16>, String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut closed = false;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) if !buf.is_empty() => break,
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    (status, text, closed)
}

/// Reads (and drops) what `s` still receives until the edge closes it: how long that took.
/// Panics if it is still open after 5 s.
async fn closed_after(s: &mut TcpStream, what: &str) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "{what}: still connected after 5 s");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_limits_and_header_hygiene() {
    let dir = TempDir::new("e2e_hygiene");
    let topic = unique("hygiene");
    create_topic(&topic, 1).await;
    let (upstream, echo) = start_echo().await;
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream)).await;

    // Request smuggling: each case is one request from the client's point of view, possibly
    // hiding a second one. The edge answers 400 or closes, and the upstream never receives
    // more requests than the client sent.
    let hidden = format!("GET /echo/smuggled HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n");
    let cases = [
        (
            "CL+TE",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "TE+CL",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "duplicate CL",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 0\r\nContent-Length: 60\r\n\r\n{hidden}"
            ),
        ),
        (
            "unknown TE",
            format!("POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: gzip\r\n\r\n{hidden}"),
        ),
        (
            "TE not last chunked",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "HTTP/1.0 with TE",
            format!(
                "POST /echo/a HTTP/1.0\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "space before colon",
            format!(
                "POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n{hidden}"
            ),
        ),
    ];
    for (name, req) in &cases {
        let before = echo.requests.load(Ordering::SeqCst);
        let (status, answer, closed) = raw(addr, req.as_bytes()).await;
        let reached = echo.requests.load(Ordering::SeqCst) - before;
        let first_line = answer.lines().next().unwrap_or("");
        // 400, or (hyper's RFC 9112 §6.3 handling of CL+TE: chunked wins, Content-Length is
        // dropped) one answer and the connection closed right after it.
        assert!(status == Some(400) || closed, "{name}: got `{first_line}` and the connection stayed open\n{answer}");
        assert_eq!(
            answer.matches("HTTP/1.1 ").count().max(answer.matches("HTTP/1.0 ").count()),
            usize::from(status.is_some()),
            "{name}: more than one response\n{answer}"
        );
        assert!(reached <= 1, "{name}: the upstream received {reached} requests for one");
        assert!(!answer.contains("/echo/smuggled"), "{name}: the hidden request was answered:\n{answer}");
    }

    // Slow headers: a client that never finishes its head is disconnected after 500 ms; so is
    // one that sends nothing at all, or only the start of the HTTP/2 preface (hyper's own timer
    // starts only once the protocol is known: `tollgate_edge::silent`).
    let timed_out = |reason: &'static str| async move {
        metric(admin, &format!("tollgate_edge_connections_timed_out_total{{reason=\"{reason}\"}}")).await
    };
    let reasons = ["first_bytes", "request_head", "idle"];
    let mut before = Vec::new();
    for r in reasons {
        before.push(timed_out(r).await);
    }
    let accepted_before = metric(admin, "tollgate_edge_connections_accepted_total").await;
    for (name, sent) in [
        ("unfinished head", &b"GET /echo/slow HTTP/1.1\r\nHost: x\r\n"[..]),
        ("nothing", &b""[..]),
        ("part of the HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        let waited = closed_after(&mut s, name).await;
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "{name}: {waited:?}");
    }

    // A keep-alive connection left idle after its answer is closed once the next head has not
    // come within the same timeout (hyper restarts its header timer after every response).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /echo/idle HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let waited = closed_after(&mut s, "idle keep-alive connection").await;
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(3), "{waited:?}");
    // Each of those closes is counted once, under its reason; none of them is open any more.
    let mut counted = Vec::new();
    for (r, b) in reasons.iter().zip(&before) {
        counted.push(timed_out(r).await - b);
    }
    assert_eq!(counted, [2, 1, 1], "timed-out connections by reason {reasons:?}");
    assert_eq!(metric(admin, "tollgate_edge_connections_accepted_total").await - accepted_before, 4);
    assert_eq!(metric(admin, "tollgate_edge_connections_open").await, 0);

    // Header limits: 431 as a problem document, metered (ids checked against events below).
    let many: String = (0..60).map(|i| format!("x-h{i}: v\r\n")).collect();
    let (status, too_many, _) =
        raw(addr, format!("GET /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n{many}\r\n").as_bytes()).await;
    assert_eq!(status, Some(431), "too many headers");
    let big = "a".repeat(10_000);
    let (status, too_big, _) =
        raw(addr, format!("GET /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nx-big: {big}\r\n\r\n").as_bytes())
            .await;
    assert_eq!(status, Some(431), "header too large");
    let mut refused_431 = Vec::new();
    for answer in [&too_many, &too_big] {
        assert!(answer.contains("application/problem+json"), "{answer}");
        refused_431.push(answer.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap().trim().to_owned());
    }
    // Far beyond the limit, hyper's parser refuses the head itself (no event for that one).
    let huge = "a".repeat(40_000);
    let (status, _, _) =
        raw(addr, format!("GET /echo/a HTTP/1.1\r\nHost: x\r\nx-big: {huge}\r\n\r\n").as_bytes()).await;
    assert_eq!(status, Some(431), "head beyond the parser's limit");

    // Body limit: 413, declared or streamed; nothing reaches the upstream.
    let before = echo.requests.load(Ordering::SeqCst);
    let body = "b".repeat(2000);
    let (status, answer, _) = raw(addr, format!("POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{body}").as_bytes()).await;
    assert_eq!(status, Some(413), "{answer}");
    assert!(answer.contains("application/problem+json"));
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let (status, answer, _) = raw(addr, format!("POST /echo/a HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked}").as_bytes()).await;
    assert_eq!(status, Some(413), "{answer}");
    let _ = before;

    // Hop-by-hop and Connection-named headers never reach the upstream; a spoofed
    // X-Forwarded-For changes neither the forwarded chain nor the metered client IP.
    let req = format!(
        "GET /echo/h HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nConnection: close, x-secret-hop\r\nx-secret-hop: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: h2c\r\n\
         X-Forwarded-For: 6.6.6.6\r\nx-kept: yes\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
         X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-HTTP-Method-Override: DELETE\r\n\
         X-Consumer_Id: admin\r\nX_Forwarded_For: 6.6.6.6\r\nx_kept: yes\r\n\r\n"
    );
    let (status, answer, _) = raw(addr, req.as_bytes()).await;
    assert_eq!(status, Some(200), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let echoed: serde_json::Value = serde_json::from_str(body).unwrap();
    let h = echoed["headers"].as_object().unwrap();
    // Nor do a client's claims of another address or path (the route has no `methods`: a
    // method override may pass).
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "upgrade",
        "x-api-key",
        "forwarded",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        // Underscore twins of the edge's own headers (one header to CGI/WSGI/Rack apps).
        "x-consumer_id",
        "x_forwarded_for",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!((h["x_kept"].as_str(), h["x-consumer-id"].as_str()), (Some("yes"), Some("acme")));
    assert_eq!((h["x-kept"].as_str(), h["x-http-method-override"].as_str()), (Some("yes"), Some("DELETE")));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!((h["x-forwarded-host"].as_str(), h["x-forwarded-proto"].as_str()), (Some("x"), Some("http")));
    let request_id = answer.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap().trim().to_owned();

    // An upgrade to h2c (Java's HttpClient and `curl --http2` offer it on http://) is served as
    // HTTP/1.1 and never offered to the upstream: one that speaks h2c would switch, and the
    // client would send requests the edge never sees through the tunnel ("h2c smuggling").
    // The echo upstream answers any upgrade it gets with 400.
    let h2c = format!(
        "GET /echo/h2c HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n\
         GET /echo/after HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n"
    );
    let (status, answer, _) = raw(addr, h2c.as_bytes()).await;
    assert_eq!(status, Some(200), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    for gone in ["upgrade", "http2-settings"] {
        assert!(!answer.to_ascii_lowercase().contains(&format!("\"{gone}\"")), "{gone} reached the upstream: {answer}");
    }
    assert!(answer.contains("/echo/after"), "{answer}");

    let events = read_events(&topic, |e| e.iter().any(|e| e.event_id.to_string() == request_id)).await;
    let event = events.iter().find(|e| e.event_id.to_string() == request_id).unwrap();
    assert_eq!(event.client_ip, "127.0.0.1");
    for id in &refused_431 {
        let e =
            events.iter().find(|e| e.event_id.to_string() == *id).unwrap_or_else(|| panic!("no event for 431 {id}"));
        assert_eq!((e.status, e.outcome), (431, tollgate_schemas::Outcome::BadRequest));
    }
    assert_eq!(metric(admin, "tollgate_edge_events_dropped_total").await, 0);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// An HTTP/2 connection (h2c) to the edge: the sender and a flag that turns true once the
/// edge has closed the connection.
async fn h2c(
    addr: std::net::SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>, Arc<std::sync::atomic::AtomicBool>)
{
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    tokio::spawn(async move {
        let _ = conn.await;
        flag.store(true, Ordering::SeqCst);
    });
    (sender, closed)
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    addr: std::net::SocketAddr,
    path: &str,
) -> u16 {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-api-key", KEY)
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
    status
}

/// Waits until `closed` turns true (at most 5 s): how long that took.
async fn until_closed(closed: &std::sync::atomic::AtomicBool, what: &str) -> Duration {
    let t = Instant::now();
    while !closed.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: still open after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_gracefully_after_idle_timeout() {
    let dir = TempDir::new("e2e_idle");
    let topic = unique("idle");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    // The header timeout (10 s) is far above the idle timeout: what closes these connections
    // is `idle_timeout_ms`.
    let cfg = config(&topic, upstream)
        .replace("header_read_timeout_ms = 500", "header_read_timeout_ms = 10000\nidle_timeout_ms = 1000");
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let idle = || metric(admin, "tollgate_edge_connections_timed_out_total{reason=\"idle\"}");

    // An HTTP/2 connection used every 250 ms for 2.5 s stays open: each request restarts the
    // idle time.
    let (mut busy, busy_closed) = h2c(addr).await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        assert_eq!(h2_get(&mut busy, addr, "/echo/busy").await, 200);
        assert!(!busy_closed.load(Ordering::SeqCst), "closed while in use after {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(idle().await, 0);
    // Left alone, it is closed 1 to 1.25 s after its last request.
    let waited = until_closed(&busy_closed, "idle HTTP/2 connection").await;
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(idle().await, 1);

    // Closed gracefully: a request still waiting for its upstream (2.5 s) when the connection's
    // idle time runs out is answered before the connection closes.
    let (mut slow, slow_closed) = h2c(addr).await;
    let t = Instant::now();
    assert_eq!(h2_get(&mut slow, addr, "/echo/slow?delay_ms=2500").await, 200);
    assert!(t.elapsed() >= Duration::from_millis(2500));
    until_closed(&slow_closed, "HTTP/2 connection after its slow request").await;
    assert_eq!(idle().await, 2);
    // The edge said GOAWAY, so no new stream is accepted on it.
    assert!(
        slow.send_request(http::Request::get(format!("http://{addr}/echo/x")).body(Default::default()).unwrap())
            .await
            .is_err()
    );

    // HTTP/1.1 keep-alive connections too, when the header timeout is the longer one.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /echo/h1 HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n").as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let waited = closed_after(&mut s, "idle HTTP/1.1 connection").await;
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(idle().await, 3);
    assert_eq!(metric(admin, "tollgate_edge_connections_open").await, 0);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// HTTP/2 keep-alive (`edge.http2_keepalive_interval_ms`, `_timeout_ms`): a client that
/// answers the edge's PINGs (hyper's) keeps its connection through a request longer than
/// both; a client that has a request waiting upstream but has stopped answering (a peer gone
/// without a FIN) gets a PING after the interval and is disconnected once the timeout has
/// passed without its answer, long before its upstream would have answered. And an HTTP/2
/// head over `max_header_bytes` reaches the edge's own (metered) 431, as over HTTP/1.1,
/// instead of being refused by the HTTP/2 layer's smaller default limit.
#[tokio::test(flavor = "multi_thread")]
async fn http2_clients_that_stop_answering_pings_are_disconnected() {
    let dir = TempDir::new("e2e_h2ping");
    let topic = unique("h2ping");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    let cfg = config(&topic, upstream).replace(
        "header_read_timeout_ms = 500",
        "header_read_timeout_ms = 10000\nhttp2_keepalive_interval_ms = 500\nhttp2_keepalive_timeout_ms = 500",
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;

    let (mut alive, alive_closed) = h2c(addr).await;
    assert_eq!(h2_get(&mut alive, addr, "/echo/slow?delay_ms=3000").await, 200);
    assert!(!alive_closed.load(Ordering::SeqCst), "a client answering PINGs was disconnected");

    // 20 KiB of one header: over max_header_bytes (8192) and over the HTTP/2 layer's default limit
    // (16 KiB), under the backstop the edge sets (4x max_header_bytes).
    let req = http::Request::get(format!("http://{addr}/echo/big"))
        .header("x-api-key", KEY)
        .header("x-big", "b".repeat(20 * 1024))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = alive.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    drop(resp);

    // The silent client: the preface, empty SETTINGS, then GET /echo/slow (10 s upstream) as
    // one HEADERS frame (HPACK: indexed :method GET and :scheme http, literal :path,
    // :authority and x-api-key), then it only reads.
    let mut block = vec![0x82, 0x86];
    let literal = |block: &mut Vec<u8>, index: u8, value: &str| {
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    };
    literal(&mut block, 0x04, "/echo/slow?delay_ms=10000");
    literal(&mut block, 0x01, &addr.to_string());
    block.extend_from_slice(&[0x00, 9]);
    block.extend_from_slice(b"x-api-key");
    block.push(KEY.len() as u8);
    block.extend_from_slice(KEY.as_bytes());
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    // END_STREAM | END_HEADERS on stream 1.
    hello.extend(frame(0x1, 0x5, 1, &block));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let t = Instant::now();
    let (mut got, mut buf, mut ping_at) = (Vec::new(), [0u8; 4096], None);
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // Frames so far: note when the first PING (type 6, not an ACK) came.
            let mut at = 0;
            while got.len() >= at + 9 {
                let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                if got[at + 3] == 0x6 && got[at + 4] & 0x1 == 0 && ping_at.is_none() {
                    ping_at = Some(t.elapsed());
                }
                at += 9 + len;
            }
        }
    })
    .await;
    let closed_at = t.elapsed();
    assert!(ended.is_ok(), "a client not answering PINGs still connected after 8 s");
    let ping_at = ping_at.expect("no PING from the edge");
    assert!(ping_at >= Duration::from_millis(400) && ping_at < Duration::from_millis(2500), "PING after {ping_at:?}");
    assert!(
        closed_at >= ping_at + Duration::from_millis(400) && closed_at < Duration::from_secs(5),
        "PING at {ping_at:?}, closed at {closed_at:?}"
    );
    // The answering client is still fine, and once it goes nothing is left open (the silent
    // client's socket is still open on its side: the edge let go of it).
    assert_eq!(h2_get(&mut alive, addr, "/echo/again").await, 200);
    drop(alive);
    let none_open =
        wait_until(Duration::from_secs(5), || async { metric(admin, "tollgate_edge_connections_open").await == 0 })
            .await;
    assert!(none_open, "connections left open");
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// A request body that sends 10 bytes, then nothing more (and never wakes its task).
struct Stalls(bool);

impl hyper::body::Body for Stalls {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"0123456789")))))
    }
}

/// A request body that stops coming (`edge.body_read_timeout_ms`), or is still coming when the
/// route's `timeout_ms` runs out, is the client's fault: 408 problem (the HTTP/1 connection
/// closed after it), metered as `bad_request`, and no failure of the upstream target — with
/// `max_fails = 1` a single misattributed failure would eject it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_get_408_and_are_not_blamed_on_the_upstream() {
    let dir = TempDir::new("e2e_edge_slow_body");
    let topic = unique("edge_slow_body");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"up\"\npath_prefix = \"/up\"\nupstream = \"http://{upstream}\"\ntimeout_ms = 1500\nmax_fails = 1\n{}",
        edge_head("edge-slow-body", &topic).replacen("[edge]\n", "[edge]\nbody_read_timeout_ms = 500\n", 1),
        acme_with_key(1000),
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nContent-Length: 100\r\n\r\n").into_bytes()
    };

    // 10 of 100 bytes, then nothing: 408 after the body timeout, and the connection closes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&head("/up/stalled")).await.unwrap();
    s.write_all(&[b'x'; 10]).await.unwrap();
    let t = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(read.is_ok(), "the connection stayed open: {answer}");
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("no request body bytes came for 500 ms"), "{answer}");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_millis(1400), "{waited:?}");

    // A byte every 300 ms: never idle for 500 ms, but not complete when the route's 1.5 s end.
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(&head("/up/trickle")).await.unwrap();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            if wr.write_all(b"y").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut answer)).await.unwrap().unwrap();
    writer.abort();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("not complete within 1500 ms"), "{answer}");
    assert!(t.elapsed() >= Duration::from_millis(1400), "{:?}", t.elapsed());

    // HTTP/2 (h2c): a stream whose body stalls gets the same 408 (no `Connection` header there).
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (mut h2, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/up/h2-stalled"))
        .header("x-api-key", KEY)
        .header("content-length", "100")
        .body(Stalls(false))
        .unwrap();
    let t = Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 408);
    assert!(resp.headers().get("connection").is_none(), "{:?}", resp.headers());
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_millis(1400), "{waited:?}");

    // The upstream was not blamed: not ejected, and it serves the next call.
    assert_eq!(metric(admin, "tollgate_edge_upstream_ejections_total").await, 0, "{}", edge.log_tail());
    let (status, _, _) = raw(
        addr,
        format!("GET /up/ok HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, Some(200));

    // Metered as the client's: 408, bad_request, with the bytes that came.
    let events = read_events(&topic, |e| e.iter().any(|e| e.path == "/up/ok")).await;
    for (path, min_bytes) in [("/up/stalled", 10), ("/up/trickle", 4), ("/up/h2-stalled", 10)] {
        let e = events.iter().find(|e| e.path == path).unwrap();
        assert_eq!((e.status, e.outcome), (408, tollgate_schemas::Outcome::BadRequest), "{path}");
        assert!(e.request_bytes >= min_bytes && e.request_bytes < 100, "{path}: {}", e.request_bytes);
    }
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// `routes[].max_body_bytes` overrides `edge.max_body_bytes` for its route, by `Content-Length`
/// up front and while a chunked body streams; other routes keep the edge's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_set_its_own_body_limit() {
    let dir = TempDir::new("e2e_edge_route_body_limit");
    let topic = unique("edge_route_body_limit");
    create_topic(&topic, 1).await;
    let (upstream, echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"small\"\npath_prefix = \"/small\"\nupstream = \"http://{upstream}\"\nmax_body_bytes = 10\n\
         [[routes]]\nid = \"up\"\npath_prefix = \"/up\"\nupstream = \"http://{upstream}\"\n{}",
        edge_head("edge-route-body-limit", &topic).replacen("[edge]\n", "[edge]\nmax_body_bytes = 100\n", 1),
        acme_with_key(1000),
    );
    let (mut edge, addr, _) = start_edge(dir.path(), "edge", &cfg).await;
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let chunked = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    let forwarded = || echo.requests.load(Ordering::SeqCst);
    let before = forwarded();
    assert_eq!(raw(addr, post("/small/a", &"x".repeat(10)).as_bytes()).await.0, Some(200));
    let (status, answer, _) = raw(addr, post("/small/b", &"x".repeat(11)).as_bytes()).await;
    assert_eq!(status, Some(413), "{answer}");
    assert!(answer.contains("larger than 10 bytes"), "{answer}");
    assert_eq!(raw(addr, chunked("/small/c", &"x".repeat(20)).as_bytes()).await.0, Some(413));
    // By `Content-Length` up front: answered without waiting for the body (none is sent).
    let head_only = format!("POST /small/h HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nContent-Length: 11\r\n\r\n");
    assert_eq!(raw(addr, head_only.as_bytes()).await.0, Some(413));
    // The other route: the edge's 100 bytes.
    assert_eq!(raw(addr, post("/up/d", &"x".repeat(50)).as_bytes()).await.0, Some(200));
    let (status, answer, _) = raw(addr, post("/up/e", &"x".repeat(101)).as_bytes()).await;
    assert_eq!(status, Some(413), "{answer}");
    assert!(answer.contains("larger than 100 bytes"), "{answer}");
    // The refused bodies declared by Content-Length never went upstream.
    assert!(forwarded() - before <= 3, "{} requests reached the upstream", forwarded() - before);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// The other way round: an upstream that stops reading a large request body (the client has
/// sent it all) is the upstream's timeout, 504, counted against the target — not a 408; and the
/// abandoned upstream connection is closed, not left waiting with the client's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_body_is_the_upstreams_timeout() {
    let dir = TempDir::new("e2e_edge_stuck_upstream");
    let topic = unique("edge_stuck_upstream");
    create_topic(&topic, 1).await;
    // Accepts connections and never reads from them.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = stuck.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = stuck.accept().await {
            held.push(s);
        }
    });
    let cfg = format!(
        "{}[[routes]]\nid = \"up\"\npath_prefix = \"/up\"\nupstream = \"http://{upstream}\"\ntimeout_ms = 1500\nmax_fails = 1\n\
         max_body_bytes = 100000000\n{}",
        edge_head("edge-stuck-upstream", &topic).replacen("[edge]\n", "[edge]\nbody_read_timeout_ms = 500\n", 1),
        acme_with_key(1000),
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    // 48 MB: more than the socket buffers between the edge and the upstream hold, so the edge
    // stops reading the client's body because the upstream does not take it.
    let size = 48_000_000usize;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST /up/big HTTP/1.1\r\nHost: edge\r\nx-api-key: {KEY}\r\nContent-Length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; 1 << 16];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            if wr.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            left -= n;
        }
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut answer)).await.unwrap().unwrap();
    writer.abort();
    let _ = writer.await;
    drop(rd);
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}\n{}", edge.log_tail());
    assert_eq!(metric(admin, "tollgate_edge_upstream_ejections_total").await, 1);
    // The abandoned upstream connection is closed with its request: it does not go on waiting
    // on the stuck upstream with the client's body, so the client's connection ends too.
    let closed =
        wait_until(Duration::from_secs(3), || async { metric(admin, "tollgate_edge_connections_open").await == 0 })
            .await;
    assert!(closed, "the client's connection is still open\n{}", edge.log_tail());
    let t = Instant::now();
    assert!(edge.terminate(Duration::from_secs(15)));
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown waited for a connection: {:?}", t.elapsed());
}

/// `edge.max_connections`: with that many connections open the edge stops accepting; a new
/// connection waits in the listen backlog (not refused, not reset) and is served as soon as an
/// open one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_a_new_connection_waits_until_one_closes() {
    let dir = TempDir::new("e2e_edge_max_conns");
    let topic = unique("edge_max_conns");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"up\"\npath_prefix = \"/up\"\nupstream = \"http://{upstream}\"\nauth = \"none\"\n",
        edge_head("edge-max-conns", &topic).replacen("[edge]\n", "[edge]\nmax_connections = 2\n", 1),
    );
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    assert_eq!(metric(admin, "tollgate_edge_connection_limit").await, 2);
    let get = b"GET /up/x HTTP/1.1\r\nHost: edge\r\n\r\n";
    let first_bytes = |mut s: TcpStream| async move {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.unwrap().unwrap();
        (s, String::from_utf8_lossy(&buf[..n]).into_owned())
    };

    // A keep-alive connection, served once and left open.
    let keep_alive = || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(get).await.unwrap();
        let (s, answer) = first_bytes(s).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        s
    };
    let mut open = vec![keep_alive().await, keep_alive().await];
    // Several rounds: each worker has its own listener, so a waiting connection is in one
    // worker's hands, and the slot that frees must reach that worker.
    for round in 0..4 {
        // Another connection: connected, its request not read while two are open.
        let mut waiting = TcpStream::connect(addr).await.unwrap();
        waiting.write_all(b"GET /up/waiting HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf)).await;
        assert!(early.is_err(), "round {round}: served beyond max_connections: {early:?}");
        assert_eq!(metric(admin, "tollgate_edge_connections_open").await, 2);
        if round == 0 {
            assert!(metric(admin, "tollgate_edge_connection_limit_waits_total").await >= 1, "{}", edge.log_tail());
            assert!(edge.log_tail().contains("edge.max_connections connections are open"), "{}", edge.log_tail());
        }
        // One closes: the waiting one is served (and closes after its answer); another
        // keep-alive connection takes the free slot.
        let t = Instant::now();
        drop(open.remove(0));
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), waiting.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "round {round}: not served after a connection closed:\n{}", edge.log_tail());
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 ") && answer.contains("/up/waiting"), "{answer}");
        assert!(t.elapsed() < Duration::from_secs(2), "round {round}: {:?}", t.elapsed());
        open.push(keep_alive().await);
    }
}

/// Paths are normalized before routing (dot segments, merged slashes, decoded unreserved
/// characters) and forwarded as routed, so no path reaches a protected route's upstream
/// through a public route; encoded slashes are refused unless the route allows them; HTTP/1.1
/// requests need exactly one valid `Host`, and an absolute-form target's host wins over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_routing_and_forwarded_as_routed() {
    let dir = TempDir::new("e2e_paths");
    let topic = unique("paths");
    create_topic(&topic, 1).await;
    let (upstream, echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"public\"\npath_prefix = \"/status\"\nauth = \"none\"\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"api\"\npath_prefix = \"/api\"\nauth = \"none\"\nmethods = [\"GET\"]\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"admin\"\npath = \"/api/admin\"\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"repos\"\npath_prefix = \"/repos\"\nauth = \"none\"\nallow_encoded_slashes = true\n\
         upstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"internal\"\nhost = \"internal.example\"\npath_prefix = \"/status\"\nupstream = \"http://{upstream}\"\n",
        config(&topic, upstream)
    );
    let (_edge, addr, _admin) = start_edge(dir.path(), "edge", &cfg).await;
    let get = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: public.example\r\n{extra}Connection: close\r\n\r\n").into_bytes()
    };
    let key = format!("x-api-key: {KEY}\r\n");
    let before = echo.requests.load(Ordering::SeqCst);

    // Dot segments, encoded dots and doubled slashes meet the route the upstream would serve:
    // the protected one, which wants a key. So do servlet-style path parameters (`..;` is `..`
    // to Tomcat).
    for target in [
        "/status/../echo/x",
        "/status/%2e%2e/echo/x",
        "/status/./%2E./echo/x",
        "/api//admin",
        "/api/./admin",
        "/status/..;/echo/x",
        "/api;v=1/admin",
    ] {
        let (status, answer, _) = raw(addr, &get(target, "")).await;
        assert_eq!(status, Some(401), "{target}: {answer}");
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), before, "a refused path reached the upstream");
    // Forwarded as routed: the upstream sees the normalized path, the query as it came.
    let cases = [
        ("/%65cho/x", key.as_str(), "/echo/x", ""),
        ("/status/./a//b/?q=/../x&r=%2e", "", "/status/a/b/", "q=/../x&r=%2e"),
        ("/status/a/%7euser/..", "", "/status/a/", ""),
        ("/repos/group%2fproject/files", "", "/repos/group%2Fproject/files", ""),
    ];
    for (target, extra, path, query) in cases {
        let (status, answer, _) = raw(addr, &get(target, extra)).await;
        assert_eq!(status, Some(200), "{target}: {answer}");
        let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!((body["path"].as_str(), body["query"].as_str()), (Some(path), Some(query)), "{target}");
    }
    // A route that restricts methods: a method override does not reach its upstream.
    let (status, answer, _) =
        raw(addr, &get("/api/items", "X-HTTP-Method-Override: DELETE\r\nX-Method-Override: DELETE\r\n")).await;
    assert_eq!(status, Some(200), "{answer}");
    let body: serde_json::Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let headers = body["headers"].as_object().unwrap();
    assert!(
        !headers.contains_key("x-http-method-override") && !headers.contains_key("x-method-override"),
        "{headers:?}"
    );
    // Refused with a 400 naming the problem: an encoded slash where the route does not allow
    // it, a malformed percent-encoding, a raw backslash.
    let refused = [
        ("/status/..%2fecho/x", "allow_encoded_slashes"),
        ("/status/a%5Cb", "allow_encoded_slashes"),
        ("/status/%zz", "percent-encoding"),
        ("/status/..\\echo/x", "backslash"),
    ];
    for (target, says) in refused {
        let (status, answer, _) = raw(addr, &get(target, "")).await;
        assert_eq!(status, Some(400), "{target}: {answer}");
        assert!(answer.contains("application/problem+json") && answer.contains(says), "{target}: {answer}");
    }
    // Host: none or two in HTTP/1.1 is a 400; HTTP/1.0 may go without; an absolute-form
    // target's host is the one routed by (here the internal route, which wants a key).
    let no_host = raw(addr, b"GET /status/x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(no_host.0, Some(400), "{}", no_host.1);
    assert!(no_host.1.contains("needs a Host"), "{}", no_host.1);
    let two =
        raw(addr, b"GET /status/x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(two.0, Some(400), "{}", two.1);
    let user_info =
        raw(addr, b"GET /status/x HTTP/1.1\r\nHost: evil@internal.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(user_info.0, Some(400), "{}", user_info.1);
    assert_eq!(raw(addr, b"GET /status/x HTTP/1.0\r\n\r\n").await.0, Some(200));
    let absolute = raw(
        addr,
        b"GET http://internal.example/status/x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(absolute.0, Some(401), "{}", absolute.1);
    let user_info = raw(
        addr,
        b"GET http://evil@internal.example/status/x HTTP/1.1\r\nHost: internal.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(user_info.0, Some(400), "{}", user_info.1);
    // A fully qualified name's trailing dot does not pass the host's route over.
    let fqdn = raw(addr, b"GET /status/x HTTP/1.1\r\nHost: Internal.Example.:80\r\nConnection: close\r\n\r\n").await;
    assert_eq!(fqdn.0, Some(401), "{}", fqdn.1);

    // Metered as routed: the events carry the normalized paths.
    let events = read_events(&topic, |e| e.iter().any(|e| e.path == "/status/a/b/")).await;
    let echoed = events.iter().find(|e| e.path == "/echo/x" && e.status == 200).expect("the /%65cho/x call's event");
    assert_eq!(echoed.route_id.as_deref(), Some("echo"));
    assert!(events.iter().all(|e| !e.path.contains("/../") && !e.path.contains("//")), "{events:#?}");
}
