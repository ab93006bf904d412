//! Address lists (`allowed_ips`) of consumers and routes, with the client address as
//! `edge.trusted_hops` says (one trusted proxy here, so `X-Forwarded-For`'s last entry): a
//! consumer's key works only from its blocks (IPv4 and IPv6), a key with a list of its own only
//! from that list too, a route answers only its blocks (before authentication), a spoofed `X-Forwarded-For` entry does not get a client in, and the
//! refusals are metered as `forbidden` with the consumer and the real address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;
use tollgate_schemas::Outcome;

/// GET `path` as a client at `xff` (the trusted proxy's `X-Forwarded-For`), with `key`.
async fn get(addr: std::net::SocketAddr, path: &str, xff: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::get(format!("http://{addr}{path}")).header("x-forwarded-for", xff);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_routes_are_called_only_from_their_address_blocks() {
    let dir = TempDir::new("e2e_edge_ips");
    let topic = unique("edge_ips");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"api\"\npath_prefix = \"/api\"\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"internal\"\npath_prefix = \"/internal\"\nupstream = \"http://{upstream}\"\n\
         allowed_ips = [\"10.0.0.0/8\"]\n\
         [plans.big]\nrate_per_second = 1000\n\
         [[consumers]]\nid = \"acme\"\nplan = \"big\"\nkeys = [{{ id = \"acme-1\", sha256 = \"{}\" }}, \
         {{ id = \"acme-2\", sha256 = \"{}\", allowed_ips = [\"203.0.113.128/25\", \"192.0.2.0/24\"] }}]\n\
         allowed_ips = [\"203.0.113.0/24\", \"2001:db8::/32\"]\n\
         [[consumers]]\nid = \"beta\"\nplan = \"big\"\nkeys = [{{ id = \"beta-1\", sha256 = \"{}\" }}, \
         {{ id = \"beta-ci\", sha256 = \"{}\", allowed_ips = [\"192.0.2.0/24\"] }}]\n",
        edge_head("edge-ips", &topic).replacen("[edge]\n", "[edge]\ntrusted_hops = 1\n", 1),
        sha256_hex("key-acme"),
        sha256_hex("key-acme-2"),
        sha256_hex("key-beta"),
        sha256_hex("key-beta-ci")
    );
    let (mut edge, addr, _) = start_edge(dir.path(), "edge", &cfg).await;

    // acme's key from its blocks, and not from elsewhere.
    assert_eq!(get(addr, "/api/a", "203.0.113.7", Some("key-acme")).await.0, 200);
    assert_eq!(get(addr, "/api/b", "2001:db8::5", Some("key-acme")).await.0, 200);
    let (status, body) = get(addr, "/api/c", "198.51.100.1", Some("key-acme")).await;
    assert_eq!(status, 403, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("this credential") && detail.contains("198.51.100.1"), "{detail}");
    // A client that writes an allowed address into X-Forwarded-For itself: the trusted proxy
    // appends the real one, which decides.
    assert_eq!(get(addr, "/api/d", "203.0.113.7, 198.51.100.1", Some("key-acme")).await.0, 403);
    // beta has no list.
    assert_eq!(get(addr, "/api/e", "198.51.100.1", Some("key-beta")).await.0, 200);

    // A key's own list: beta's CI key works only from the CI's block, beta's other key from
    // anywhere; acme's second key only from the part of acme's block its list names.
    assert_eq!(get(addr, "/api/k1", "192.0.2.9", Some("key-beta-ci")).await.0, 200);
    let (status, body) = get(addr, "/api/k2", "198.51.100.1", Some("key-beta-ci")).await;
    assert_eq!(status, 403, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("this credential") && detail.contains("198.51.100.1"), "{detail}");
    assert_eq!(get(addr, "/api/k3", "203.0.113.200", Some("key-acme-2")).await.0, 200);
    let (status, body) = get(addr, "/api/k4", "203.0.113.7", Some("key-acme-2")).await;
    assert_eq!((status, body["detail"].as_str().unwrap().contains("this credential")), (403, true), "{body}");
    // A key's list does not widen the consumer's: 192.0.2.0/24 is on acme-2's, not on acme's.
    let (status, body) = get(addr, "/api/k5", "192.0.2.9", Some("key-acme-2")).await;
    assert_eq!((status, body["detail"].as_str().unwrap().contains("this credential")), (403, true), "{body}");

    // The route's list comes first: outside it, 403 even without a credential.
    assert_eq!(get(addr, "/internal/f", "10.1.2.3", Some("key-beta")).await.0, 200);
    let (status, body) = get(addr, "/internal/g", "198.51.100.1", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("this route"), "{body}");
    // Both lists apply: acme is allowed on the route only from 10/8, which acme's list lacks.
    assert_eq!(get(addr, "/internal/h", "10.1.2.3", Some("key-acme")).await.0, 403);

    // Metered: acme's refusal with its consumer and the real address.
    let events = read_events(&topic, |e| e.iter().any(|e| e.path == "/internal/h")).await;
    let refused = events.iter().find(|e| e.path == "/api/c").unwrap();
    assert_eq!(
        (refused.status, refused.outcome, refused.consumer_id.as_deref(), refused.client_ip.as_str()),
        (403, Outcome::Forbidden, Some("acme"), "198.51.100.1")
    );
    let key_refused = events.iter().find(|e| e.path == "/api/k2").unwrap();
    assert_eq!(
        (key_refused.outcome, key_refused.consumer_id.as_deref(), key_refused.credential_id.as_deref()),
        (Outcome::Forbidden, Some("beta"), Some("beta-ci"))
    );
    let route_refused = events.iter().find(|e| e.path == "/internal/g").unwrap();
    assert_eq!((route_refused.outcome, route_refused.consumer_id.as_deref()), (Outcome::Forbidden, None));
    assert!(edge.terminate(Duration::from_secs(15)));
}
