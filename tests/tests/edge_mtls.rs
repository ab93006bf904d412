//! Mutual TLS at the edge (`edge.tls_client_ca_file`, consumers' `certificates`, routes'
//! `auth = "mtls"` or a list): a registered client certificate is a credential like an API key
//! (the consumer reaches the upstream as `x-consumer-id`, the call is metered with the
//! certificate's id); a missing, unregistered or untrusted one is refused; a certificate and a
//! header credential together are ambiguous where the route takes both, and the certificate is
//! not looked at where it does not; removing a certificate from the config revokes it at the
//! reload, also on a connection that is already open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use tollgate_e2e::*;

fn tls_file(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/testdata/tls").join(name)
}

/// A TLS connection to `addr` as `localhost` (trusting the test CA), presenting the client
/// certificate `client` (`client-<client>.pem` and its key) if given.
async fn connect(
    addr: std::net::SocketAddr,
    client: Option<&str>,
    h2: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut store = rustls::RootCertStore::empty();
    for cert in tollgate_common::tls::read_pem_certs(&std::fs::read(tls_file("ca.pem")).unwrap()).unwrap() {
        store.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let certs =
                tollgate_common::tls::read_pem_certs(&std::fs::read(tls_file(&format!("client-{name}.pem"))).unwrap())
                    .unwrap();
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(tls_file(&format!("client-{name}.key.pem"))).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())
}

/// One client connection (HTTP/1.1 or HTTP/2 over TLS) for several requests.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, client: Option<&str>, h2: bool) -> Result<Self, String> {
        let io = TokioIo::new(connect(addr, client, h2).await?);
        Ok(if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Conn::H1(send)
        })
    }

    /// GET `path` (with `x-api-key: key` if given): status, body as JSON, `WWW-Authenticate`.
    async fn get(&mut self, path: &str, key: Option<&str>) -> Result<(u16, serde_json::Value, String), String> {
        let mut req = http::Request::get(format!("https://localhost{path}"));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        // Each request waits until the connection is ready for it (after the previous
        // response, the connection's task must have seen that response's end).
        let resp = match self {
            Conn::H1(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                let req = req.header(http::header::HOST, "localhost").body(Full::new(Bytes::new())).unwrap();
                send.send_request(req).await
            }
            Conn::H2(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(req.body(Full::new(Bytes::new())).unwrap()).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let challenge =
            resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or_default(), challenge))
    }
}

fn config(topic: &str, upstream: std::net::SocketAddr, with_certificate: bool) -> String {
    // The entry as `tollgate-edge cert-fingerprint` prints it, checked against the SHA-256 of
    // the certificate's DER.
    let out = std::process::Command::new(bin("tollgate-edge"))
        .args(["cert-fingerprint", "--cert"])
        .arg(tls_file("client-acme.pem"))
        .args(["--cert-id", "acme-cert"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let fingerprint = printed.lines().next().unwrap().to_owned();
    let der = cert_fingerprint_hex(&tls_file("client-acme.pem"));
    assert_eq!(fingerprint, der);
    assert!(printed.contains(&format!("{{ id = \"acme-cert\", sha256 = \"{der}\" }}")), "{printed}");
    let head = edge_head("edge-mtls", topic).replacen(
        "[edge]\n",
        &format!(
            "[edge]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\n",
            tls_file("server.pem").display(),
            tls_file("server.key.pem").display(),
            tls_file("client-ca.pem").display(),
        ),
        1,
    );
    let certificates = if with_certificate {
        format!("certificates = [{{ id = \"acme-cert\", sha256 = \"{fingerprint}\" }}]\n")
    } else {
        String::new()
    };
    let route = |id: &str, auth: &str| {
        format!("[[routes]]\nid = \"{id}\"\npath_prefix = \"/{id}\"\nupstream = \"http://{upstream}\"\nauth = {auth}\n")
    };
    format!(
        "{head}{}{}{}{}{}",
        route("cert", "\"mtls\""),
        route("either", "[\"mtls\", \"api_key\"]"),
        route("key", "\"api_key\""),
        acme_with_key(1000),
        certificates
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_consumers_on_the_routes_that_take_them() {
    let dir = TempDir::new("e2e_edge_mtls");
    let topic = unique("edge_mtls");
    create_topic(&topic, 1).await;
    let upstream = serve_http(|req: http::Request<hyper::body::Incoming>| async move {
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = serde_json::json!({ "consumer": header("x-consumer-id"), "api_key": header("x-api-key") });
        http::Response::new(Full::new(Bytes::from(body.to_string())))
    })
    .await;
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream, true)).await;

    // The registered certificate, over HTTP/1.1 and HTTP/2: the consumer is acme.
    for h2 in [false, true] {
        let mut c = Conn::open(addr, Some("acme"), h2).await.unwrap();
        let (status, body, _) = c.get("/cert/a", None).await.unwrap();
        assert_eq!((status, body["consumer"].as_str()), (200, Some("acme")), "h2 {h2}: {body}");
        // Where the route takes a certificate or a key, the certificate alone is enough; both
        // together are two credentials.
        let (status, body, _) = c.get("/either/b", None).await.unwrap();
        assert_eq!((status, body["consumer"].as_str()), (200, Some("acme")), "{body}");
        let (status, body, challenge) = c.get("/either/c", Some("key-acme")).await.unwrap();
        assert_eq!(status, 401, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("more than one credential"), "{body}");
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        // Where it takes keys only, the certificate is no credential: the key decides, and
        // without one the call is refused.
        let (status, body, _) = c.get("/key/d", Some("key-acme")).await.unwrap();
        assert_eq!((status, body["consumer"].as_str(), body["api_key"].as_str()), (200, Some("acme"), Some("")));
        let (status, body, _) = c.get("/key/e", None).await.unwrap();
        assert_eq!(status, 401, "{body}");
    }

    // No certificate: refused on the certificate route, a key still works where it may.
    let mut none = Conn::open(addr, None, false).await.unwrap();
    let (status, body, challenge) = none.get("/cert/f", None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("client certificate"), "{body}");
    assert!(!challenge.is_empty(), "a 401 without WWW-Authenticate");
    assert_eq!(none.get("/cert/g", Some("key-acme")).await.unwrap().0, 401, "a key on a certificate-only route");
    assert_eq!(none.get("/either/h", Some("key-acme")).await.unwrap().0, 200);

    // A certificate the CA signed but no consumer registers: refused (not as a missing one).
    let mut other = Conn::open(addr, Some("other"), false).await.unwrap();
    let (status, body, _) = other.get("/cert/i", None).await.unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("not registered"), "{body}");

    // A certificate no configured CA signed: the handshake fails (with TLS 1.3 the client
    // learns it at its first read), counted as a failed handshake.
    let before = metric(admin, "tollgate_edge_tls_handshake_failures_total").await;
    let rogue = match Conn::open(addr, Some("rogue"), false).await {
        Err(e) => Err(e),
        Ok(mut c) => c.get("/cert/j", None).await.map(|(s, _, _)| s),
    };
    assert!(rogue.is_err(), "an untrusted client certificate got an answer: {rogue:?}");
    let counted = wait_until(Duration::from_secs(5), || async {
        metric(admin, "tollgate_edge_tls_handshake_failures_total").await == before + 1
    })
    .await;
    assert!(counted, "the refused handshake was not counted");

    // Metered with the certificate's id as the credential.
    let events = read_events(&topic, |e| e.iter().filter(|e| e.status == 200).count() >= 7).await;
    let credential = |path: &str| {
        events.iter().find(|e| e.path == path).map(|e| (e.status, e.credential_id.clone().unwrap_or_default()))
    };
    assert_eq!(credential("/cert/a"), Some((200, "acme-cert".to_owned())));
    assert_eq!(credential("/either/b"), Some((200, "acme-cert".to_owned())));
    assert_eq!(credential("/key/d"), Some((200, "acme-1".to_owned())));

    // Revoked: the certificate leaves the config; after the reload a connection opened before
    // it is refused at its next request.
    let mut kept = Conn::open(addr, Some("acme"), false).await.unwrap();
    assert_eq!(kept.get("/cert/k", None).await.unwrap().0, 200);
    std::fs::write(dir.path().join("edge.toml"), {
        let mut c = config(&topic, upstream, false);
        c.push_str(&format!("\n[spool]\ndir = \"{}\"\n", dir.path().join("edge-spool").display()));
        c
    })
    .unwrap();
    edge.signal("HUP");
    let t = std::time::Instant::now();
    loop {
        let (status, body, _) = kept.get("/cert/l", None).await.unwrap();
        if status == 401 {
            assert!(body["detail"].as_str().unwrap().contains("not registered"), "{body}");
            break;
        }
        assert_eq!(status, 200);
        assert!(t.elapsed() < Duration::from_secs(10), "the removed certificate still works:\n{}", edge.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(edge.terminate(Duration::from_secs(15)));
}
