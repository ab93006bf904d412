//! The plain-HTTP port that sends clients to HTTPS (`edge.http_redirect_listen`).
//!
//! Every request gets `308 Permanent Redirect` to the same host, path and query on the HTTPS
//! port: 308 keeps the method and body (a 301 turns a POST into a GET in many clients). Nothing
//! is forwarded or metered here: no call reaches an upstream over plain HTTP. A request
//! without a usable host gets a 400 problem.
//!
//! The port speaks HTTP/1 only and closes each connection after its answer: a redirected
//! client goes to the HTTPS port anyway, so nothing is gained by keeping plain connections
//! open, and an HTTP/2 (h2c) client, which no header timer covers once its preface has come,
//! cannot hold one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::problem::Problem;

/// Where `edge.http_redirect_listen` sends clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRedirect {
    /// The plain-HTTP port.
    pub listen: std::net::SocketAddr,
    /// The HTTPS port clients are sent to (`edge.https_public_port`, by default the port of
    /// `edge.listen`); left out of the URL when it is 443.
    pub https_port: u16,
}

/// The `Location` for a request to `host` (a `Host` header or an authority, with or without
/// a port) and `path_and_query`, on `https_port`. `None` when `host` is not a valid host.
pub fn location(host: &str, path_and_query: &str, https_port: u16) -> Option<http::HeaderValue> {
    let authority: http::uri::Authority = host.parse().ok()?;
    // Userinfo (`user@host`) has no place in a Host header; a port must be a number.
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host();
    let port = &authority.as_str()[host.len()..];
    let port_ok = port.is_empty() || port.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok());
    if host.is_empty() || !port_ok {
        return None;
    }
    let url = if https_port == 443 {
        format!("https://{host}{path_and_query}")
    } else {
        format!("https://{host}:{https_port}{path_and_query}")
    };
    // The URL as a URI first: whatever the client sent must make a valid one.
    let uri: http::Uri = url.parse().ok()?;
    http::HeaderValue::from_str(&uri.to_string()).ok()
}

/// The answer to one request on the redirect port.
fn answer<B>(req: &http::Request<B>, https_port: u16, metrics: &Metrics) -> Response {
    let path_and_query = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
    let target =
        crate::request_host(req).and_then(|h| h.to_str().ok().and_then(|h| location(h, path_and_query, https_port)));
    let Some(target) = target else {
        return Problem::bad_request("this port only redirects to HTTPS, and needs the request's host to do so")
            .into_response();
    };
    metrics.https_redirects.fetch_add(1, Ordering::Relaxed);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(http::header::LOCATION, target);
    resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    resp
}

/// Serves the redirect port until the task is aborted. A client must send its request head
/// within `edge.header_read_timeout_ms`, as on the traffic port (the current config's value,
/// read at each connection).
pub async fn serve(listener: TcpListener, https_port: u16, gw: Arc<crate::Gateway>) {
    let metrics = Arc::clone(&gw.metrics);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::server::accept_failed(&e, "edge.http_redirect_listen").await;
                continue;
            }
        };
        metrics.redirect_connections_accepted.fetch_add(1, Ordering::Relaxed);
        let http = gw.runtime().http.clone();
        let header_read_timeout = http.header_read_timeout;
        let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
        builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(false);
        let served = Arc::clone(&metrics);
        let svc = hyper::service::service_fn(move |req| {
            let resp = answer(&req, https_port, &served);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            // The balancer's PROXY header first (`edge.proxy_protocol`); its address is not
            // needed here, only the bytes out of the way.
            let mut stream = stream;
            if http.proxy_protocol && crate::server::proxied_client(&metrics, &http, &mut stream, peer).await.is_none()
            {
                return;
            }
            let stream = crate::silent::FirstBytes::new(stream, header_read_timeout).flagging(Arc::clone(&expired));
            let result = builder.serve_connection(TokioIo::new(stream), svc).await;
            // Nothing came in time (hyper ends such a connection without an error), or only
            // part of a request head (hyper's timer).
            let cut = expired.load(Ordering::Relaxed)
                || result.as_ref().is_err_and(|e| crate::server::timed_out(&**e, true).is_some());
            if cut {
                metrics.redirect_connections_timed_out.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = result {
                tracing::debug!(error = %e, "redirect connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn location_keeps_host_path_and_query_and_sets_the_https_port() {
        let loc = |host: &str, pq: &str, port: u16| location(host, pq, port).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(loc("api.example.com", "/v1/a?b=1", 8443).as_deref(), Some("https://api.example.com:8443/v1/a?b=1"));
        // The client's port is the plain one: replaced; 443 is left out.
        assert_eq!(loc("api.example.com:8080", "/", 443).as_deref(), Some("https://api.example.com/"));
        assert_eq!(loc("[2001:db8::1]:80", "/x", 8443).as_deref(), Some("https://[2001:db8::1]:8443/x"));
        assert_eq!(loc("127.0.0.1", "/%7Euser?q=a%20b", 443).as_deref(), Some("https://127.0.0.1/%7Euser?q=a%20b"));
        // Not a host: no redirect (the caller answers 400).
        for bad in ["", "user@evil.example", "a b", "host:port", "/path", "evil.example/x"] {
            assert_eq!(loc(bad, "/", 443), None, "{bad:?}");
        }
    }
}
