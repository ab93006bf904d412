//! The admin port: `/healthz` (the process runs), `/readyz` (events can be taken) and
//! Prometheus `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header::CONTENT_TYPE;

use crate::metrics::Metrics;

pub fn app(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(metrics)
}

/// Ready when events have somewhere to go: Kafka answers, or the spool is writable and has
/// room. (With metering off, always ready.)
async fn ready(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    use std::sync::atomic::Ordering;
    let Some(spool) = m.spool.get() else {
        return (http::StatusCode::OK, "ready: metering off\n".to_owned());
    };
    let kafka = m.kafka_reachable.load(Ordering::Relaxed);
    let spool_ok = !spool.failing.load(Ordering::Relaxed);
    let body = format!(
        "kafka: {}\nspool: {}\n",
        if kafka { "reachable" } else { "unreachable" },
        if spool_ok { "ok" } else { "failing" }
    );
    if kafka || spool_ok {
        (http::StatusCode::OK, format!("ready\n{body}"))
    } else {
        (http::StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{body}"))
    }
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}
