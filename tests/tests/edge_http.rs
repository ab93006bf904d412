//! The edge's HTTP behaviour against a real echo upstream, and the events it emits for each
//! kind of answer (read back from Kafka and decoded with the shared schema).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;
use tollgate_schemas::{ApiCall, Outcome};

fn config(topic: &str, upstream: std::net::SocketAddr, dead: u16) -> String {
    format!(
        r#"
[edge]
instance_id = "edge-http"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[kafka]
brokers = "{kafka}"
topic = "{topic}"
[[routes]]
id = "echo"
path_prefix = "/echo"
upstream = "http://{upstream}"
timeout_ms = 300
[[routes]]
id = "readonly"
path_prefix = "/ro"
methods = ["GET"]
upstream = "http://{upstream}"
[[routes]]
id = "public"
path_prefix = "/public"
upstream = "http://{upstream}/base"
strip_prefix = true
auth = "none"
[[routes]]
id = "any-case"
path_prefix = "/Legacy"
ignore_case = true
strip_prefix = true
upstream = "http://{upstream}/base"
[[routes]]
id = "dead"
path_prefix = "/dead"
upstream = "http://127.0.0.1:{dead}"
[[routes]]
id = "premium"
path_prefix = "/premium"
upstream = "http://{upstream}"
allowed_plans = ["big"]
[plans.one]
rate_per_second = 1
burst = 1
[plans.big]
rate_per_second = 10000
[[consumers]]
id = "acme"
plan = "big"
keys = [{{ id = "acme-1", sha256 = "{a}" }}, {{ id = "acme-2", sha256 = "{a2}" }}]
[[consumers]]
id = "tiny"
plan = "one"
keys = [{{ id = "tiny-1", sha256 = "{t}" }}]
"#,
        kafka = kafka(),
        a = sha256_hex("key-acme"),
        a2 = sha256_hex("key-acme-rotated"),
        t = sha256_hex("key-tiny"),
    )
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: serde_json::Value,
}

async fn call(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client.request(b.body(Full::new(Bytes::from_static(b"hello"))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer { status, headers, body }
}

fn problem(a: &Answer, status: u16, slug: &str) {
    assert_eq!(a.status, status, "{:?}", a.body);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    assert_eq!(a.body["type"], format!("https://tollgate.dev/problems/{slug}"));
    assert_eq!(a.body["status"], status);
    assert!(a.headers.contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_problems_forwards_cleanly_and_meters_every_call() {
    let dir = TempDir::new("e2e_edge_http");
    let topic = unique("edge_http");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, upstream, dead)).await;
    type Expected<'a> = (u16, Outcome, Option<&'a str>, Option<&'a str>);
    let mut expect: HashMap<String, Expected<'_>> = HashMap::new();
    let mut note = |a: &Answer, outcome, consumer, route| {
        let id = a.headers["x-request-id"].to_str().unwrap().to_owned();
        expect.insert(id, (a.status, outcome, consumer, route));
    };

    // Forwarded: credentials stripped, edge headers set, client's x-consumer-id overwritten.
    let a = call(addr, "POST", "/echo/a?q=1", &[("x-api-key", "key-acme"), ("x-consumer-id", "spoofed")]).await;
    assert_eq!(a.status, 200);
    let h = &a.body["headers"];
    assert_eq!(h["x-consumer-id"], "acme");
    assert!(h.get("x-api-key").is_none() && h.get("authorization").is_none(), "{h}");
    assert_eq!(h["x-request-id"].as_str().unwrap(), a.headers["x-request-id"].to_str().unwrap());
    assert_eq!(a.body["path"], "/echo/a");
    assert_eq!(a.body["query"], "q=1");
    assert_eq!(a.body["body_bytes"], 5);
    assert!(h["traceparent"].as_str().unwrap().starts_with("00-"));
    note(&a, Outcome::Forwarded, Some("acme"), Some("echo"));

    // A rotated second key works too; Bearer works.
    let a = call(addr, "GET", "/echo/b", &[("authorization", "Bearer key-acme-rotated")]).await;
    assert_eq!(a.status, 200);
    note(&a, Outcome::Forwarded, Some("acme"), Some("echo"));

    // 401: missing, wrong, two credentials; never echoing the credential.
    for headers in
        [vec![], vec![("x-api-key", "key-nope")], vec![("x-api-key", "key-acme"), ("authorization", "Bearer key-acme")]]
    {
        let a = call(addr, "GET", "/echo/c", &headers).await;
        problem(&a, 401, "unauthenticated");
        assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"tollgate\"");
        assert!(!a.headers.contains_key("x-ratelimit-limit"), "unauthenticated calls have no limiter");
        assert!(!a.body.to_string().contains("key-"), "{}", a.body);
        note(&a, Outcome::Unauthenticated, None, Some("echo"));
    }

    // 404 and 405.
    let a = call(addr, "GET", "/nowhere", &[("x-api-key", "key-acme")]).await;
    problem(&a, 404, "no-route");
    note(&a, Outcome::NoRoute, None, None);
    let a = call(addr, "DELETE", "/ro/x", &[("x-api-key", "key-acme")]).await;
    problem(&a, 405, "method-not-allowed");
    assert_eq!(a.headers["allow"], "GET");
    note(&a, Outcome::NoRoute, None, None);
    // TRACE only on a route that lists it: a route without `methods` answers 405 naming the
    // others, and the upstream's echo of the request never comes back.
    let a = call(addr, "TRACE", "/echo/t", &[("x-api-key", "key-acme")]).await;
    problem(&a, 405, "method-not-allowed");
    assert_eq!(a.headers["allow"], "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");
    note(&a, Outcome::NoRoute, None, None);

    // A route for some plans only: tiny's plan is not one of them (403, metered with the
    // consumer, spending none of its burst of 1: its next call below still passes); acme's is.
    let a = call(addr, "GET", "/premium/x", &[("x-api-key", "key-tiny")]).await;
    problem(&a, 403, "forbidden");
    assert!(a.body["detail"].as_str().unwrap().contains("plan `one` does not include route `premium`"), "{}", a.body);
    assert!(!a.headers.contains_key("x-ratelimit-limit"), "refused before the limits");
    note(&a, Outcome::Forbidden, Some("tiny"), Some("premium"));
    let a = call(addr, "GET", "/premium/x", &[("x-api-key", "key-acme")]).await;
    assert_eq!(a.status, 200);
    note(&a, Outcome::Forwarded, Some("acme"), Some("premium"));

    // 429 with Retry-After once the burst of 1 is used.
    let a = call(addr, "GET", "/echo/d", &[("x-api-key", "key-tiny")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["ratelimit-policy"], "\"default\";q=1;w=1");
    assert_eq!(a.headers["ratelimit"], "\"default\";r=0;t=1");
    assert_eq!(a.headers["x-ratelimit-limit"], "1");
    assert_eq!(a.headers["x-ratelimit-remaining"], "0");
    note(&a, Outcome::Forwarded, Some("tiny"), Some("echo"));
    let a = call(addr, "GET", "/echo/d", &[("x-api-key", "key-tiny")]).await;
    problem(&a, 429, "rate-limited");
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.headers["x-ratelimit-remaining"], "0");
    assert_eq!(a.headers["x-ratelimit-reset"], "1");
    note(&a, Outcome::RateLimited, Some("tiny"), Some("echo"));

    // 504 after the route's 300 ms; 502 when nothing listens.
    let a = call(addr, "GET", "/echo/slow?delay_ms=2000", &[("x-api-key", "key-acme")]).await;
    problem(&a, 504, "upstream-timeout");
    note(&a, Outcome::UpstreamTimeout, Some("acme"), Some("echo"));
    let a = call(addr, "GET", "/dead/x", &[("x-api-key", "key-acme")]).await;
    problem(&a, 502, "upstream-error");
    note(&a, Outcome::UpstreamError, Some("acme"), Some("dead"));

    // Upstream statuses pass through as forwarded calls.
    let a = call(addr, "GET", "/echo/e?status=503", &[("x-api-key", "key-acme")]).await;
    assert_eq!(a.status, 503);
    note(&a, Outcome::Forwarded, Some("acme"), Some("echo"));

    // HTTP/2 with prior knowledge (h2c) is served and forwarded like HTTP/1.1.
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::get(format!("http://{addr}/echo/h2"))
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let a = Answer { status, headers, body };
    assert_eq!(a.status, 200);
    assert_eq!(a.body["path"], "/echo/h2");
    note(&a, Outcome::Forwarded, Some("acme"), Some("echo"));

    // Public route: no credential needed, prefix stripped onto the upstream base path.
    let a = call(addr, "GET", "/public/f", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["path"], "/base/f");
    assert!(a.body["headers"].get("x-consumer-id").is_none());
    note(&a, Outcome::Forwarded, None, Some("public"));

    // A route that ignores case (an upstream that does, such as IIS) takes its path in any
    // case, so its key is needed however `/LEGACY` is spelled; the rest keeps its case.
    let a = call(addr, "GET", "/lEGACY/Users", &[]).await;
    problem(&a, 401, "unauthenticated");
    note(&a, Outcome::Unauthenticated, None, Some("any-case"));
    let a = call(addr, "GET", "/LEGACY/Users?q=1", &[("x-api-key", "key-acme")]).await;
    assert_eq!(a.status, 200);
    assert_eq!((a.body["path"].as_str(), a.body["query"].as_str()), (Some("/base/Users"), Some("q=1")));
    note(&a, Outcome::Forwarded, Some("acme"), Some("any-case"));
    let a = call(addr, "GET", "/legacyx", &[("x-api-key", "key-acme")]).await;
    problem(&a, 404, "no-route");
    note(&a, Outcome::NoRoute, None, None);

    // A client that goes away before the answer (here while the upstream is still working)
    // is still one call: status 499, `client_aborted`.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /echo/abort?delay_ms=250 HTTP/1.1\r\nHost: api.example\r\nx-api-key: key-acme\r\n\
              User-Agent: probe/1.0\r\n\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every call is one event with what the client saw.
    let want = expect.len() + 1;
    let events: HashMap<String, ApiCall> =
        read_events(&topic, |e| e.len() >= want).await.into_iter().map(|e| (e.event_id.to_string(), e)).collect();
    for (id, (status, outcome, consumer, route)) in &expect {
        let e = events.get(id).unwrap_or_else(|| panic!("no event for {id}"));
        assert_eq!(
            (e.status, e.outcome, e.consumer_id.as_deref(), e.route_id.as_deref()),
            (*status, *outcome, *consumer, *route),
            "{e:?}"
        );
        assert_eq!(e.edge_id, "edge-http");
        assert_eq!(e.client_ip, "127.0.0.1");
        assert_eq!(e.upstream_latency_us.is_some(), *outcome == Outcome::Forwarded, "{e:?}");
    }
    let aborted = events.values().find(|e| e.path == "/echo/abort").expect("no event for the aborted call");
    assert_eq!(
        (aborted.status, aborted.outcome, aborted.consumer_id.as_deref(), aborted.route_id.as_deref()),
        (499, Outcome::ClientAborted, Some("acme"), Some("echo")),
        "{aborted:?}"
    );
    // The client went away 100 ms after sending; the edge's clock started once it had read
    // the request, a little after the client's: a little under 100 ms at least.
    assert!(aborted.latency_us >= 90_000 && aborted.upstream_latency_us.is_none(), "{aborted:?}");
    // The request's facts as the client sent them, and who called with which key and plan.
    assert_eq!(
        (aborted.method.as_str(), aborted.host.as_str(), aborted.user_agent.as_deref()),
        ("GET", "api.example", Some("probe/1.0")),
        "{aborted:?}"
    );
    assert_eq!((aborted.credential_id.as_deref(), aborted.plan_id.as_deref()), (Some("acme-1"), Some("big")));
    let trace = aborted.trace_id.as_deref().unwrap_or_default();
    assert!(trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()), "{aborted:?}");
    let slow = events.values().find(|e| e.outcome == Outcome::UpstreamTimeout).unwrap();
    assert!(slow.latency_us >= 300_000, "{slow:?}");
    let posted = events.values().find(|e| e.method == "POST").unwrap();
    assert_eq!(posted.request_bytes, 5);
    assert!(posted.response_bytes > 0);

    // The duration histogram counts each call once, with the latency its event has: every
    // bucket holds exactly the route's events at or under its bound.
    let echo: Vec<u64> =
        events.values().filter(|e| e.route_id.as_deref() == Some("echo")).map(|e| e.latency_us).collect();
    let text = metrics_text(admin).await;
    let prefix = "tollgate_edge_request_duration_seconds_bucket{route=\"echo\",le=\"";
    let buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, count.parse().unwrap()))
        })
        .collect();
    assert!(buckets.len() >= 10, "{text}");
    for (le, count) in &buckets {
        let bound_us = if le.is_finite() { (le * 1e6).round() as u64 } else { u64::MAX };
        let within = echo.iter().filter(|&&us| us <= bound_us).count() as u64;
        assert_eq!(*count, within, "bucket le={le}: {text}");
    }
    assert_eq!(buckets.last().map(|b| b.1), Some(echo.len() as u64));
    assert_eq!(metric(admin, "tollgate_edge_request_duration_seconds_count{route=\"echo\"}").await, echo.len() as u64);
    // Calls are counted by final status class when they complete, like their events (the
    // aborted one as a 499).
    for class in 1..=5u16 {
        let name = format!("tollgate_edge_requests_total{{route=\"echo\",status_class=\"{class}xx\"}}");
        let events = events.values().filter(|e| e.route_id.as_deref() == Some("echo") && e.status / 100 == class);
        assert_eq!(metric(admin, &name).await, events.count() as u64, "{name}");
    }
    // The slow calls (upstream timeout, aborted) are above the quick ones.
    assert!(buckets.iter().any(|&(le, count)| count > 0 && count < echo.len() as u64 && le < 0.3), "{buckets:?}");

    // Admin endpoints.
    let health = call(admin, "GET", "/healthz", &[]).await;
    assert_eq!(health.status, 200);
    assert_eq!(metric(admin, "tollgate_edge_events_dropped_total").await, 0);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// `routes[].rate_limit`: one budget for all the route's callers together, anonymous ones
/// included; a consumer's call refused by its own plan does not spend it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_shared_rate_limit_holds_for_all_its_callers_together() {
    let dir = TempDir::new("e2e_edge_shared_limit");
    let topic = unique("edge_shared_limit");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let routes = format!(
        "[[routes]]\nid = \"open-limited\"\npath_prefix = \"/open\"\nupstream = \"http://{upstream}\"\nauth = \"none\"\n\
         rate_limit = {{ rate_per_second = 1, burst = 2 }}\n\
         [[routes]]\nid = \"shared\"\npath_prefix = \"/shared\"\nupstream = \"http://{upstream}\"\n\
         rate_limit = {{ rate_per_second = 1, burst = 3 }}\n[plans.one]\n"
    );
    let config = config(&topic, upstream, 1).replace("[plans.one]\n", &routes);
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config).await;

    // Anonymous callers share the route's burst of 2.
    for _ in 0..2 {
        let a = call(addr, "GET", "/open/a", &[]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["ratelimit-policy"], "\"shared\";q=2;w=2");
    }
    let refused = call(addr, "GET", "/open/a", &[]).await;
    problem(&refused, 429, "rate-limited");
    assert!(refused.body["detail"].as_str().unwrap().contains("shared by all its callers"), "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.headers["x-ratelimit-remaining"], "0");

    // tiny (burst 1 of its own) takes one of the shared 3; its refused second call takes none.
    assert_eq!(call(addr, "GET", "/shared/x", &[("x-api-key", "key-tiny")]).await.status, 200);
    let own = call(addr, "GET", "/shared/x", &[("x-api-key", "key-tiny")]).await;
    problem(&own, 429, "rate-limited");
    assert!(!own.body["detail"].as_str().unwrap().contains("shared"), "{}", own.body);
    // So acme (a plan of 10,000/s) gets the two left, then the route's limit refuses it.
    let acme: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(call(addr, "GET", "/shared/x", &[("x-api-key", "key-acme")]).await.status);
        }
        v
    };
    assert_eq!(acme, [200, 200, 429]);
    let a = call(addr, "GET", "/shared/x", &[("x-api-key", "key-acme")]).await;
    assert_eq!(a.headers["ratelimit-policy"], "\"default\";q=10000;w=1, \"shared\";q=3;w=3");
    // A route without a shared limit is not limited for anonymous callers.
    for _ in 0..5 {
        assert_eq!(call(addr, "GET", "/public/x", &[]).await.status, 200);
    }
    assert_eq!(metric(admin, "tollgate_edge_rate_limit_refusals_total{limit=\"route\"}").await, 3);
    assert_eq!(metric(admin, "tollgate_edge_rate_limit_refusals_total{limit=\"plan\"}").await, 1);

    // The refusals are events: rate_limited, the anonymous one without a consumer.
    let events = read_events(&topic, |e| e.len() >= 14).await;
    let limited: Vec<(Option<&str>, Option<&str>)> = events
        .iter()
        .filter(|e| e.outcome == Outcome::RateLimited)
        .map(|e| (e.route_id.as_deref(), e.consumer_id.as_deref()))
        .collect();
    assert_eq!(
        limited,
        [
            (Some("open-limited"), None),
            (Some("shared"), Some("tiny")),
            (Some("shared"), Some("acme")),
            (Some("shared"), Some("acme"))
        ]
    );
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// `routes[].rate_limit_per_client`: each client address has its own budget on the route,
/// anonymous or not, spent before authentication (failed credentials included); other
/// addresses are not touched by one client's flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_address_has_its_own_budget_on_a_route() {
    let dir = TempDir::new("e2e_edge_client_limit");
    let topic = unique("edge_client_limit");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let routes = format!(
        "[[routes]]\nid = \"login\"\npath_prefix = \"/login\"\nupstream = \"http://{upstream}\"\nauth = \"none\"\n\
         rate_limit_per_client = {{ rate_per_second = 1, burst = 2 }}\n\
         [[routes]]\nid = \"keyed\"\npath_prefix = \"/keyed\"\nupstream = \"http://{upstream}\"\n\
         rate_limit_per_client = {{ rate_per_second = 1, burst = 2 }}\n[plans.one]\n"
    );
    // One trusted proxy in front: its X-Forwarded-For entry is the client.
    let config = config(&topic, upstream, 1).replace("[plans.one]\n", &routes).replacen(
        "[edge]\n",
        "[edge]\ntrusted_hops = 1\n",
        1,
    );
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config).await;
    let from = |ip: &'static str| ("x-forwarded-for", ip);

    for _ in 0..2 {
        let a = call(addr, "GET", "/login/x", &[from("203.0.113.1")]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["ratelimit-policy"], "\"client\";q=2;w=2");
    }
    let refused = call(addr, "GET", "/login/x", &[from("203.0.113.1")]).await;
    problem(&refused, 429, "rate-limited");
    assert!(refused.body["detail"].as_str().unwrap().contains("each client address"), "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.headers["ratelimit"], "\"client\";r=0;t=1");
    // Another address is not held back by that one.
    assert_eq!(call(addr, "GET", "/login/x", &[from("203.0.113.2")]).await.status, 200);

    // Before authentication: failed credentials spend the budget too.
    for _ in 0..2 {
        let a = call(addr, "GET", "/keyed/x", &[from("203.0.113.3"), ("x-api-key", "wrong")]).await;
        assert_eq!(a.status, 401);
    }
    let a = call(addr, "GET", "/keyed/x", &[from("203.0.113.3"), ("x-api-key", "key-acme")]).await;
    problem(&a, 429, "rate-limited");
    // A consumer from another address: both its limits in the headers.
    let a = call(addr, "GET", "/keyed/x", &[from("203.0.113.4"), ("x-api-key", "key-acme")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["ratelimit-policy"], "\"client\";q=2;w=2, \"default\";q=10000;w=1");
    assert_eq!(metric(admin, "tollgate_edge_rate_limit_refusals_total{limit=\"client\"}").await, 2);

    let events = read_events(&topic, |e| e.len() >= 8).await;
    let limited: Vec<(&str, Option<&str>)> = events
        .iter()
        .filter(|e| e.outcome == Outcome::RateLimited)
        .map(|e| (e.client_ip.as_str(), e.route_id.as_deref()))
        .collect();
    assert_eq!(limited, [("203.0.113.1", Some("login")), ("203.0.113.3", Some("keyed"))]);
    assert!(edge.terminate(Duration::from_secs(15)));
}

/// Per-route header rules: the upstream gets the provider's own credential and a version
/// header (the client's credential and a header the route removes do not reach it), and the
/// client gets the upstream's answer without `Server` and `X-Powered-By`, with the route's
/// `Cache-Control`. The edge's own headers stay the edge's; another route is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_set_and_remove_headers_both_ways() {
    let dir = TempDir::new("e2e_edge_rewrite");
    let topic = unique("edge_rewrite");
    create_topic(&topic, 1).await;
    // Answers with the request headers it got, as JSON, and headers a provider would hide.
    let upstream = serve_http(|req: http::Request<hyper::body::Incoming>| async move {
        let seen: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned().into()))
            .collect();
        http::Response::builder()
            .header("server", "upstream/1.0")
            .header("x-powered-by", "php/5")
            .header("cache-control", "public, max-age=60")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::Value::Object(seen).to_string())))
            .unwrap()
    })
    .await;
    let cfg = format!(
        "{}[[routes]]\nid = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"http://{upstream}\"\n\
         request_headers = {{ set = {{ authorization = \"Bearer provider-secret\", x-api-version = \"2\" }}, remove = [\"x-debug\"] }}\n\
         response_headers = {{ set = {{ cache-control = \"no-store\", x-frame-options = \"DENY\" }}, remove = [\"server\", \"x-powered-by\"] }}\n\
         [[routes]]\nid = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"http://{upstream}\"\n\
         [[routes]]\nid = \"strict\"\npath_prefix = \"/strict\"\nupstream = \"http://{upstream}\"\n\
         response_headers = {{ set = {{ strict-transport-security = \"max-age=63072000\", content-type = \"text/plain\" }}, always = true }}\n{}",
        edge_head("edge-rewrite", &topic).replace(
            "[edge]\n",
            "[edge]\nresponse_headers = { set = { x-content-type-options = \"nosniff\" }, remove = [\"x-powered-by\"] }\n"
        ),
        acme_with_key(1000)
    );
    let (_edge, addr, _admin) = start_edge(dir.path(), "edge", &cfg).await;
    let client_headers =
        [("x-api-key", "key-acme"), ("x-debug", "1"), ("x-api-version", "1"), ("x-consumer-id", "spoofed")];

    let a = call(addr, "GET", "/orders/1", &client_headers).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = &a.body;
    assert_eq!(seen["authorization"], "Bearer provider-secret");
    assert_eq!(seen["x-api-version"], "2");
    assert!(seen.get("x-debug").is_none(), "{seen}");
    assert!(seen.get("x-api-key").is_none(), "the client's key reached the upstream: {seen}");
    assert_eq!(seen["x-consumer-id"], "acme");
    assert!(a.headers.get("server").is_none() && a.headers.get("x-powered-by").is_none(), "{:?}", a.headers);
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.headers["x-frame-options"], "DENY");
    assert!(a.headers.contains_key("x-request-id") && a.headers.contains_key("x-ratelimit-remaining"));

    // The other route: what the client sent (but its key) and what the upstream answered.
    let b = call(addr, "GET", "/plain/1", &client_headers).await;
    assert_eq!(b.status, 200);
    assert_eq!((&b.body["x-debug"], &b.body["x-api-version"]), (&"1".into(), &"1".into()));
    assert!(b.body.get("authorization").is_none(), "{}", b.body);
    assert_eq!(b.headers["server"], "upstream/1.0");
    assert_eq!(b.headers["cache-control"], "public, max-age=60");
    // The edge's own rules: on every answer; `remove` on the upstreams' answers.
    assert!(!b.headers.contains_key("x-powered-by"), "{:?}", b.headers);
    assert_eq!(b.headers["x-content-type-options"], "nosniff");
    let nowhere = call(addr, "GET", "/nowhere", &[]).await;
    assert_eq!((nowhere.status, &nowhere.headers["x-content-type-options"]), (404, &"nosniff".parse().unwrap()));
    assert_eq!(nowhere.headers["content-type"], "application/problem+json");

    // `always`: the edge's own answers on the route get the set headers too, but keep what the
    // edge wrote (the problem's content type, `WWW-Authenticate`); without it they get none.
    let refused = call(addr, "GET", "/strict/1", &[]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.headers["strict-transport-security"], "max-age=63072000");
    assert_eq!(refused.headers["content-type"], "application/problem+json");
    assert!(refused.headers.contains_key("www-authenticate"));
    let answered = call(addr, "GET", "/strict/1", &[("x-api-key", "key-acme")]).await;
    assert_eq!(answered.status, 200);
    assert_eq!(answered.headers["strict-transport-security"], "max-age=63072000");
    assert_eq!(answered.headers["content-type"], "text/plain", "an upstream answer gets the rules in full");
    let refused = call(addr, "GET", "/orders/1", &[]).await;
    assert_eq!(refused.status, 401);
    assert!(!refused.headers.contains_key("x-frame-options"), "{:?}", refused.headers);
    assert_eq!(refused.headers["x-content-type-options"], "nosniff");
}
