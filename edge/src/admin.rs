//! The admin port: `/healthz` (the process runs), `/readyz` (new calls are taken and can be
//! metered) and Prometheus `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header::CONTENT_TYPE;

use crate::metrics::{KafkaState, Metrics};

/// The admin routes. `gw` (weak: the admin port does not keep the gateway) adds the state of
/// the current config's upstream targets to `/metrics`.
pub fn app(metrics: Arc<Metrics>, gw: std::sync::Weak<crate::Gateway>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(move |State(m): State<Arc<Metrics>>| render(m, gw.clone())))
        .with_state(metrics)
}

/// `/readyz`. Ready while the edge takes new calls and can meter them: Kafka answers and has
/// the event topic, or the spool is writable and has room ([`crate::metering::spool::READY_HEADROOM`]). Not ready
/// once shutdown began (in-flight calls drain meanwhile). The config is always usable while
/// the edge runs: it does not start on an invalid one, and a rejected reload keeps the
/// running one. With metering off, ready until shutdown.
async fn ready(State(m): State<Arc<Metrics>>) -> axum::response::Response {
    let (ready, body) = readiness(&m);
    let status = if ready { http::StatusCode::OK } else { http::StatusCode::SERVICE_UNAVAILABLE };
    (status, [(CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// Whether the edge is ready, and the text saying why (one `part: state` line each).
pub fn readiness(m: &Metrics) -> (bool, String) {
    use std::sync::atomic::Ordering;
    let draining = m.draining.load(Ordering::Relaxed);
    let mut ok = !draining;
    let mut body = String::new();
    if let Some(spool) = m.spool.get() {
        let state = m.kafka_state();
        let kafka = state == KafkaState::Usable;
        let spool_state = if spool.failing.load(Ordering::Relaxed) {
            "failing"
        } else if spool.nearly_full() {
            "full"
        } else {
            "ok"
        };
        ok &= kafka || spool_state == "ok";
        body.push_str(match state {
            KafkaState::Usable => "kafka: reachable\n",
            KafkaState::TopicMissing => "kafka: topic not found (kafka.topic)\n",
            KafkaState::Unknown | KafkaState::Unreachable => "kafka: unreachable\n",
        });
        body.push_str("spool: ");
        body.push_str(spool_state);
        body.push('\n');
    } else {
        body.push_str("metering: off\n");
    }
    if draining {
        body.push_str("shutdown: draining\n");
    }
    (ok, format!("{}\n{body}", if ok { "ready" } else { "not ready" }))
}

async fn render(m: Arc<Metrics>, gw: std::sync::Weak<crate::Gateway>) -> axum::response::Response {
    let mut out = m.render();
    if let Some(gw) = gw.upgrade() {
        crate::upstream::render_targets(&gw.runtime().pools, &mut out);
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::metering::spool::{READY_HEADROOM, SpoolStats};
    use std::sync::atomic::Ordering;

    #[test]
    fn ready_while_kafka_or_the_spool_can_take_events_and_not_while_draining() {
        let m = Metrics::new(["r"], 1);
        assert_eq!(readiness(&m), (true, "ready\nmetering: off\n".to_owned()));
        let stats = Arc::new(SpoolStats { max_bytes: 1 << 20, ..SpoolStats::default() });
        m.spool.set(Arc::clone(&stats)).unwrap();
        // Kafka down, spool with room: events are spooled, nothing is lost.
        assert_eq!(readiness(&m), (true, "ready\nkafka: unreachable\nspool: ok\n".to_owned()));
        // Kafka down, spool (nearly) full or failing: events would be dropped.
        stats.bytes.store((1 << 20) - READY_HEADROOM + 1, Ordering::Relaxed);
        assert_eq!(readiness(&m), (false, "not ready\nkafka: unreachable\nspool: full\n".to_owned()));
        stats.bytes.store((1 << 20) - READY_HEADROOM, Ordering::Relaxed);
        assert!(readiness(&m).0, "exactly the headroom left is still room");
        stats.failing.store(true, Ordering::Relaxed);
        assert_eq!(readiness(&m), (false, "not ready\nkafka: unreachable\nspool: failing\n".to_owned()));
        // Kafka answering: ready whatever the spool's state (it is replayed meanwhile).
        m.set_kafka_state(KafkaState::Usable);
        assert_eq!(readiness(&m), (true, "ready\nkafka: reachable\nspool: failing\n".to_owned()));
        // Kafka answering without the event topic: as if it were down (events are spooled).
        m.set_kafka_state(KafkaState::TopicMissing);
        assert_eq!(
            readiness(&m),
            (false, "not ready\nkafka: topic not found (kafka.topic)\nspool: failing\n".to_owned())
        );
        stats.failing.store(false, Ordering::Relaxed);
        assert_eq!(readiness(&m), (true, "ready\nkafka: topic not found (kafka.topic)\nspool: ok\n".to_owned()));
        m.set_kafka_state(KafkaState::Usable);
        m.draining.store(true, Ordering::Relaxed);
        assert_eq!(readiness(&m), (false, "not ready\nkafka: reachable\nspool: ok\nshutdown: draining\n".to_owned()));
    }
}
