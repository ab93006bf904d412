//! HTTPS at the edge (`edge.tls_cert_file` / `edge.tls_key_file`): HTTP/1.1 and HTTP/2 (ALPN)
//! over TLS reach the upstream with `X-Forwarded-Proto: https`; plain HTTP on the port gets no
//! HTTP answer; a client that never finishes its handshake is disconnected after
//! `header_read_timeout_ms`; both are counted; a new certificate goes into service for new
//! connections when its files change (renewed in place) and on a reload (SIGHUP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_e2e::*;

fn tls_file(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/testdata/tls").join(name)
}

/// A TLS connection to `addr` as `localhost`, trusting only the certificates in `roots`,
/// offering `h2` or `http/1.1` by ALPN.
async fn tls_connect(
    addr: std::net::SocketAddr,
    roots: &str,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    tls_connect_as(addr, "localhost", roots, h2).await
}

/// [`tls_connect`] asking for `name` (SNI, and the name the certificate is checked against;
/// an IP address sends no SNI).
async fn tls_connect_as(
    addr: std::net::SocketAddr,
    name: &str,
    roots: &str,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tls_over(tcp, name, roots, h2).await
}

/// [`tls_connect_as`] on a connection already made (which may have sent something first).
async fn tls_over(
    tcp: tokio::net::TcpStream,
    name: &str,
    roots: &str,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut store = rustls::RootCertStore::empty();
    for cert in tollgate_common::tls::read_pem_certs(&std::fs::read(tls_file(roots)).unwrap()).unwrap() {
        store.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())
}

/// GET `path` over TLS to `addr` as `localhost`, trusting only the certificates in `roots`,
/// offering HTTP/2 (`h2`) or HTTP/1.1 by ALPN: status, HTTP version, body as JSON; `Err` when
/// the handshake or the request fails.
async fn https_get(
    addr: std::net::SocketAddr,
    roots: &str,
    h2: bool,
    path: &str,
) -> Result<(u16, http::Version, serde_json::Value), String> {
    let io = TokioIo::new(tls_connect(addr, roots, h2).await?);
    let req = http::Request::get(format!("https://localhost{path}"))
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let (status, version) = (resp.status().as_u16(), resp.version());
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, version, serde_json::from_slice(&body).unwrap_or_default()))
}

/// Asserts that the edge closes `s` (which sends nothing) after its 1 s
/// `header_read_timeout_ms`, give or take.
async fn assert_cut_after_1s<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) {
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 16])).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{what}: still open after {:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(5),
        "{what}: {:?}",
        t.elapsed()
    );
}

fn config(topic: &str, upstream: std::net::SocketAddr, cert: &std::path::Path, key: &std::path::Path) -> String {
    let head = edge_head("edge-https", topic).replacen(
        "[edge]\n",
        &format!(
            "[edge]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nheader_read_timeout_ms = 1000\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    format!(
        "{head}[[routes]]\nid = \"app\"\npath_prefix = \"/app\"\nupstream = \"http://{upstream}\"\n{}",
        acme_with_key(1000)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_at_the_edge_http1_h2_timeouts_and_certificate_rotation() {
    let dir = TempDir::new("e2e_edge_https");
    let topic = unique("edge_https");
    create_topic(&topic, 1).await;
    // The upstream answers with what the edge told it.
    let upstream = serve_http(|req: http::Request<hyper::body::Incoming>| async move {
        let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = serde_json::json!({ "proto": h("x-forwarded-proto"), "consumer": h("x-consumer-id") });
        http::Response::new(Full::new(Bytes::from(body.to_string())))
    })
    .await;
    // The certificate and key the edge reads are copies, renewed in place below.
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(tls_file("server.pem"), &cert).unwrap();
    std::fs::copy(tls_file("server.key.pem"), &key).unwrap();
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream, &cert, &key)).await;

    for (h2, version) in [(false, http::Version::HTTP_11), (true, http::Version::HTTP_2)] {
        let (status, v, body) = https_get(addr, "ca.pem", h2, "/app/x").await.unwrap();
        assert_eq!((status, v), (200, version), "{body}");
        assert_eq!(body, serde_json::json!({ "proto": "https", "consumer": "acme" }));
    }

    // Plain HTTP on the HTTPS port: no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\nx-api-key: key-acme\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(!got.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&got));

    // A client that opens a connection and never sends its handshake is cut after 1 s.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_cut_after_1s(&mut idle, "no handshake").await;
    assert_eq!(metric(admin, "tollgate_edge_tls_handshake_failures_total").await, 2);
    // A client that finishes its handshake and then sends nothing (HTTP/1.1 or HTTP/2, whose
    // preface never comes) is cut after 1 s too.
    for h2 in [false, true] {
        let mut silent = tls_connect(addr, "ca.pem", h2).await.unwrap();
        assert_cut_after_1s(&mut silent, if h2 { "silent after an h2 handshake" } else { "silent after a handshake" })
            .await;
    }
    // Both counted as connections that sent no request (the handshake failures are not).
    assert_eq!(metric(admin, "tollgate_edge_connections_timed_out_total{reason=\"first_bytes\"}").await, 2);

    // Renewed in place (no signal): new connections get the new certificate, and a client
    // trusting only the test CA refuses it.
    std::fs::copy(tls_file("other.key.pem"), &key).unwrap();
    std::fs::copy(tls_file("other.pem"), &cert).unwrap();
    let rotated =
        wait_until(Duration::from_secs(10), || async { https_get(addr, "other.pem", false, "/app/x").await.is_ok() })
            .await;
    assert!(rotated, "the renewed certificate is not served:\n{}", edge.log_tail());
    let (status, _, body) = https_get(addr, "other.pem", true, "/app/x").await.unwrap();
    assert_eq!((status, body["proto"].as_str()), (200, Some("https")));
    let refused = https_get(addr, "ca.pem", false, "/app/x").await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");

    // SIGHUP after the config names other files: the CA-signed certificate again.
    std::fs::write(
        dir.path().join("edge.toml"),
        format!(
            "{}\n[spool]\ndir = \"{}\"\n",
            config(&topic, upstream, &tls_file("server.pem"), &tls_file("server.key.pem")),
            dir.path().join("edge-spool").display()
        ),
    )
    .unwrap();
    edge.signal("HUP");
    let back =
        wait_until(Duration::from_secs(10), || async { https_get(addr, "ca.pem", true, "/app/x").await.is_ok() }).await;
    assert!(back, "the configured certificate is not served after SIGHUP:\n{}", edge.log_tail());
    assert!(https_get(addr, "other.pem", false, "/app/x").await.is_err());
}

/// Sends `request` on a new connection to `addr` and reads the answer until the server closes
/// the connection (the requests ask it to) or 5 s pass.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// `edge.http_redirect_listen`: every request on the plain port gets a 308 to the same host,
/// path and query on the HTTPS port (method kept), a request without a host a 400 problem;
/// nothing reaches the upstream from there, the redirects and the port's connections are
/// counted, and a slow client is cut after `header_read_timeout_ms` as on the traffic port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_http_port_redirects_to_https() {
    let dir = TempDir::new("e2e_edge_redirect");
    let topic = unique("edge_redirect");
    create_topic(&topic, 1).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let upstream = serve_http(move |_req: http::Request<hyper::body::Incoming>| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { http::Response::new(Full::new(Bytes::from_static(b"{}"))) }
    })
    .await;
    let config = config(&topic, upstream, &tls_file("server.pem"), &tls_file("server.key.pem")).replacen(
        "[edge]\n",
        "[edge]\nhttp_redirect_listen = \"127.0.0.1:0\"\n",
        1,
    );
    let (edge, addr, admin) = start_edge(dir.path(), "edge", &config).await;
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("edge.ready")).unwrap()).unwrap();
    let plain: std::net::SocketAddr = ready["http_redirect"].as_str().unwrap().parse().unwrap();
    assert_ne!(plain.port(), addr.port());

    // POST with a body: 308 (the method and body are kept by the client), the client's port
    // replaced by the HTTPS one, path and query as sent.
    let answer = raw(
        plain,
        "POST /app/x?a=1&b=%20 HTTP/1.1\r\nHost: api.example.com:8080\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"), "{answer}");
    let location = format!("location: https://api.example.com:{}/app/x?a=1&b=%20\r\n", addr.port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
    // An IPv6 literal host keeps its brackets.
    let answer = raw(plain, "GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n").await;
    assert!(answer.to_ascii_lowercase().contains(&format!("location: https://[::1]:{}/\r\n", addr.port())), "{answer}");
    // No host (HTTP/1.0), or one that is not a host: 400 problem, no Location.
    for request in [
        "GET /app/x HTTP/1.0\r\n\r\n",
        "GET /app/x HTTP/1.1\r\nHost: evil@api.example.com\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw(plain, request).await;
        assert!(answer.starts_with("HTTP/1.") && answer.contains(" 400 "), "{request:?}: {answer}");
        assert!(answer.contains("application/problem+json") && !answer.to_ascii_lowercase().contains("location:"));
    }
    assert_eq!(metric(admin, "tollgate_edge_https_redirects_total").await, 2);

    // A client that sends no request head is cut after 1 s.
    let mut idle = tokio::net::TcpStream::connect(plain).await.unwrap();
    assert_cut_after_1s(&mut idle, "no request on the redirect port").await;
    // Each connection closes after its answer, even when the client asks to keep it.
    let t = Instant::now();
    let answer = raw(
        plain,
        "GET /k HTTP/1.1
Host: api.example.com
Connection: keep-alive

",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 308") && answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "the connection stayed open: {:?}", t.elapsed());
    // HTTP/2 is not spoken there: a client's preface gets the connection closed at once, so no
    // h2c client can hold one (HTTP/2 has no header timer once its preface is in).
    let mut h2 = tokio::net::TcpStream::connect(plain).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), h2.read_to_end(&mut buf)).await;
    assert!(read.is_ok() && t.elapsed() < Duration::from_millis(900), "h2c held: {:?}", t.elapsed());
    assert!(!buf.starts_with(b"\x00"), "an HTTP/2 frame came back: {buf:?}");

    // Nothing went upstream from the plain port; the HTTPS port still serves.
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let (status, _, _) = https_get(addr, "ca.pem", false, "/app/x").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The port's connections are counted: seven, one of them (the silent one) timed out.
    assert_eq!(metric(admin, "tollgate_edge_redirect_connections_accepted_total").await, 7);
    assert_eq!(metric(admin, "tollgate_edge_redirect_connections_timed_out_total").await, 1, "{}", edge.log_tail());
    drop(edge);
}

/// `[[edge.tls_certificates]]`: the edge serves the certificate for the name the client asks
/// for (SNI) — exact, then one-label wildcard, else the default — and requests go through on
/// each. The names are resolved to 127.0.0.1 by the client itself (it connects to `addr` and
/// asks for the name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_for_the_name_asked() {
    let dir = TempDir::new("e2e_edge_sni");
    let topic = unique("edge_sni");
    create_topic(&topic, 1).await;
    let upstream = serve_http(|req: http::Request<hyper::body::Incoming>| async move {
        let host = req.headers().get("x-forwarded-host").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        http::Response::new(Full::new(Bytes::from(serde_json::json!({ "host": host }).to_string())))
    })
    .await;
    let mut cfg = config(&topic, upstream, &tls_file("server.pem"), &tls_file("server.key.pem"));
    for name in ["api", "wild"] {
        cfg.push_str(&format!(
            "[[edge.tls_certificates]]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            tls_file(&format!("{name}.pem")).display(),
            tls_file(&format!("{name}.key.pem")).display()
        ));
    }
    let (mut edge, addr, _admin) = start_edge(dir.path(), "edge", &cfg).await;
    let leaf =
        |file: &str| tollgate_common::tls::read_pem_certs(&std::fs::read(tls_file(file)).unwrap()).unwrap()[0].clone();
    for (asked, roots, served) in [
        ("api.example.test", "sni-ca.pem", "api.pem"),
        ("API.Example.TEST", "sni-ca.pem", "api.pem"),
        ("shop.eu.example.test", "sni-ca.pem", "wild.pem"),
        ("localhost", "ca.pem", "server.pem"),
        // No SNI (an IP address): the default certificate.
        ("127.0.0.1", "ca.pem", "server.pem"),
    ] {
        for h2 in [false, true] {
            let tls = tls_connect_as(addr, asked, roots, h2).await.unwrap_or_else(|e| panic!("{asked}: {e}"));
            let got = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            assert!(got == leaf(served), "{asked}: not the certificate of {served}");
            // And a request goes through on it.
            let io = TokioIo::new(tls);
            let req = http::Request::get(format!("https://{asked}/app/x"))
                .header("x-api-key", "key-acme")
                .header(http::header::HOST, asked)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = if h2 {
                let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
                tokio::spawn(conn);
                let mut req = req;
                req.headers_mut().remove(http::header::HOST);
                send.send_request(req).await.unwrap()
            } else {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                send.send_request(req).await.unwrap()
            };
            assert_eq!(resp.status(), 200, "{asked}");
            let body: serde_json::Value =
                serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["host"].as_str().map(str::to_ascii_lowercase), Some(asked.to_ascii_lowercase()));
        }
    }
    // A name no certificate covers (a wildcard covers one label only) gets the default one,
    // which the client then refuses for that name.
    for asked in ["other.example.test", "a.b.eu.example.test"] {
        let refused = tls_connect_as(addr, asked, "sni-ca.pem", false).await.unwrap_err();
        assert!(refused.to_lowercase().contains("certificate"), "{asked}: {refused}");
        let tls = tls_connect_as(addr, "localhost", "ca.pem", false).await.unwrap();
        assert!(tls.get_ref().1.peer_certificates().unwrap()[0] == leaf("server.pem"));
    }
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// `edge.proxy_protocol` with HTTPS: the balancer's header comes before the TLS handshake, and
/// the redirect port takes it too; a connection without one gets neither a handshake nor an
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_header_comes_before_tls() {
    let dir = TempDir::new("e2e_edge_https_proxy");
    let topic = unique("edge_https_proxy");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let config = config(&topic, upstream, &tls_file("server.pem"), &tls_file("server.key.pem")).replacen(
        "[edge]\n",
        "[edge]\nproxy_protocol = true\nhttp_redirect_listen = \"127.0.0.1:0\"\n",
        1,
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config).await;
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("edge.ready")).unwrap()).unwrap();
    let plain: std::net::SocketAddr = ready["http_redirect"].as_str().unwrap().parse().unwrap();

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n").await.unwrap();
    let mut tls = tls_over(tcp, "localhost", "ca.pem", false).await.unwrap();
    tls.write_all(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\nx-api-key: key-acme\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"x-forwarded-for\":\"203.0.113.7\""), "{answer}");
    assert!(answer.contains("\"x-forwarded-proto\":\"https\""), "{answer}");
    // Without the header the handshake fails (the edge closes the connection).
    assert!(tls_connect(addr, "ca.pem", false).await.is_err());

    let answer =
        raw(plain, "PROXY TCP4 203.0.113.7 192.0.2.1 56324 80\r\nGET /app HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
            .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    assert_eq!(raw(plain, "GET /app HTTP/1.1\r\nHost: api.example.com\r\n\r\n").await, "");
    assert_eq!(metric(admin, "tollgate_edge_proxy_protocol_refused_total").await, 2);
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
}
