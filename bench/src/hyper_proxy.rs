//! The framework baseline of the gateway benchmark: a reverse proxy built from the same parts
//! as the edge — hyper's server (HTTP/1.1 + h2c auto builder), one current-thread runtime per
//! worker thread with its own `SO_REUSEPORT` listener, and the edge's own per-thread upstream
//! connection pool (`tollgate_edge::upstream::Clients`) — doing none of the gateway's work: no
//! authentication, limits, metering, hygiene checks or header rewriting beyond `Host`. Its
//! throughput is the ceiling for the edge on this stack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tollgate_edge::upstream::Clients;

/// Serves until the process is killed.
pub fn run(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let tls = tollgate_edge::tls::client_config(&[]).map_err(|e| anyhow::anyhow!(e))?;
    let clients = Arc::new(Clients::new(tls));
    let target: http::Uri = format!("http://{upstream}").parse()?;
    let key: Arc<str> = Arc::from(format!("http://{upstream}"));
    let host = http::HeaderValue::from_str(&upstream.to_string())?;
    let mut workers = Vec::new();
    for _ in 0..threads.max(1) {
        // (Called on the bench's runtime; the worker makes its own listener from this one.)
        let std_listener = tollgate_edge::server::bind_reuseport(listen)?.into_std()?;
        let (clients, target, key, host) = (Arc::clone(&clients), target.clone(), Arc::clone(&key), host.clone());
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (clients, target, key, host) =
                        (Arc::clone(&clients), target.clone(), Arc::clone(&key), host.clone());
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (clients, target, key, host) =
                            (Arc::clone(&clients), target.clone(), Arc::clone(&key), host.clone());
                        async move {
                            let (mut parts, body) = req.into_parts();
                            parts.uri = parts.uri.path_and_query().map_or_else(
                                || http::Uri::from_static("/"),
                                |pq| {
                                    http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(pq.as_str().as_bytes()))
                                        .unwrap_or_else(|_| http::Uri::from_static("/"))
                                },
                            );
                            parts.version = http::Version::HTTP_11;
                            parts.headers.insert(http::header::HOST, host);
                            let req = http::Request::from_parts(parts, axum::body::Body::new(body));
                            let resp = match clients.send(&key, &target, Duration::from_secs(2), req).await {
                                Ok(r) => r,
                                Err(_) => {
                                    let mut r = http::Response::new(axum::body::Body::empty());
                                    *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                    r
                                }
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        }));
    }
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a proxy worker panicked"))??;
    }
    Ok(())
}
