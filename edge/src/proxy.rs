//! Forwarding to the upstream with a pooled `hyper` client. Bodies stream both ways.
//! Hop-by-hop headers (and every header named in `Connection`) are removed in both
//! directions before the edge adds its own: `x-request-id`, `x-consumer-id` (always the
//! authenticated consumer, never the client's), `x-forwarded-*` and `traceparent`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::auth::Identity;
use crate::config::Route;
use crate::metering::{CallMeta, REQUEST_ID};
use crate::problem::Problem;
use crate::{CallInfo, Gateway, PeerAddr};

/// The upstream client.
pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// Header with the authenticated consumer, set by the edge for the upstream.
pub const CONSUMER_ID: &str = "x-consumer-id";

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1, plus the
/// legacy `keep-alive` and `proxy-connection`).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

pub fn client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Removes hop-by-hop headers and the headers named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The upstream URI for a request path and query.
pub fn upstream_uri(route: &Route, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
    let path = if route.strip_prefix && route.path_prefix != "/" {
        let rest = path.strip_prefix(route.path_prefix.as_str()).unwrap_or(path);
        if rest.is_empty() { "/" } else { rest }
    } else {
        path
    };
    let base = route.upstream.path().trim_end_matches('/');
    let mut pq = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = route.upstream.clone().into_parts();
    parts.path_and_query = Some(pq.parse()?);
    Ok(Uri::from_parts(parts)?)
}

/// The handler behind all layers: forwards to the route's upstream.
pub async fn forward(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let Some(route) = req.extensions().get::<Arc<Route>>().cloned() else {
        return Problem::no_route(req.uri().path()).into_response();
    };
    let meta = req.extensions().get::<CallMeta>().cloned();
    let consumer = req.extensions().get::<Arc<Identity>>().map(|i| Arc::clone(&i.consumer_id));
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let original_host = crate::request_host(&req);
    let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > gw.max_body_bytes) {
        return Problem::payload_too_large(gw.max_body_bytes).into_response();
    }
    let (mut parts, body) = req.into_parts();
    let over_limit = Arc::new(AtomicBool::new(false));
    let body = Body::new(LimitedBody { inner: body, left: gw.max_body_bytes, over: Arc::clone(&over_limit) });

    let uri = match upstream_uri(&route, parts.uri.path(), parts.uri.query()) {
        Ok(u) => u,
        Err(_) => return Problem::bad_request("the request target cannot be forwarded").into_response(),
    };
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    if let Some(authority) = route.upstream.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, v);
    }
    headers.remove(CONSUMER_ID);
    if let Some(c) = consumer.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
        headers.insert(CONSUMER_ID, c);
    }
    // Behind trusted proxies the chain is kept and extended; otherwise whatever the client
    // claimed is replaced by the address it connected from.
    if let Some(peer) = peer {
        let chain = if gw.trusted_hops > 0 {
            let prior: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
            if prior.is_empty() { peer.to_string() } else { format!("{}, {peer}", prior.join(", ")) }
        } else {
            peer.to_string()
        };
        if let Ok(v) = HeaderValue::from_str(&chain) {
            headers.insert("x-forwarded-for", v);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = original_host.and_then(|h| HeaderValue::from_str(&h).ok()) {
        headers.insert("x-forwarded-host", h);
    }
    if let Some(meta) = &meta {
        if let Ok(v) = HeaderValue::from_str(&meta.event_id.to_string()) {
            headers.insert(REQUEST_ID, v);
        }
        let traceparent = meta.traceparent.clone().or_else(|| {
            let span = &meta.event_id.simple().to_string()[16..];
            HeaderValue::from_str(&format!("00-{}-{span}-01", meta.trace_id)).ok()
        });
        if let Some(tp) = traceparent {
            headers.insert("traceparent", tp);
        }
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;

    let sent = Instant::now();
    let result = tokio::time::timeout(route.timeout, gw.client.request(Request::from_parts(parts, body))).await;
    let upstream_latency_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Err(_) => {
            tracing::warn!(route = %route.id, timeout_ms = route.timeout.as_millis() as u64, "upstream timeout");
            Problem::upstream_timeout(route.timeout.as_millis()).into_response()
        }
        Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => {
            Problem::payload_too_large(gw.max_body_bytes).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(route = %route.id, error = %e, connect = e.is_connect(), "upstream request failed");
            Problem::upstream_unreachable().into_response()
        }
        Ok(Ok(upstream)) => {
            let (mut parts, body) = upstream.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            let mut resp = Response::from_parts(parts, Body::new(body));
            let info = CallInfo::of(&mut resp);
            info.outcome = Some(tollgate_schemas::Outcome::Forwarded);
            info.upstream_latency_us = Some(upstream_latency_us);
            resp
        }
    }
}

/// A request body that fails once more than `left` bytes went through (for bodies without
/// a `Content-Length`, which is checked before forwarding).
struct LimitedBody {
    inner: Body,
    left: u64,
    over: Arc<AtomicBool>,
}

impl http_body::Body for LimitedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            if n > self.left {
                self.over.store(true, Ordering::Relaxed);
                return std::task::Poll::Ready(Some(Err(axum::Error::new("request body over edge.max_body_bytes"))));
            }
            self.left -= n;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::AuthMode;

    fn route(prefix: &str, upstream: &str, strip: bool) -> Route {
        Route {
            id: "r".into(),
            host: None,
            path_prefix: prefix.into(),
            exact: false,
            methods: vec![],
            upstream: upstream.parse().unwrap(),
            strip_prefix: strip,
            auth: AuthMode::ApiKey,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn upstream_uri_joins_base_path_and_query() {
        let r = route("/echo", "http://127.0.0.1:8081", false);
        assert_eq!(upstream_uri(&r, "/echo/a", Some("x=1")).unwrap(), "http://127.0.0.1:8081/echo/a?x=1");
        let r = route("/echo", "http://127.0.0.1:8081/base/", true);
        assert_eq!(upstream_uri(&r, "/echo/a", None).unwrap(), "http://127.0.0.1:8081/base/a");
        assert_eq!(upstream_uri(&r, "/echo", None).unwrap(), "http://127.0.0.1:8081/base/");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, vec!["x-kept"]);
    }
}
