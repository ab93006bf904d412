//! OpenTelemetry through the real edge: each call is a span exported over OTLP/HTTP to a
//! collector (here a recording HTTP server), child of the client's `traceparent`; the upstream
//! gets a `traceparent` naming the edge's span; the event carries the same trace id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;

/// What the fake collector received: (path, content-type, body).
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

async fn collector() -> (std::net::SocketAddr, Received) {
    let got: Received = Arc::default();
    let store = Arc::clone(&got);
    let addr = serve_http(move |req: http::Request<hyper::body::Incoming>| {
        let store = Arc::clone(&store);
        async move {
            let path = req.uri().path().to_owned();
            let ct = req.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
            store.lock().unwrap().push((path, ct, body));
            http::Response::new(Full::new(Bytes::new()))
        }
    })
    .await;
    (addr, got)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_and_propagated() {
    let dir = TempDir::new("e2e_edge_otel");
    let topic = unique("edge_otel");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let (otlp, received) = collector().await;
    let head = edge_head("edge-otel", &topic);
    let config = format!(
        r#"{head}
[telemetry]
otlp_endpoint = "http://{otlp}/v1/traces"
service_name = "edge-under-test"
[[routes]]
id = "echo"
path_prefix = "/echo"
upstream = "http://{upstream}"
auth = "none"
"#
    );
    let (mut edge, addr, _) = start_edge(dir.path(), "edge", &config).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut upstream_parents = Vec::new();
    let mut ids = Vec::new();
    for traceparent in [Some(format!("00-{trace}-{client_span}-01")), None] {
        let mut b = http::Request::get(format!("http://{addr}/echo/x"));
        if let Some(tp) = &traceparent {
            b = b.header("traceparent", tp);
        }
        let resp = client.request(b.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(resp.headers()["x-request-id"].to_str().unwrap().to_owned());
        let body: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let tp = body["headers"]["traceparent"].as_str().unwrap().to_owned();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        if traceparent.is_some() {
            assert_eq!(parts[1], trace, "the client's trace continues upstream");
            assert_ne!(parts[2], client_span, "the upstream's parent is the edge's span");
        }
        upstream_parents.push((parts[1].to_owned(), parts[2].to_owned()));
    }

    // The events carry the trace ids the upstream saw.
    let events = read_events(&topic, |e| e.len() >= 2).await;
    for (id, (trace_id, _)) in ids.iter().zip(&upstream_parents) {
        let e = events.iter().find(|e| e.event_id.to_string() == *id).unwrap();
        assert_eq!(e.trace_id.as_deref(), Some(trace_id.as_str()));
    }

    // Shutdown flushes the batch; the collector got both spans (trace and span ids are raw
    // bytes in the protobuf body), from our service.
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
    let got = received.lock().unwrap().clone();
    assert!(!got.is_empty(), "nothing exported");
    let all: Vec<u8> = got.iter().flat_map(|(_, _, b)| b.clone()).collect();
    for (path, ct, _) in &got {
        assert_eq!((path.as_str(), ct.as_str()), ("/v1/traces", "application/x-protobuf"));
    }
    assert!(contains(&all, b"edge-under-test"));
    for (trace_id, span_id) in &upstream_parents {
        assert!(contains(&all, &unhex(trace_id)), "trace {trace_id} not exported");
        assert!(contains(&all, &unhex(span_id)), "span {span_id} not exported");
    }
    assert!(contains(&all, &unhex(client_span)), "the parent span id is recorded");
}
