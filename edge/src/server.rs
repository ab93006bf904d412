//! Listeners, connections and graceful shutdown.
//!
//! Shutdown: stop accepting, let in-flight requests finish within `edge.shutdown_grace_ms`,
//! then close the event queue and flush the Kafka producer.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::Config;
use crate::metering::spool::Spool;
use crate::metering::{EventSink, producer};
use crate::metrics::Metrics;
use crate::{Gateway, PeerAddr, admin, app, auth, proxy, routing};

/// Runs the edge until `shutdown` completes. When `ready_file` is given, writes
/// `{"listen": "...", "admin": "..."}` there once both ports accept connections.
pub async fn serve(cfg: Config, shutdown: impl Future<Output = ()>, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("edge.listen {}: {e}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("edge.admin_listen {}: {e}", cfg.admin_listen))?;
    let (listen, admin_addr) = (listener.local_addr()?, admin_listener.local_addr()?);

    let metrics = Arc::new(Metrics::new(cfg.routes.iter().map(|r| r.id.as_str())));
    let (events_tx, producer_task) = if cfg.kafka.enabled {
        let spool = Spool::open(&cfg.spool)?;
        let _ = metrics.spool.set(Arc::clone(spool.stats()));
        let (tx, task) = producer::start(&cfg.kafka, spool, Arc::clone(&metrics), cfg.shutdown_grace)?;
        (Some(tx), Some(task))
    } else {
        tracing::warn!("kafka.enabled = false: metering is off, no event is produced");
        (None, None)
    };
    let gw = Arc::new(Gateway {
        instance_id: cfg.instance_id.clone(),
        routes: routing::RouteTable::new(&cfg.routes),
        keys: auth::KeyStore::new(&cfg),
        client: proxy::client(cfg.connect_timeout),
        events: EventSink::new(events_tx, Arc::clone(&metrics)),
        metrics: Arc::clone(&metrics),
        trusted_hops: cfg.trusted_hops,
        max_body_bytes: cfg.max_body_bytes,
    });
    let router = app(Arc::clone(&gw));
    drop(gw);

    let admin_router = admin::app(Arc::clone(&metrics));
    let admin_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin_router).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });

    if let Some(path) = ready_file {
        let body = serde_json::json!({ "listen": listen.to_string(), "admin": admin_addr.to_string() });
        std::fs::write(path, body.to_string())
            .map_err(|e| anyhow::anyhow!("cannot write ready file {}: {e}", path.display()))?;
    }
    tracing::info!(%listen, admin = %admin_addr, routes = cfg.routes.len(), consumers = cfg.consumers.len(), "edge started");

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_headers(cfg.max_headers)
        .max_buf_size(cfg.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = router.clone().map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(PeerAddr(peer));
                    req
                });
                let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!(grace_ms = cfg.shutdown_grace.as_millis() as u64, "draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(cfg.shutdown_grace) => tracing::warn!("shutdown grace over; closing remaining connections"),
    }
    drop(router);
    admin_task.abort();
    if let Some(task) = producer_task {
        task.close().await?;
    }
    tracing::info!(
        produced = metrics.events_produced.load(std::sync::atomic::Ordering::Relaxed),
        dropped = metrics.events_dropped.load(std::sync::atomic::Ordering::Relaxed),
        delivery_failed = metrics.events_delivery_failed.load(std::sync::atomic::Ordering::Relaxed),
        "edge stopped"
    );
    Ok(())
}
