//! The admin port: `/healthz` and Prometheus `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::header::CONTENT_TYPE;

use crate::metrics::Metrics;

pub fn app(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route("/healthz", get(|| async { "ok\n" })).route("/metrics", get(render)).with_state(metrics)
}

async fn render(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}
