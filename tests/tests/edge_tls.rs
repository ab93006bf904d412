//! https upstreams and an https JWKS URL through the real edge: the edge verifies the
//! server's certificate against `edge.tls_ca_file` (a test CA) and refuses it without.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tollgate_e2e::*;

fn tls_file(name: &str) -> std::path::PathBuf {
    repo_root().join("tests/testdata/tls").join(name)
}

/// An HTTPS server with the test certificate: `/jwks.json` serves `jwks`, anything else
/// answers `{"tls": true, "path": ...}`.
async fn serve_jwks_https(jwks: serde_json::Value) -> u16 {
    let jwks = Arc::new(jwks.to_string());
    serve_https(move |req: http::Request<hyper::body::Incoming>| {
        let jwks = Arc::clone(&jwks);
        async move {
            let body = if req.uri().path() == "/jwks.json" {
                jwks.as_str().to_owned()
            } else {
                serde_json::json!({ "tls": true, "path": req.uri().path() }).to_string()
            };
            http::Response::new(Full::new(Bytes::from(body)))
        }
    })
    .await
    .port()
}

async fn get(addr: std::net::SocketAddr, path: &str, auth: (&str, &str)) -> (u16, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(auth.0, auth.1)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn config(topic: &str, port: u16, ca: Option<&std::path::Path>) -> String {
    let mut head = edge_head("edge-tls", topic);
    if let Some(ca) = ca {
        head = head.replacen("[edge]\n", &format!("[edge]\ntls_ca_file = \"{}\"\n", ca.display()), 1);
    }
    format!(
        r#"{head}
[[routes]]
id = "secure"
path_prefix = "/secure"
upstream = "https://127.0.0.1:{port}/base"
auth = "api_key_or_jwt"
{acme}
[[jwt.issuers]]
id = "tls"
issuer = "https://issuer.tls/"
audiences = ["tollgate"]
algorithms = ["ES256"]
default_plan = "big"
jwks_url = "https://localhost:{port}/jwks.json"
"#,
        acme = acme_with_key(1000),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_and_jwks_verified_against_the_configured_ca() {
    let dir = TempDir::new("e2e_edge_tls");
    let topic = unique("edge_tls");
    create_topic(&topic, 1).await;
    let es = std::fs::read(repo_root().join("edge/testdata/jwt/es256.key.pem")).unwrap();
    let key = EncodingKey::from_ec_pem(&es).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("tls-1".into());
    let port = serve_jwks_https(serde_json::json!({ "keys": [jwk] })).await;

    // The edge trusts the test CA (`edge.tls_ca_file`): traffic flows over TLS.
    let (mut edge, addr, _) = start_edge(dir.path(), "edge", &config(&topic, port, Some(&tls_file("ca.pem")))).await;
    let (status, body) = get(addr, "/secure/x", ("x-api-key", "key-acme")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tls"], true);
    assert_eq!(body["path"], "/base/secure/x");

    // A JWT whose key comes from the https JWKS.
    let now = jsonwebtoken::get_current_timestamp();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("tls-1".into());
    let claims =
        serde_json::json!({ "iss": "https://issuer.tls/", "aud": "tollgate", "sub": "newco", "exp": now + 600 });
    let token = jsonwebtoken::encode(&h, &claims, &key).unwrap();
    let ok = wait_until(Duration::from_secs(10), || async {
        get(addr, "/secure/jwt", ("authorization", &format!("Bearer {token}"))).await.0 == 200
    })
    .await;
    assert!(ok, "JWT with a key from the https JWKS\n{}", edge.log_tail());
    assert!(edge.terminate(Duration::from_secs(15)));

    // Without the CA the same upstream is refused: certificates are verified.
    let (mut untrusting, addr, _) = start_edge(dir.path(), "edge-untrusting", &config(&topic, port, None)).await;
    let (status, body) = get(addr, "/secure/x", ("x-api-key", "key-acme")).await;
    assert_eq!(status, 502, "{body}");
    assert!(untrusting.terminate(Duration::from_secs(15)));
}

/// An https upstream that requires a client certificate from `client-ca.pem` (mutual TLS): it
/// refuses handshakes without one, and answers with the SHA-256 fingerprint of the certificate
/// the edge presented.
async fn serve_mtls_upstream() -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls_file("client-ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(tls_file("server.pem")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(tls_file("server.key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let presented = tls.get_ref().1.peer_certificates().map(|c| {
                    use sha2::Digest;
                    hex::encode(sha2::Sha256::digest(&c[0]))
                });
                let svc = hyper::service::service_fn(move |_req| {
                    let body = serde_json::json!({ "client_cert": presented }).to_string();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

/// `edge.upstream_tls_cert_file` / `_key_file`: the edge presents its client certificate to
/// an upstream that requires one; without it the upstream refuses the handshake (502). A key
/// that is not the certificate's is refused at start, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_presents_its_client_certificate_to_upstreams_that_require_one() {
    let dir = TempDir::new("e2e_edge_upstream_mtls");
    let topic = unique("edge_upstream_mtls");
    create_topic(&topic, 1).await;
    let port = serve_mtls_upstream().await;
    let with_identity = |cert: &str, key: &str| {
        config(&topic, port, Some(&tls_file("ca.pem"))).replacen(
            "[edge]\n",
            &format!(
                "[edge]\nupstream_tls_cert_file = \"{}\"\nupstream_tls_key_file = \"{}\"\n",
                tls_file(cert).display(),
                tls_file(key).display()
            ),
            1,
        )
    };
    let (mut edge, addr, _) =
        start_edge(dir.path(), "edge", &with_identity("client-acme.pem", "client-acme.key.pem")).await;
    let (status, body) = get(addr, "/secure/x", ("x-api-key", "key-acme")).await;
    assert_eq!(status, 200, "{body}\n{}", edge.log_tail());
    let expected = cert_fingerprint_hex(&tls_file("client-acme.pem"));
    assert_eq!(body["client_cert"].as_str(), Some(expected.as_str()));
    assert!(edge.terminate(Duration::from_secs(15)));

    // Without a client certificate the upstream refuses the edge.
    let (mut bare, addr, _) =
        start_edge(dir.path(), "edge-bare", &config(&topic, port, Some(&tls_file("ca.pem")))).await;
    let (status, body) = get(addr, "/secure/x", ("x-api-key", "key-acme")).await;
    assert_eq!(status, 502, "{body}");
    assert!(bare.terminate(Duration::from_secs(15)));

    // A key that is not the certificate's: the config is refused, naming the key.
    let cfg = dir.path().join("mismatch.toml");
    std::fs::write(&cfg, with_identity("client-acme.pem", "client-other.key.pem")).unwrap();
    let out = std::process::Command::new(bin("tollgate-edge"))
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("edge.upstream_tls_key_file") && stderr.contains("is not the key"), "{stderr}");
}

/// Reloads apply new upstream TLS settings, also to connections already pooled: the upstream
/// client certificate rotated in place (its files rewritten, no signal) is presented from the
/// next request on, and with `edge.tls_ca_file` removed (SIGHUP) the upstream's certificate is
/// no longer trusted, even on the connection the edge already had open to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_new_upstream_tls_settings_to_pooled_connections_too() {
    let dir = TempDir::new("e2e_edge_upstream_tls_reload");
    let topic = unique("edge_upstream_tls_reload");
    create_topic(&topic, 1).await;
    let port = serve_mtls_upstream().await;
    let (cert, key) = (dir.path().join("upstream.pem"), dir.path().join("upstream.key.pem"));
    std::fs::copy(tls_file("client-acme.pem"), &cert).unwrap();
    std::fs::copy(tls_file("client-acme.key.pem"), &key).unwrap();
    let cfg = config(&topic, port, Some(&tls_file("ca.pem"))).replacen(
        "[edge]\n",
        &format!(
            "[edge]\nupstream_tls_cert_file = \"{}\"\nupstream_tls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;
    let presented = || async {
        let (status, body) = get(addr, "/secure/x", ("x-api-key", "key-acme")).await;
        (status, body["client_cert"].as_str().map(str::to_owned))
    };
    let acme = cert_fingerprint_hex(&tls_file("client-acme.pem"));
    let other = cert_fingerprint_hex(&tls_file("client-other.pem"));
    // Several requests, one after the other: one pooled connection, with acme's certificate.
    for _ in 0..3 {
        assert_eq!(presented().await, (200, Some(acme.clone())), "{}", edge.log_tail());
    }

    // The certificate rotated in place: the file watch reloads it.
    std::fs::copy(tls_file("client-other.key.pem"), &key).unwrap();
    std::fs::copy(tls_file("client-other.pem"), &cert).unwrap();
    let rotated = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reloads_total").await >= 1
    })
    .await;
    assert!(rotated, "no reload after the certificate files changed\n{}", edge.log_tail());
    // From the first request after the reload on: the new certificate, on a new connection.
    for _ in 0..3 {
        assert_eq!(presented().await, (200, Some(other.clone())), "{}", edge.log_tail());
    }

    // The CA file removed from the config: the upstream's certificate is no longer trusted,
    // also not on the connection the edge has pooled to it.
    let path = dir.path().join("edge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let without_ca: String = text.lines().filter(|l| !l.starts_with("tls_ca_file")).map(|l| format!("{l}\n")).collect();
    assert_ne!(text, without_ca);
    reload_edge(&edge, admin, &path, &without_ca).await;
    let (status, _) = presented().await;
    assert_eq!(status, 502, "{}", edge.log_tail());
    assert!(edge.terminate(Duration::from_secs(15)));
}
