//! The PROXY protocol (`edge.proxy_protocol`): behind a TCP load balancer, the client the
//! balancer's header names is the peer that is forwarded, allow-listed and metered; a
//! connection without a valid header is closed before anything reaches an upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::*;

fn config(topic: &str, upstream: std::net::SocketAddr) -> String {
    let head = edge_head("edge-proxy-protocol", topic)
        .replace("[kafka]", "proxy_protocol = true\nheader_read_timeout_ms = 30000\n[kafka]");
    format!(
        r#"{head}
[[routes]]
id = "only-doc-net"
path_prefix = "/only"
upstream = "http://{upstream}"
allowed_ips = ["203.0.113.0/24"]
[[routes]]
id = "echo"
path_prefix = "/echo"
upstream = "http://{upstream}"
{acme}"#,
        acme = acme_with_key(1000),
    )
}

/// A version 2 header: PROXY (`command` 1) or LOCAL (0), TCP over IPv4 (0x11) or IPv6 (0x21).
fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut b = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    b.extend_from_slice(&[0x20 | command, family]);
    b.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
    b.extend_from_slice(addresses);
    b
}

/// Sends `header`, then each of `requests` (keep-alive, the last with `Connection: close`) on
/// one connection: everything that came back (empty when the edge closed it at once).
async fn through(addr: std::net::SocketAddr, header: &[u8], paths: &[&str]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = header.to_vec();
    for (i, path) in paths.iter().enumerate() {
        let close = if i + 1 == paths.len() { "Connection: close\r\n" } else { "" };
        out.extend_from_slice(
            format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nx-api-key: key-acme\r\n{close}\r\n").as_bytes(),
        );
    }
    s.write_all(&out).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The `x-forwarded-for` values the echo upstream reported, in order.
fn forwarded_for(answer: &str) -> Vec<String> {
    answer
        .split("{\"body_bytes\"")
        .skip(1)
        .map(|json| {
            let json = format!("{{\"body_bytes\"{}", &json[..json.rfind('}').unwrap() + 1]);
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            v["headers"]["x-forwarded-for"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancers_client_is_the_peer_and_a_connection_without_a_header_is_closed() {
    let dir = TempDir::new("e2e_edge_proxy_protocol");
    let topic = unique("edge_proxy_protocol");
    create_topic(&topic, 1).await;
    let (upstream, stats) = start_echo().await;
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream)).await;
    // Headers believed from any peer: the edge warns that direct clients could forge them.
    let log = std::fs::read_to_string(dir.path().join("edge.log")).unwrap();
    assert!(log.contains("edge.proxy_protocol is on for every peer"), "{log}");

    // Version 1, two requests on the connection: both from the client it names.
    let answer = through(addr, b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n", &["/echo/a", "/echo/b"]).await;
    assert_eq!(forwarded_for(&answer), ["203.0.113.7", "203.0.113.7"], "{answer}");
    // Version 2 over IPv6, with a TLV after the addresses.
    let mut v6 = "2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec();
    v6.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v6.extend_from_slice(&[0x0f, 0xa0, 0x01, 0xbb, 0xea, 0x00, 0x03, b'v', b'p', b'c']);
    let answer = through(addr, &v2(1, 0x21, &v6), &["/echo/c"]).await;
    assert_eq!(forwarded_for(&answer), ["2001:db8::7"], "{answer}");
    // LOCAL (the balancer's own health check): the TCP peer.
    let answer = through(addr, &v2(0, 0x11, &[0; 12]), &["/echo/d"]).await;
    assert_eq!(forwarded_for(&answer), ["127.0.0.1"], "{answer}");

    // `allowed_ips` sees the named client: in the allowed network, or not.
    let answer = through(addr, b"PROXY TCP4 203.0.113.9 192.0.2.1 1000 443\r\n", &["/only/x"]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = through(addr, b"PROXY TCP4 198.51.100.9 192.0.2.1 1000 443\r\n", &["/only/x"]).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // No header, or a broken one: closed without an answer, nothing forwarded.
    let before = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(through(addr, b"", &["/echo/e"]).await, "");
    assert_eq!(through(addr, b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 443\r\n", &["/echo/f"]).await, "");
    assert_eq!(stats.requests.load(std::sync::atomic::Ordering::Relaxed), before);
    assert_eq!(metric(admin, "tollgate_edge_proxy_protocol_refused_total").await, 2);

    // The events carry the named clients.
    let events = read_events(&topic, |e| e.len() >= 6).await;
    let mut ips: Vec<&str> = events.iter().map(|e| e.client_ip.as_str()).collect();
    ips.sort_unstable();
    assert_eq!(ips, ["127.0.0.1", "198.51.100.9", "2001:db8::7", "203.0.113.7", "203.0.113.7", "203.0.113.9"]);

    // Headers believed only from the balancers named (a reload; new connections): from
    // another peer the header is still read, its address ignored.
    let path = dir.path().join("edge.toml");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg = cfg.replace("proxy_protocol = true\n", "proxy_protocol = true\nproxy_protocol_from = [\"192.0.2.0/24\"]\n");
    reload_edge(&edge, admin, &path, &cfg).await;
    let answer = through(addr, b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n", &["/echo/g"]).await;
    assert_eq!(forwarded_for(&answer), ["127.0.0.1"], "{answer}");
    assert_eq!(metric(admin, "tollgate_edge_proxy_protocol_untrusted_total").await, 1);
    cfg = cfg.replace("[\"192.0.2.0/24\"]", "[\"192.0.2.0/24\", \"127.0.0.0/8\"]");
    reload_edge(&edge, admin, &path, &cfg).await;
    let answer = through(addr, b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n", &["/echo/h"]).await;
    assert_eq!(forwarded_for(&answer), ["203.0.113.7"], "{answer}");

    // A connection still waiting for its header does not hold a shutdown up: with a 30 s
    // header_read_timeout and the 10 s shutdown grace, the edge is gone at once.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
    assert!(t.elapsed() < Duration::from_secs(5), "shutdown waited {:?} for a silent connection", t.elapsed());
}
