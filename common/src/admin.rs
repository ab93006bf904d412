//! The admin port of the pipeline stages (ingest, aggregator): `/healthz` and Prometheus
//! `/metrics`. (The edge has its own, with `/readyz`.)

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;

/// A stage's metrics, rendered in the Prometheus text format.
pub trait Render: Send + Sync + 'static {
    fn render(&self) -> String;
}

/// Binds `admin.listen`; the error names the key.
pub async fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("admin.listen {addr}: cannot listen: {e}"))?;
    tracing::info!(%addr, "admin port listening");
    Ok(listener)
}

pub fn app<M: Render>(metrics: Arc<M>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render::<M>))
        .with_state(metrics)
}

async fn render<M: Render>(State(m): State<Arc<M>>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render())
}

/// Serves the admin app on `listener` until the process ends.
pub async fn serve<M: Render>(listener: tokio::net::TcpListener, metrics: Arc<M>) {
    if let Err(e) = axum::serve(listener, app(metrics)).await {
        tracing::error!(error = %e, "admin server failed");
    }
}

/// Counters and gauges in the text format: `# HELP`, `# TYPE` and the value of each.
pub fn write_family(out: &mut String, kind: &str, families: &[(&str, &str, String)]) {
    use std::fmt::Write;
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
}
