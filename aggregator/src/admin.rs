//! The admin port: `/healthz` and Prometheus `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;

use crate::metrics::Metrics;

pub fn app(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route("/healthz", get(|| async { "ok\n" })).route("/metrics", get(render)).with_state(metrics)
}

async fn render(State(m): State<Arc<Metrics>>) -> ([(http::HeaderName, &'static str); 1], String) {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}

/// Serves the admin app on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    if let Err(e) = axum::serve(listener, app(metrics)).await {
        tracing::error!(error = %e, "admin server failed");
    }
}
