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
