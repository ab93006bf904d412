//! WebSocket upgrades through the real edge: the handshake is authenticated and forwarded,
//! the upgraded connection is spliced byte for byte, and the whole session is metered as one
//! call with its duration and bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::*;
use tollgate_schemas::Outcome;

fn config(topic: &str, upstream: std::net::SocketAddr) -> String {
    let head = edge_head("edge-ws", topic);
    format!(
        r#"{head}
[[routes]]
id = "ws"
path_prefix = "/ws"
upstream = "http://{upstream}"
{acme}"#,
        acme = acme_with_key(1000),
    )
}

/// Sends a WebSocket handshake; returns the stream and the response head.
async fn handshake(addr: std::net::SocketAddr, key_header: &str) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws/chat HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{key_header}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "connection closed during the handshake: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (s, String::from_utf8(head).unwrap().to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_spliced_and_metered_as_one_call() {
    let dir = TempDir::new("e2e_edge_ws");
    let topic = unique("edge_ws");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream)).await;

    // Without a credential the handshake is refused like any request.
    let (_, head) = handshake(addr, "").await;
    assert!(head.starts_with("http/1.1 401"), "{head}");

    let opened = Instant::now();
    let (mut s, head) = handshake(addr, "x-api-key: key-acme\r\n").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let request_id = head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap().trim().to_owned();
    assert_eq!(metric(admin, "tollgate_edge_tunnels_open").await, 1);

    // Bytes cross the tunnel unchanged, both ways.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(1000) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, payload);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let held = opened.elapsed();
    assert!(rest.is_empty());
    assert!(
        wait_until(Duration::from_secs(5), || async { metric(admin, "tollgate_edge_tunnels_open").await == 0 }).await
    );

    // A session still open at shutdown is closed by the edge, and its event still produced.
    let (mut open, head) = handshake(addr, "x-api-key: key-acme\r\n").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let open_id = head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap().trim().to_owned();
    open.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), open.read_exact(&mut pong)).await.unwrap().unwrap();
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the edge closed the tunnel at shutdown");

    // One event per session, emitted when it closed.
    let events = read_events(&topic, |e| e.len() >= 3).await;
    let at_shutdown = events.iter().find(|e| e.event_id.to_string() == open_id).expect("event of the open session");
    assert_eq!((at_shutdown.status, at_shutdown.request_bytes, at_shutdown.response_bytes), (101, 4, 4));
    let e = events.iter().find(|e| e.event_id.to_string() == request_id).expect("event of the WebSocket call");
    assert_eq!((e.status, e.outcome), (101, Outcome::Forwarded));
    assert_eq!(e.consumer_id.as_deref(), Some("acme"));
    assert_eq!(e.route_id.as_deref(), Some("ws"));
    assert_eq!((e.request_bytes, e.response_bytes), (3000, 3000));
    assert!(e.latency_us >= 300_000 && e.latency_us <= held.as_micros() as u64, "{} µs", e.latency_us);
    assert_eq!(events.iter().filter(|e| e.status == 401).count(), 1);
}

/// An upstream that answers every request with a 101 of its own making: on `/ws/bare` without
/// `Upgrade`, on `/ws/other` naming h2c, on anything else without being asked to switch. It
/// records every byte it receives, on every connection.
async fn switching_upstream() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                let mut answered = false;
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    head.extend_from_slice(&buf[..n]);
                    if answered || !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    answered = true;
                    let text = String::from_utf8_lossy(&head);
                    let upgrade = if text.starts_with("GET /ws/other ") { "Upgrade: h2c\r\n" } else { "" };
                    let answer = format!("HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n{upgrade}\r\n");
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_that_does_not_switch_as_asked_is_a_502_and_never_a_tunnel() {
    let dir = TempDir::new("e2e_edge_ws_101");
    let topic = unique("edge_ws_101");
    create_topic(&topic, 1).await;
    let (upstream, received) = switching_upstream().await;
    let (mut edge, addr, _admin) = start_edge(dir.path(), "edge", &config(&topic, upstream)).await;

    // A 101 naming no protocol, or another one than the client asked for: 502, and what the
    // client sends next on its connection is a new request to the edge (here one without a
    // route: 404), never bytes to the upstream.
    for path in ["/ws/bare", "/ws/other"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: edge.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nx-api-key: key-acme\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 502"), "{path}: {answer}");
        assert!(answer.contains("application/problem+json"), "{path}: {answer}");
        s.write_all(b"GET /internal/smuggled HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        let rest = String::from_utf8_lossy(&rest).to_ascii_lowercase();
        assert!(rest.is_empty() || rest.starts_with("http/1.1 404"), "{path}: {rest}");
    }
    // A 101 to a request that asked for no upgrade: 502 as well.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws/plain HTTP/1.1\r\nHost: edge.test\r\nx-api-key: key-acme\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 502"), "{answer}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert_eq!(seen.matches(" HTTP/1.1\r\n").count(), 3, "{seen}");
    assert!(!seen.contains("smuggled"), "{seen}");
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
}
