//! Several targets per upstream through the real edge: round robin, retries on another target
//! only for idempotent bodiless requests whose connection failed, and passive health ejecting
//! a dead target so later requests stop paying for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_e2e::*;

fn config(topic: &str, a: std::net::SocketAddr, b: std::net::SocketAddr, dead: u16) -> String {
    let head = edge_head("edge-upstreams", topic);
    format!(
        r#"{head}
[[routes]]
id = "lb"
path_prefix = "/lb"
upstreams = ["http://{a}", "http://127.0.0.1:{dead}", "http://{b}"]
auth = "none"
max_fails = 2
fail_timeout_ms = 60000
[[routes]]
id = "noeject"
path_prefix = "/noeject"
upstreams = ["http://127.0.0.1:{dead}", "http://{a}"]
auth = "none"
max_fails = 1000000
connect_timeout_ms = 500
"#
    )
}

async fn send(addr: std::net::SocketAddr, method: &str, path: &str, body: &'static [u8]) -> u16 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    client.request(req).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_retry_and_passive_health() {
    let dir = TempDir::new("e2e_edge_upstreams");
    let topic = unique("edge_upstreams");
    create_topic(&topic, 1).await;
    let (a, a_stats) = start_echo().await;
    let (b, b_stats) = start_echo().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (mut edge, addr, admin) = start_edge(dir.path(), "edge", &config(&topic, a, b, dead)).await;

    // GETs: every one answered although a third of the targets is dead; the dead target is
    // ejected after max_fails = 2 connect failures, each of which was retried elsewhere.
    for i in 0..30 {
        assert_eq!(send(addr, "GET", &format!("/lb/{i}"), b"").await, 200, "GET {i}");
    }
    let (na, nb) = (a_stats.requests.load(Ordering::SeqCst), b_stats.requests.load(Ordering::SeqCst));
    assert_eq!(na + nb, 30);
    assert!(na >= 5 && nb >= 5, "round robin over the live targets: {na} / {nb}");
    assert_eq!(metric(admin, "tollgate_edge_upstream_ejections_total").await, 1);
    assert_eq!(metric(admin, "tollgate_edge_upstream_retries_total").await, 2);

    // POSTs are never retried: with a dead target that is never ejected, the calls that land
    // on it get 502 and the upstream sees exactly the others, once each.
    let before = a_stats.requests.load(Ordering::SeqCst);
    let mut ok = 0;
    let mut bad_gateway = 0;
    for i in 0..10 {
        match send(addr, "POST", &format!("/noeject/{i}"), b"payload").await {
            200 => ok += 1,
            502 => bad_gateway += 1,
            s => panic!("POST {i}: {s}"),
        }
    }
    assert_eq!((ok, bad_gateway), (5, 5), "round robin over [dead, live], no retry");
    assert_eq!(a_stats.requests.load(Ordering::SeqCst) - before, 5);
    // The same route retries bodiless GETs, so none fails, and each reaches the upstream once.
    let before = a_stats.requests.load(Ordering::SeqCst);
    for i in 0..10 {
        assert_eq!(send(addr, "GET", &format!("/noeject/{i}"), b"").await, 200, "GET {i}");
    }
    assert_eq!(a_stats.requests.load(Ordering::SeqCst) - before, 10);
    let retries = metric(admin, "tollgate_edge_upstream_retries_total").await - 2;
    assert!((1..=10).contains(&retries), "{retries} retries");
    assert!(edge.terminate(Duration::from_secs(15)), "{}", edge.log_tail());
}
