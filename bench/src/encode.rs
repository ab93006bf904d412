//! Event encoding cost on the edge's producer task: the direct Avro writer against
//! apache-avro's generic `Value` writer (the previous encoder), same events, same run.

use std::time::Instant;

use tollgate_schemas::{ApiCall, Encoder, Outcome};

use crate::common::median;

fn event(i: u64) -> ApiCall {
    ApiCall {
        event_id: uuid::Uuid::now_v7(),
        start_time_us: 1_764_000_000_000_000 + i as i64,
        edge_id: "edge-bench-1".into(),
        consumer_id: Some(format!("consumer-{}", i % 1000)),
        credential_id: Some(format!("key-{}", i % 1000)),
        route_id: Some("echo".into()),
        method: "GET".into(),
        host: "api.example.com".into(),
        path: format!("/v1/items/{i}"),
        status: 200,
        outcome: Outcome::Forwarded,
        latency_us: 1_000 + i % 5_000,
        upstream_latency_us: Some(900 + i % 5_000),
        request_bytes: 0,
        response_bytes: 64,
        client_ip: "10.1.2.3".into(),
        user_agent: Some("wrk/4.1.0".into()),
        trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
        plan_id: Some("pro".into()),
        upstream_target: Some("http://10.0.0.5:8080".into()),
        grpc_status: None,
    }
}

pub fn run(events: usize, runs: usize) -> anyhow::Result<()> {
    let enc = Encoder::new()?;
    let calls: Vec<ApiCall> = (0..events as u64).map(event).collect();
    let mut buf = Vec::with_capacity(512);
    let mut direct = Vec::new();
    let mut generic = Vec::new();
    for run in 0..runs {
        let t = Instant::now();
        for c in &calls {
            buf.clear();
            enc.encode_into(c, &mut buf)?;
        }
        let d = t.elapsed().as_nanos() as f64 / events as f64;
        let t = Instant::now();
        for c in &calls {
            buf.clear();
            enc.encode_with_apache_avro(c, &mut buf)?;
        }
        let g = t.elapsed().as_nanos() as f64 / events as f64;
        println!("run {}: direct writer {d:>7.0} ns/event   apache-avro Value writer {g:>7.0} ns/event", run + 1);
        direct.push(d);
        generic.push(g);
    }
    let (d, g) = (median(&mut direct), median(&mut generic));
    println!(
        "\nmedian of {runs} runs, {events} events: direct {d:.0} ns/event, apache-avro {g:.0} ns/event, {:.1}x faster",
        g / d
    );
    Ok(())
}
