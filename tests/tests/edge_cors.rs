//! CORS at the edge (`routes[].cors`): preflights from an allowed origin are answered 204 by the
//! edge (not forwarded, not authenticated, not metered), from another origin 403; every answer
//! of the route to an allowed origin (the upstream's, and the edge's own 401 and 429) carries
//! `Access-Control-Allow-Origin` and exposes the edge's headers; the upstream's CORS headers
//! give way; routes without a policy are as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;

const APP: &str = "https://app.example.com";
const EVIL: &str = "https://evil.example.com";

/// A request to the edge: status and headers.
async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, serde_json::Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, serde_json::from_slice(&body).unwrap_or_default())
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_preflights_and_cors_headers_on_every_answer_of_a_route_with_a_policy() {
    let dir = TempDir::new("e2e_edge_cors");
    let topic = unique("edge_cors");
    create_topic(&topic, 1).await;
    // An upstream with CORS of its own (a wildcard) and a header of its own.
    let upstream = serve_http(|req: http::Request<hyper::body::Incoming>| async move {
        let body = serde_json::json!({ "method": req.method().as_str() });
        http::Response::builder()
            .header("access-control-allow-origin", "*")
            .header("x-upstream-thing", "1")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    })
    .await;
    let cfg = format!(
        "{}[[routes]]\nid = \"api\"\npath_prefix = \"/api\"\nmethods = [\"GET\", \"POST\"]\nupstream = \"http://{upstream}\"\n\
         cors = {{ allow_origins = [\"{APP}\"], allow_headers = [\"x-tenant\"], expose_headers = [\"x-upstream-thing\"] }}\n\
         [[routes]]\nid = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"http://{upstream}\"\n{}\
         [plans.trickle]\nrate_per_second = 1\n\
         [[consumers]]\nid = \"slow\"\nplan = \"trickle\"\nkeys = [{{ id = \"slow-1\", sha256 = \"{}\" }}]\n",
        edge_head("edge-cors", &topic),
        acme_with_key(1000),
        sha256_hex("key-slow")
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &cfg).await;

    // The preflight a browser sends before a POST with a key: answered by the edge.
    let preflight = |origin: &'static str, method: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", method),
            ("access-control-request-headers", "content-type, x-api-key"),
        ]
    };
    let (status, h, _) = call(addr, "OPTIONS", "/api/items", &preflight(APP, "POST")).await;
    assert_eq!(status, 204, "{h:?}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&h, "access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(header(&h, "access-control-allow-headers"), Some("authorization, content-type, x-api-key, x-tenant"));
    assert_eq!(header(&h, "access-control-max-age"), Some("600"));
    assert!(header(&h, "ratelimit").is_none(), "a preflight is not limited");
    let (status, h, body) = call(addr, "OPTIONS", "/api/items", &preflight(EVIL, "POST")).await;
    assert_eq!((status, body["status"].as_u64()), (403, Some(403)), "{body}");
    assert!(h.get("access-control-allow-origin").is_none());
    // A method the route does not take: no preflight grant (the route takes no OPTIONS: 405).
    assert_eq!(call(addr, "OPTIONS", "/api/items", &preflight(APP, "DELETE")).await.0, 405);
    // A route without a policy: a preflight is an unauthenticated OPTIONS, as before.
    let (status, h, _) = call(addr, "OPTIONS", "/plain/x", &preflight(APP, "GET")).await;
    assert_eq!(status, 401);
    assert!(h.get("access-control-allow-origin").is_none());

    // The call itself: the policy's grant in place of the upstream's, the edge's headers exposed.
    let (status, h, body) = call(addr, "POST", "/api/items", &[("origin", APP), ("x-api-key", "key-acme")]).await;
    assert_eq!((status, body["method"].as_str()), (200, Some("POST")));
    assert_eq!(h.get_all("access-control-allow-origin").iter().collect::<Vec<_>>(), [APP]);
    let exposed = header(&h, "access-control-expose-headers").unwrap();
    for name in ["x-ratelimit-remaining", "retry-after", "x-quota-warning", "x-request-id", "x-upstream-thing"] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
    assert!(h.get_all("vary").iter().any(|v| v == "Origin"), "{h:?}");
    // The edge's own refusals too, so the browser app can read them: 401...
    let (status, h, body) = call(addr, "GET", "/api/items", &[("origin", APP)]).await;
    assert_eq!((status, body["status"].as_u64()), (401, Some(401)));
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP));
    // ...and 429 with its Retry-After.
    let slow = [("origin", APP), ("x-api-key", "key-slow")];
    assert_eq!(call(addr, "GET", "/api/a", &slow).await.0, 200);
    let (status, h, _) = call(addr, "GET", "/api/b", &slow).await;
    assert_eq!(status, 429);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP));
    assert!(h.contains_key("retry-after"));
    // Another origin: no grant at all (the upstream's wildcard is gone too), the call still
    // answered (a browser will not show it to the page).
    let (status, h, _) = call(addr, "GET", "/api/items", &[("origin", EVIL), ("x-api-key", "key-acme")]).await;
    assert_eq!(status, 200);
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    // The route without a policy passes the upstream's headers as they are.
    let (_, h, _) = call(addr, "GET", "/plain/x", &[("origin", APP), ("x-api-key", "key-acme")]).await;
    assert_eq!(header(&h, "access-control-allow-origin"), Some("*"));

    // Preflights are counted, not metered: the events are the eight calls, no OPTIONS to `api`.
    let allowed = metric(admin, "tollgate_edge_cors_preflights_total{result=\"allowed\"}").await;
    let refused = metric(admin, "tollgate_edge_cors_preflights_total{result=\"refused\"}").await;
    assert_eq!((allowed, refused), (1, 1));
    let (status, _, _) = call(addr, "GET", "/api/last", &[("x-api-key", "key-acme")]).await;
    assert_eq!(status, 200);
    let events = read_events(&topic, |e| e.iter().any(|e| e.path == "/api/last")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api_options: Vec<_> =
        events.iter().filter(|e| e.method == "OPTIONS" && e.route_id.as_deref() == Some("api")).collect();
    assert!(api_options.is_empty(), "preflights metered: {api_options:?}");
    assert_eq!(events.iter().filter(|e| e.method == "OPTIONS").count(), 2, "the 405 and the plain route's 401");
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// A policy defined once (`[cors_policies.web]`) and named by several routes
/// (`cors_policy = "web"`): each route answers preflights for the policy's origins with its own
/// methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_policy_serves_every_route_that_names_it() {
    let dir = TempDir::new("e2e_edge_cors_named");
    let topic = unique("edge_cors_named");
    create_topic(&topic, 1).await;
    let (upstream, _echo) = start_echo().await;
    let cfg = format!(
        "{}[[routes]]\nid = \"read\"\npath_prefix = \"/read\"\nmethods = [\"GET\"]\nupstream = \"http://{upstream}\"\n\
         cors_policy = \"web\"\n\
         [[routes]]\nid = \"write\"\npath_prefix = \"/write\"\nmethods = [\"GET\", \"PUT\"]\nupstream = \"http://{upstream}\"\n\
         cors_policy = \"web\"\n{}\
         [cors_policies.web]\nallow_origins = [\"{APP}\"]\nmax_age_s = 60\n",
        edge_head("edge-cors-named", &topic),
        acme_with_key(1000),
    );
    let (mut edge, addr, _) = start_edge(dir.path(), "edge", &cfg).await;
    let preflight = |origin: &'static str, method: &'static str| {
        [("origin", origin), ("access-control-request-method", method), ("access-control-request-headers", "x-api-key")]
    };
    for (path, method, methods) in [("/read/x", "GET", "GET"), ("/write/x", "PUT", "GET, PUT")] {
        let (status, h, _) = call(addr, "OPTIONS", path, &preflight(APP, method)).await;
        assert_eq!(status, 204, "{path} {h:?}");
        assert_eq!(header(&h, "access-control-allow-methods"), Some(methods), "{path}");
        assert_eq!(header(&h, "access-control-max-age"), Some("60"), "{path}");
        assert_eq!(call(addr, "OPTIONS", path, &preflight(EVIL, method)).await.0, 403, "{path}");
        let (status, h, _) = call(addr, "GET", path, &[("origin", APP), ("x-api-key", "key-acme")]).await;
        assert_eq!((status, header(&h, "access-control-allow-origin")), (200, Some(APP)), "{path}");
    }
    // PUT is not a method of `read`: no grant there.
    assert_eq!(call(addr, "OPTIONS", "/read/x", &preflight(APP, "PUT")).await.0, 405);
    assert!(edge.terminate(Duration::from_secs(15)));
}
