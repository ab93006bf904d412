//! Config reload under load: SIGHUP swaps routes, plans and consumers without failing a
//! request; an invalid file is rejected and the running config stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_demo::traffic::{self, Caller};
use tollgate_e2e::*;

fn config(
    topic: &str,
    upstream: std::net::SocketAddr,
    spool: &std::path::Path,
    rate: u32,
    with_globex: bool,
) -> String {
    let mut c = format!(
        "[edge]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\n[spool]\ndir = \"{}\"\n\
         [[routes]]\nid = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"http://{upstream}\"\n\
         [plans.p]\nrate_per_second = {rate}\n\
         [[consumers]]\nid = \"acme\"\nplan = \"p\"\nkeys = [{{ id = \"a\", sha256 = \"{}\" }}]\n",
        kafka(),
        spool.display(),
        sha256_hex("key-acme")
    );
    if with_globex {
        c.push_str(&format!(
            "[[consumers]]\nid = \"globex\"\nplan = \"p\"\nkeys = [{{ id = \"g\", sha256 = \"{}\" }}]\n",
            sha256_hex("key-globex")
        ));
    }
    c
}

async fn status(addr: std::net::SocketAddr, path: &str, key: &str) -> u16 {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let s = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_rejects_a_bad_file() {
    let dir = TempDir::new("e2e_reload");
    let topic = unique("reload");
    create_topic(&topic, 1).await;
    let (upstream, _) = start_echo().await;
    let spool = dir.path().join("spool");
    let (mut edge, addr, admin) =
        start_edge(dir.path(), "edge", &config(&topic, upstream, &spool, 100_000, false)).await;
    let cfg_path = dir.path().join("edge.toml");
    assert_eq!(status(addr, "/echo/x", "key-globex").await, 401);

    let load = tokio::spawn(async move {
        let caller = Caller {
            label: "acme".into(),
            key: Some("key-acme".into()),
            requests: 4000,
            concurrency: 4,
            pause: Duration::from_millis(1),
            path: "/echo/load".into(),
        };
        traffic::run(&format!("http://{addr}"), vec![caller]).await
    });
    for i in 0..6u32 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        std::fs::write(&cfg_path, config(&topic, upstream, &spool, 100_000 + i, i % 2 == 1)).unwrap();
        edge.signal("HUP");
    }
    // Last valid config: globex present.
    tokio::time::sleep(Duration::from_millis(250)).await;
    std::fs::write(&cfg_path, config(&topic, upstream, &spool, 100_000, true)).unwrap();
    edge.signal("HUP");
    let reloaded =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-globex").await == 200 }).await;
    assert!(reloaded, "globex's key never became valid:\n{}", edge.log_tail());

    // An invalid file is rejected; the running config keeps serving.
    let failures_before = metric(admin, "tollgate_edge_config_reload_failures_total").await;
    std::fs::write(
        &cfg_path,
        config(&topic, upstream, &spool, 100_000, true).replace("plan = \"p\"", "plan = \"nope\""),
    )
    .unwrap();
    edge.signal("HUP");
    let rejected = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reload_failures_total").await > failures_before
    })
    .await;
    assert!(rejected, "the invalid config was not rejected:\n{}", edge.log_tail());
    assert!(edge.log_tail().contains("consumers[0].plan"), "the rejection does not name the key:\n{}", edge.log_tail());
    assert_eq!(status(addr, "/echo/x", "key-globex").await, 200);
    assert_eq!(status(addr, "/echo/x", "key-acme").await, 200);

    let tally = load.await.unwrap();
    assert_eq!(tally.transport_errors, 0);
    assert_eq!(tally.by_status.get(&("acme".to_owned(), 200)).copied(), Some(4000), "{:?}", tally.by_status);
    assert!(metric(admin, "tollgate_edge_config_reloads_total").await >= 7);
    assert_eq!(metric(admin, "tollgate_edge_kafka_reachable").await, 1);

    // Consumers in a JSON Lines file: loaded with the config, and a change to that file alone
    // is a reload.
    let line = |id: &str, key: &str| {
        format!(
            "{{\"id\": \"{id}\", \"plan\": \"p\", \"keys\": [{{\"id\": \"{id}-1\", \"sha256\": \"{}\"}}]}}\n",
            sha256_hex(key)
        )
    };
    let consumers = dir.path().join("consumers.jsonl");
    std::fs::write(&consumers, format!("# consumers managed elsewhere\n\n{}", line("initech", "key-initech"))).unwrap();
    let with_file =
        format!("consumers_file = \"consumers.jsonl\"\n{}", config(&topic, upstream, &spool, 100_000, true));
    std::fs::write(&cfg_path, with_file).unwrap();
    edge.signal("HUP");
    let from_file =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-initech").await == 200 }).await;
    assert!(from_file, "the consumers_file's consumer was not loaded:\n{}", edge.log_tail());
    assert_eq!(status(addr, "/echo/x", "key-acme").await, 200, "[[consumers]] and the file both count");
    assert_eq!(status(addr, "/echo/x", "key-umbrella").await, 401);
    let mut lines = std::fs::read_to_string(&consumers).unwrap();
    lines.push_str(&line("umbrella", "key-umbrella"));
    std::fs::write(&consumers, &lines).unwrap();
    let watched =
        wait_until(Duration::from_secs(10), || async { status(addr, "/echo/x", "key-umbrella").await == 200 }).await;
    assert!(watched, "a change to the consumers_file alone was not reloaded:\n{}", edge.log_tail());
    // A bad line is rejected with its line number; the running consumers stay.
    let failures_before = metric(admin, "tollgate_edge_config_reload_failures_total").await;
    lines.push_str("{\"id\": \"hooli\", \"plan\": \"p\", \"keys\": [{\"id\": \"h\", \"sha256\": \"zz\"}]}\n");
    std::fs::write(&consumers, &lines).unwrap();
    let rejected = wait_until(Duration::from_secs(10), || async {
        metric(admin, "tollgate_edge_config_reload_failures_total").await > failures_before
    })
    .await;
    assert!(rejected, "the bad consumers_file was not rejected:\n{}", edge.log_tail());
    let log = edge.log_tail();
    assert!(log.contains("consumers.jsonl line 5") && log.contains("keys[0].sha256"), "{log}");
    assert_eq!(status(addr, "/echo/x", "key-umbrella").await, 200);
    assert!(edge.terminate(Duration::from_secs(15)));
}
