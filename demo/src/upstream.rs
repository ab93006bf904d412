//! Echo upstream. For any request it answers 200 with a JSON echo of the method, path, query,
//! headers and body size. Query parameters change the answer:
//! `status=NNN` (status code), `delay_ms=N` (wait before answering), `bytes=N` (answer N bytes
//! of `x` instead of the JSON echo).
//!
//! A WebSocket handshake (`Upgrade: websocket`) is accepted (RFC 6455 `Sec-WebSocket-Accept`)
//! and the connection then echoes every byte it receives, frames included, until the client
//! closes: enough to check that a gateway splices upgraded connections byte for byte.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Requests the echo server has received (tests compare it with what clients sent).
#[derive(Debug, Default)]
pub struct EchoStats {
    pub requests: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

/// RFC 6455 §4.2.2: base64(SHA-1(key + GUID)).
pub fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn websocket(mut req: Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let wants =
        req.headers().get(http::header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = req.headers().get("sec-websocket-key")?.as_bytes().to_vec();
    if !wants {
        return None;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
    h.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    if let Ok(v) = http::HeaderValue::from_str(&websocket_accept(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    Some(resp)
}

async fn handle(req: Request<Incoming>, stats: Arc<EchoStats>) -> Result<Response<Full<Bytes>>, Infallible> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if req.headers().contains_key(http::header::UPGRADE) {
        if let Some(resp) = websocket(req) {
            return Ok(resp);
        }
        let mut resp = Response::new(Full::new(Bytes::from_static(b"unsupported upgrade")));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(resp);
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let (parts, body) = req.into_parts();
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query_param(&query, "status")
        .and_then(|v| v.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let (body, content_type) = match query_param(&query, "bytes").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => (Bytes::from(vec![b'x'; n.min(64 << 20)]), "application/octet-stream"),
        None => {
            // The echo (only when asked for: the `bytes=N` answers used by benchmarks skip it).
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), serde_json::Value::String(v))
                })
                .collect();
            let (method, path) = (parts.method.as_str(), parts.uri.path());
            let echo = serde_json::json!({ "method": method, "path": path, "query": query, "headers": headers, "body_bytes": body_bytes });
            (Bytes::from(echo.to_string()), "application/json")
        }
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    Ok(resp)
}

/// Serves the echo upstream on `listener` forever.
pub async fn serve(listener: TcpListener, stats: Arc<EchoStats>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, Arc::clone(&stats)));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(super::websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
