//! A webhook receiver for the demo's SLO alerts: every POST body (one JSON notification from
//! the aggregator) is appended as a line to a file and answered 204.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

async fn handle(req: Request<Incoming>, out: Arc<Mutex<tokio::fs::File>>) -> Response<Full<Bytes>> {
    let status = if req.method() != http::Method::POST {
        StatusCode::METHOD_NOT_ALLOWED
    } else {
        match req.into_body().collect().await {
            Err(_) => StatusCode::BAD_REQUEST,
            Ok(body) => {
                let mut line = body.to_bytes().to_vec();
                line.retain(|&b| b != b'\n');
                line.push(b'\n');
                let mut f = out.lock().await;
                match f.write_all(&line).await {
                    Ok(()) => {
                        let _ = f.flush().await;
                        tracing::info!(notification = %String::from_utf8_lossy(&line[..line.len() - 1]), "alert received");
                        StatusCode::NO_CONTENT
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot write the notification");
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                }
            }
        }
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Serves until the process ends, appending notifications to `out`.
pub async fn serve(listener: TcpListener, out: PathBuf) -> std::io::Result<()> {
    let file = tokio::fs::OpenOptions::new().create(true).append(true).open(&out).await?;
    let file = Arc::new(Mutex::new(file));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let file = Arc::clone(&file);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let file = Arc::clone(&file);
                async move { Ok::<_, Infallible>(handle(req, file).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
