//! Forwarding to the upstream with a pooled `hyper` client. Bodies stream both ways.
//! Hop-by-hop headers (and every header named in `Connection`) are removed in both
//! directions before the edge adds its own: `x-request-id`, `x-consumer-id` (always the
//! authenticated consumer, never the client's), `x-forwarded-*` and `traceparent`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{CONNECTION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;

use crate::auth::Identity;
use crate::config::Route;
use crate::metering::{Call, REQUEST_ID, RequestBody};
use crate::problem::Problem;
use crate::upstream::SendError;
use crate::{Gateway, Runtime};

/// The client for the edge's own requests (JWKS): HTTP and HTTPS, pooled.
pub type HttpClient = hyper_util::client::legacy::Client<crate::upstream::Connector, Body>;

/// Header with the authenticated consumer, set by the edge for the upstream.
pub static CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A pooled client for the edge's own requests (JWKS) to `http://` and `https://` URLs
/// (requests to upstreams go through [`crate::upstream::Clients`]).
pub fn client(connect_timeout: Duration, tls: &Arc<rustls::ClientConfig>) -> HttpClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(crate::upstream::IDLE_TIMEOUT)
        .pool_max_idle_per_host(crate::upstream::MAX_IDLE_PER_TARGET)
        .build(crate::upstream::connector(connect_timeout, tls))
}

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1, plus the
/// legacy `keep-alive` and `proxy-connection`).
pub static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop headers and the headers named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, no lookups.
    if headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        remove_hop_by_hop_found(headers);
    }
}

/// [`remove_hop_by_hop`] once a pass found some.
fn remove_hop_by_hop_found(headers: &mut HeaderMap) {
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What a request header claims to override: a client could use it to make the upstream act on
/// something other than what the edge checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Override {
    /// Client address, host, port or prefix: only proxies set these (`Forwarded`, RFC 7239;
    /// `X-Real-IP`; `X-Forwarded-Port`/`-Prefix`).
    Proxy,
    /// The path (`X-Original-URL`, `X-Rewrite-URL`: some frameworks serve that path instead of
    /// the request's, past the edge's routing).
    Path,
    /// The method (`X-HTTP-Method-Override` and its variants), past a route's `methods`.
    Method,
}

fn override_of(name: &str) -> Option<Override> {
    // Refused cheaply first (this runs for every request header): each name below starts with
    // `x` or `f` and has one of these lengths.
    let b = name.as_bytes();
    if !matches!(b.first(), Some(b'x' | b'f')) || !matches!(b.len(), 9 | 13 | 14 | 16 | 17 | 18 | 22) {
        return None;
    }
    match name {
        "forwarded" | "x-real-ip" | "x-forwarded-port" | "x-forwarded-prefix" => Some(Override::Proxy),
        "x-original-url" | "x-rewrite-url" => Some(Override::Path),
        "x-http-method-override" | "x-http-method" | "x-method-override" => Some(Override::Method),
        _ => None,
    }
}

/// Headers the edge writes on every forwarded request, or takes a credential from.
const WRITTEN: [&str; 6] =
    ["x-consumer-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "x-api-key"];

/// Whether `name`, which has an underscore, is one of the headers the edge writes or guards
/// once its underscores are read as dashes. CGI, WSGI, PHP and Rack hand headers to the
/// application as `HTTP_X_CONSUMER_ID` for both `x-consumer-id` and `x-consumer_id`, so such
/// a twin would stand beside (or for) the edge's own value (nginx drops every header with an
/// underscore for this reason; only the twins are dropped here). `written`: the names this
/// request's claims and route set too, by name.
fn underscore_twin(name: &str, written: &dyn Fn(&str) -> bool) -> bool {
    let dashed = name.replace('_', "-");
    WRITTEN.contains(&dashed.as_str()) || override_of(&dashed).is_some() || written(&dashed)
}

/// Removes from a request the hop-by-hop headers ([`remove_hop_by_hop`]) and those a client
/// could override the edge's checks with: the path ones always, the proxies' ones unless
/// trusted proxies stand in front (`trusted_hops` > 0; the edge writes
/// `X-Forwarded-For/-Proto/-Host` itself), the method ones on routes that restrict methods,
/// and the underscore twins of all these and of the headers the edge writes
/// ([`underscore_twin`]; `written`: whether a name is one of the request's claim headers or
/// its route's `set`).
pub fn scrub_request(
    headers: &mut HeaderMap,
    trusted_hops: usize,
    methods_restricted: bool,
    written: &dyn Fn(&str) -> bool,
) {
    let removed = |name: &HeaderName| match override_of(name.as_str()) {
        Some(Override::Path) => true,
        Some(Override::Proxy) => trusted_hops == 0,
        Some(Override::Method) => methods_restricted,
        None => name.as_str().contains('_') && underscore_twin(name.as_str(), written),
    };
    // Most requests have none of either: one pass over the names, no lookups.
    let (mut hop_by_hop, mut overrides) = (false, false);
    for name in headers.keys() {
        hop_by_hop |= HOP_BY_HOP.contains(name);
        overrides |= removed(name);
    }
    if hop_by_hop {
        remove_hop_by_hop_found(headers);
    }
    if overrides {
        let names: Vec<HeaderName> = headers.keys().filter(|n| removed(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// The request target (origin form: path and query) on `target` (one of the route's
/// upstreams, whose path is a base path) for the client's request target `original`.
pub fn upstream_target(route: &Route, target: &Uri, original: &Uri) -> Result<Uri, http::Error> {
    let strip = route.strip_prefix && route.path_prefix != "/";
    let base = target.path().trim_end_matches('/');
    // Most routes pass the client's origin-form target on as it is: shared, not copied.
    if !strip && base.is_empty() && original.scheme().is_none() && original.authority().is_none() {
        return Ok(original.clone());
    }
    let (path, query) = (original.path(), original.query());
    let stripped;
    let path = if strip {
        stripped = without_prefix(&route.path_prefix, path, route.ignore_case);
        if stripped.is_empty() { "/" } else { &stripped }
    } else {
        path
    };
    let mut pq = String::with_capacity(base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(base);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    Ok(Uri::from_maybe_shared(bytes::Bytes::from(pq))?)
}

/// `path` without the route's `prefix`, the segments the route matched (`prefix` has no
/// trailing `/`). A segment's `;parameters` did not stop it from matching
/// (`crate::routing`), so they go with it: `/admin;jsessionid=1/users` on `/admin` is `/users`,
/// the parameters of later segments are kept. A path that took the route only once
/// parameters and the dot segments they hid were resolved (`/public/..;/admin/users`) is
/// forwarded in that resolved form, stripped (`/users`).
/// With `ignore_case` (the route's), letters match whatever their case.
fn without_prefix<'a>(prefix: &str, path: &'a str, ignore_case: bool) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    let same = |a: &str, b: &str| if ignore_case { a.eq_ignore_ascii_case(b) } else { a == b };
    let mut rest = path;
    for wanted in prefix.split('/').skip(1) {
        let Some(r) = rest.strip_prefix('/') else { break };
        let (segment, tail) = r.split_at(r.find('/').unwrap_or(r.len()));
        if !same(segment.split(';').next().unwrap_or_default(), wanted) {
            let routed = crate::routing::without_path_params(path);
            let matched = crate::routing::prefix_matches(prefix, &routed, ignore_case);
            return if matched { Cow::Owned(routed[prefix.len()..].to_owned()) } else { Cow::Borrowed(path) };
        }
        rest = tail;
    }
    Cow::Borrowed(rest)
}

/// `target`'s scheme and authority with `origin_form`'s path and query (the request target
/// of an HTTP/2 request).
fn absolute(target: &Uri, origin_form: Uri) -> Result<Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = target.scheme().cloned();
    parts.authority = target.authority().cloned();
    parts.path_and_query = origin_form.into_parts().path_and_query;
    Ok(Uri::from_parts(parts)?)
}

/// The `X-Forwarded-For` to send: behind trusted proxies (`trusted_hops` > 0) the chain is
/// kept and extended with the peer; otherwise whatever the client claimed is replaced by the
/// address it connected from.
pub fn forwarded_for(headers: &HeaderMap, peer: &crate::Peer, trusted_hops: usize) -> Option<HeaderValue> {
    if trusted_hops == 0 {
        // The peer's address, already as text.
        return Some(peer.ip_text.clone());
    }
    let prior: Vec<&str> = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    if prior.is_empty() {
        return Some(peer.ip_text.clone());
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(format!("{}, {}", prior.join(", "), peer.addr.ip()))).ok()
}

/// Methods whose requests may be sent twice (RFC 9110 §9.2.2).
fn idempotent(m: &http::Method) -> bool {
    use http::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::TRACE, M::PUT, M::DELETE].contains(m)
}

/// What the request path knows about a call that forwarding needs.
pub struct Forward<'a> {
    pub runtime: &'a Runtime,
    pub route: &'a Route,
    pub identity: Option<&'a Identity>,
    pub call: &'a Call,
    /// The TCP peer (the `X-Forwarded-For` entry the edge adds).
    pub peer: &'a crate::Peer,
}

/// Forwards the request to the route's upstream (the end of the request path).
pub async fn forward(gw: &Arc<Gateway>, ctx: &Forward<'_>, req: http::Request<Incoming>) -> Response {
    let route = ctx.route;
    let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body_bytes) {
        return Problem::payload_too_large(route.max_body_bytes).into_response();
    }
    let Some(pool) = ctx.runtime.pools.get(&route.id) else {
        return Problem::upstream_unreachable().into_response();
    };
    // Held until the response has been sent (a tunnel's only until its 101). With a queue
    // (`queue_timeout_ms`), a call waits for a place (the route's, then a target's) until then.
    let queue_deadline = pool.queue_timeout().map(|t| tokio::time::Instant::now() + t);
    let mut in_flight = match pool.admit() {
        Ok(slot) => slot,
        Err(max) => match wait_for_route(gw, pool, queue_deadline, max).await {
            Ok(slot) => slot,
            Err(refused) => return refused,
        },
    };
    let (mut parts, body) = req.into_parts();
    // WebSocket and other HTTP/1.1 upgrades: the handshake is forwarded like any request and,
    // on 101, both connections are spliced (see `tunnel`).
    // (Not to HTTP/2 targets: the request goes on as a plain one.)
    let upgrade = upgrade_protocol(&parts.headers, parts.version)
        .filter(|_| !pool.h2)
        .and_then(|proto| Some((proto, parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?)));
    // HTTP/2 targets get `TE: trailers` when the client sent it (gRPC asks for it to detect
    // proxies that would drop trailers); it is hop-by-hop otherwise.
    let te_trailers = pool.h2
        && parts
            .headers
            .get_all(http::header::TE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    // A retry needs the request again: only bodiless requests are retried.
    let bodiless = http_body::Body::is_end_stream(&body);
    let counter = &ctx.call.request_body;
    let body = Body::new(RequestBody::new(
        body,
        Arc::clone(counter),
        route.max_body_bytes,
        ctx.runtime.http.body_read_timeout,
    ));

    let headers = &mut parts.headers;
    let written = |dashed: &str| {
        ctx.runtime.claim_headers.iter().any(|n| n.as_str() == dashed)
            || route.request_headers.set.iter().any(|(n, _)| n.as_str() == dashed)
    };
    scrub_request(headers, ctx.runtime.http.trusted_hops, !route.methods.is_empty(), &written);
    headers.remove(&CONSUMER_ID);
    if let Some(c) = ctx.identity.and_then(|i| HeaderValue::from_str(&i.consumer_id).ok()) {
        headers.insert(&CONSUMER_ID, c);
    }
    // Claim headers (`claims_to_headers`): whatever the client sent under those names is
    // removed; a JWT's claims are written.
    for name in &ctx.runtime.claim_headers {
        headers.remove(name);
    }
    if let Some(grants) = ctx.identity.and_then(|i| i.grants.as_deref()) {
        for (name, value) in &grants.headers {
            headers.insert(name, value.clone());
        }
    }
    if let Some(chain) = forwarded_for(headers, ctx.peer, ctx.runtime.http.trusted_hops) {
        headers.insert(&X_FORWARDED_FOR, chain);
    }
    // The client's scheme at the edge (TLS in front of the edge is not seen).
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(if ctx.peer.tls { "https" } else { "http" }));
    if let Some(h) = ctx.call.host() {
        headers.insert(&X_FORWARDED_HOST, h.clone());
    }
    let meta = &ctx.call.meta;
    headers.insert(&REQUEST_ID, ctx.call.request_id.clone());
    match &meta.otel {
        // Telemetry on: the upstream's parent is the edge's span.
        Some(cx) => crate::telemetry::inject(cx, headers),
        None => {
            let traceparent = meta.traceparent.clone().or_else(|| {
                // 00-<trace id>-<last 16 hex digits of the event id as span id>-01
                let mut id = [0u8; uuid::fmt::Simple::LENGTH];
                let span = &meta.event_id.simple().encode_lower(&mut id)[16..];
                let mut tp = Vec::with_capacity(55);
                for part in ["00-", meta.trace_id.as_str(), "-", span, "-01"] {
                    tp.extend_from_slice(part.as_bytes());
                }
                HeaderValue::from_maybe_shared(bytes::Bytes::from(tp)).ok()
            });
            if let Some(tp) = traceparent {
                headers.insert(&TRACEPARENT, tp);
            }
        }
    }

    if !route.request_headers.is_empty() {
        route.request_headers.apply(headers);
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some((proto, _)) = &upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(http::header::UPGRADE, proto.clone());
    }
    // A retry goes to another target: never more attempts than targets that take calls.
    let attempts =
        if bodiless && idempotent(&parts.method) { (1 + route.retries as usize).min(pool.serving()) } else { 1 };
    let (method, version) = (parts.method.clone(), parts.version);
    let mut body = Some(body);
    let mut tried = Vec::with_capacity(attempts);
    // From here the route's timeout runs and the upstream's latency is measured (a wait in the
    // queue for a target restarts it: the call was not sent meanwhile).
    let mut sent = Instant::now();
    // The attempt's place among its target's calls in flight (`upstreams[].max_in_flight`).
    let mut target_slot;
    loop {
        let target = match pool.pick(&tried) {
            crate::upstream::Pick::Target(i, slot) => {
                target_slot = slot;
                i
            }
            // Every target with room was tried (a retry after a failed connect): that failure.
            crate::upstream::Pick::Busy if !tried.is_empty() => {
                return Problem::upstream_unreachable().into_response();
            }
            crate::upstream::Pick::Busy => match wait_for_target(gw, pool, queue_deadline).await {
                Ok((i, slot)) => {
                    target_slot = slot;
                    sent = Instant::now();
                    i
                }
                Err(refused) => return refused,
            },
            crate::upstream::Pick::Exhausted => return Problem::upstream_unreachable().into_response(),
        };
        tried.push(target);
        ctx.call.upstream_target.store(u32::try_from(target).unwrap_or(u32::MAX), Ordering::Relaxed);
        let last = tried.len() >= attempts;
        let uri = match upstream_target(route, &pool.targets[target], &parts.uri) {
            Ok(u) if pool.h2 => absolute(&pool.targets[target], u),
            Ok(u) => Ok(u),
            Err(e) => Err(e),
        };
        let Ok(uri) = uri else {
            return Problem::bad_request("the request target cannot be forwarded").into_response();
        };
        let mut req = Request::new(body.take().unwrap_or_else(Body::empty));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = if last { std::mem::take(&mut parts.headers) } else { parts.headers.clone() };
        if pool.h2 {
            // The target's authority is the URI's (`:authority`); the client's `Host` is not
            // passed on (HTTP/2 has none; the client's host goes as `x-forwarded-host`).
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(HOST);
        } else {
            *req.version_mut() = Version::HTTP_11;
            if let Some(host) = &pool.hosts[target] {
                req.headers_mut().insert(HOST, host.clone());
            }
        }
        let left = route.timeout.saturating_sub(sent.elapsed());
        let result = tokio::time::timeout(left, pool.send(&gw.clients, target, req)).await;
        let upstream_latency_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        match result {
            // The client's, not the upstream's: its body stopped coming, or was still coming
            // when the route's time ran out, and the edge was waiting for it (not for the
            // upstream to take more). No failure of the target.
            Ok(Err(_)) if counter.timed_out.load(Ordering::Relaxed) => {
                return request_timeout(
                    format!("no request body bytes came for {} ms", ctx.runtime.http.body_read_timeout.as_millis()),
                    version,
                );
            }
            Err(_) if counter.waiting_on_client.load(Ordering::Relaxed) => {
                return request_timeout(
                    format!("the request body was not complete within {} ms", route.timeout.as_millis()),
                    version,
                );
            }
            Err(_) => {
                tracing::warn!(route = %route.id, target = %pool.targets[target], timeout_ms = route.timeout.as_millis() as u64, "upstream timeout");
                if pool.failure(target) {
                    gw.metrics.upstream_ejections.fetch_add(1, Ordering::Relaxed);
                }
                return Problem::upstream_timeout(route.timeout.as_millis()).into_response();
            }
            Ok(Err(_)) if counter.over_limit.load(Ordering::Relaxed) => {
                return Problem::payload_too_large(route.max_body_bytes).into_response();
            }
            Ok(Err(e)) => {
                let connect = matches!(e, SendError::Connect(_));
                tracing::warn!(route = %route.id, target = %pool.targets[target], error = %e, connect, "upstream request failed");
                if pool.failure(target) {
                    gw.metrics.upstream_ejections.fetch_add(1, Ordering::Relaxed);
                }
                // Retried only when the request cannot have reached the upstream.
                if connect && !last {
                    gw.metrics.upstream_retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                return Problem::upstream_unreachable().into_response();
            }
            Ok(Ok(mut upstream)) => {
                pool.success(target);
                ctx.call.upstream_latency_us.store(upstream_latency_us, Ordering::Relaxed);
                if upstream.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    // Spliced only when the upstream switched to a protocol the client asked
                    // for (RFC 9110 §15.2.2: a 101 names it in `Upgrade`). Anything else, such
                    // as an endpoint that answers with any status it is given, would leave the
                    // client a raw connection to the upstream past the edge.
                    return match upgrade {
                        Some((asked, client_side)) if switched_as_asked(&asked, upstream.headers()) => {
                            tunnel(gw, client_side, &mut upstream)
                        }
                        _ => {
                            tracing::warn!(
                                route = %route.id,
                                "upstream answered 101 without switching to a protocol the client asked for; answered 502"
                            );
                            Problem::upstream_unreachable().into_response()
                        }
                    };
                }
                let (mut parts, body) = upstream.into_parts();
                // An HTTP/2 target's answer goes to an HTTP/1 client as HTTP/1.1.
                if pool.h2 && version != Version::HTTP_2 {
                    parts.version = Version::HTTP_11;
                }
                remove_hop_by_hop(&mut parts.headers);
                if !route.response_headers.is_empty() {
                    route.response_headers.apply(&mut parts.headers);
                }
                let body = crate::upstream::InFlight::hold_all(body, [in_flight.take(), target_slot.take()]);
                return Response::from_parts(parts, body);
            }
        }
    }
}

/// A place among the route's calls in flight when it had none (`max` of them were in flight,
/// or calls were queued): waits in the route's queue until `deadline`, else (or then) the 503.
async fn wait_for_route(
    gw: &Gateway,
    pool: &crate::upstream::Pool,
    deadline: Option<tokio::time::Instant>,
    max: u32,
) -> Result<Option<crate::upstream::InFlight>, Response> {
    let refused = || {
        gw.metrics.in_flight_refusals[0].fetch_add(1, Ordering::Relaxed);
        Problem::upstream_overloaded(max).into_response()
    };
    let Some(deadline) = deadline else { return Err(refused()) };
    let admitted = Box::pin(pool.queue_for_route(deadline)).await;
    queue_result(gw, admitted, refused)
}

/// The queue's answer counted (`tollgate_edge_queued_calls_total{result}`), its refusal made:
/// a full queue's own 503, else `refused`. (A `Response` error like its async callers'.)
#[allow(clippy::result_large_err)]
fn queue_result<T>(
    gw: &Gateway,
    waited: Result<T, crate::queue::NoPlace>,
    refused: impl FnOnce() -> Response,
) -> Result<T, Response> {
    use crate::queue::NoPlace;
    let result = match waited {
        Ok(_) => 0,
        Err(NoPlace::TimedOut) => 1,
        Err(NoPlace::Full) => 2,
    };
    gw.metrics.queued_calls[result].fetch_add(1, Ordering::Relaxed);
    waited.map_err(|no_place| match no_place {
        NoPlace::TimedOut => refused(),
        NoPlace::Full => Problem::queue_full().into_response(),
    })
}

/// A call's first target when every target in service was at its `max_in_flight` (or calls
/// were queued for one): waits in the targets' queue until `deadline`, else (or then) the 503.
async fn wait_for_target(
    gw: &Gateway,
    pool: &crate::upstream::Pool,
    deadline: Option<tokio::time::Instant>,
) -> Result<(usize, Option<crate::upstream::InFlight>), Response> {
    let refused = || {
        gw.metrics.in_flight_refusals[2].fetch_add(1, Ordering::Relaxed);
        Problem::targets_overloaded().into_response()
    };
    let Some(deadline) = deadline else { return Err(refused()) };
    let picked = Box::pin(pool.queue_for_target(deadline)).await;
    queue_result(gw, picked, refused)
}

/// 408 for a request whose body did not come in time; an HTTP/1 connection is closed after it
/// (RFC 9110 §15.5.9: the rest of the body may still be on its way).
fn request_timeout(detail: String, version: Version) -> Response {
    let mut resp = Problem::request_timeout(detail).into_response();
    if version < Version::HTTP_2 {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade`, HTTP/1.1).
///
/// Never `h2c`: the request is served as HTTP/1.1 instead (a server may ignore an upgrade,
/// RFC 9110 §7.8; RFC 9113 dropped this one). Passed on, an upstream that speaks h2c would
/// answer 101 and the client would have an HTTP/2 connection to it through the tunnel,
/// sending any number of requests the edge never routes, authenticates, limits or meters
/// ("h2c smuggling"). Clients that offer it by default (Java's `HttpClient` on `http://`,
/// `curl --http2`) carry on over HTTP/1.1.
fn upgrade_protocol(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let offered = headers.get(http::header::UPGRADE)?;
    let is_h2c = |(name, _): &(&str, &str)| name.eq_ignore_ascii_case("h2c");
    if !protocols(offered).any(|p| is_h2c(&p)) {
        return Some(offered.clone());
    }
    let rest: Vec<&str> = protocols(offered).filter(|p| !is_h2c(p)).map(|(_, as_sent)| as_sent).collect();
    if rest.is_empty() { None } else { HeaderValue::from_str(&rest.join(", ")).ok() }
}

/// The protocols an `Upgrade` value lists: each one's name (without its `/version`) and the
/// entry as sent (trimmed). A value that is not text lists none.
fn protocols(value: &HeaderValue) -> impl Iterator<Item = (&str, &str)> {
    value.to_str().unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()).map(|p| {
        let name = p.split('/').next().unwrap_or_default().trim();
        (name, p)
    })
}

/// Whether a 101's `Upgrade` (`headers`) names one of the protocols the client `asked` for
/// (by name; a version, `/13`, is not compared).
fn switched_as_asked(asked: &HeaderValue, headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::UPGRADE)
        .iter()
        .flat_map(protocols)
        .any(|(name, _)| protocols(asked).any(|(wanted, _)| wanted.eq_ignore_ascii_case(name)))
}

/// The bytes a finished tunnel carried, for metering: (client → upstream, upstream → client).
/// (Extensions must be `Clone`; the receiver is taken once, by metering.)
#[derive(Debug, Clone)]
pub struct TunnelDone(Arc<std::sync::Mutex<Option<TunnelBytes>>>);

/// Receives (client → upstream, upstream → client) bytes and the moment the tunnel closed
/// (taken by the tunnel's task as it closes, not when metering gets to it: the call's latency
/// ends there).
pub type TunnelBytes = tokio::sync::oneshot::Receiver<(u64, u64, std::time::Instant)>;

impl TunnelDone {
    pub fn take(&self) -> Option<TunnelBytes> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Answers 101 to the client and splices the two upgraded connections in a task until either
/// side closes (or the edge shuts down). Metering waits for [`TunnelDone`] so the call's event
/// carries the tunnel's whole duration and bytes.
fn tunnel(gw: &Arc<Gateway>, client_side: hyper::upgrade::OnUpgrade, upstream: &mut Response) -> Response {
    let upstream_side = hyper::upgrade::on(&mut *upstream);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let mut shutdown = gw.tunnels.subscribe();
    gw.metrics.tunnels_open.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let mut counts = (0, 0);
        if let (Ok(client), Ok(server)) = (client_side.await, upstream_side.await) {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut server = hyper_util::rt::TokioIo::new(server);
            let mut counted = CountingIo { inner: &mut client, read: 0, written: 0 };
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut counted, &mut server) => {
                    if let Err(e) = r { tracing::debug!(error = %e, "tunnel ended with an error"); }
                }
                _ = shutdown.wait_for(|closing| *closing) => tracing::debug!("tunnel closed by shutdown"),
            }
            counts = (counted.read, counted.written);
        }
        // Metering emits the call's event, then takes the tunnel off `tunnels_open`.
        let _ = done_tx.send((counts.0, counts.1, std::time::Instant::now()));
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = std::mem::take(upstream.headers_mut());
    resp.extensions_mut().insert(TunnelDone(Arc::new(std::sync::Mutex::new(Some(done_rx)))));
    resp
}

/// Counts the bytes read from and written to the client side of a tunnel.
struct CountingIo<'a, T> {
    inner: &'a mut T,
    read: u64,
    written: u64,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingIo<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingIo<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route(prefix: &str, upstream: &str, strip: bool) -> Route {
        let mut r = Route::with_defaults("r", prefix, &[upstream]).unwrap();
        r.strip_prefix = strip;
        r
    }

    #[test]
    fn upstream_target_joins_base_path_and_query() {
        let r = route("/echo", "http://127.0.0.1:8081", false);
        let t = &r.upstreams[0];
        let uri = |s: &'static str| Uri::from_static(s);
        assert_eq!(upstream_target(&r, t, &uri("/echo/a?x=1")).unwrap(), "/echo/a?x=1");
        assert_eq!(upstream_target(&r, t, &uri("/echo/a?")).unwrap(), "/echo/a?");
        // Absolute form (a client talking to the edge as to a forward proxy): origin form.
        assert_eq!(upstream_target(&r, t, &uri("http://api.example/echo/a?x=1")).unwrap(), "/echo/a?x=1");
        let r = route("/echo", "http://127.0.0.1:8081/base/", true);
        let t = &r.upstreams[0];
        assert_eq!(upstream_target(&r, t, &uri("/echo/a")).unwrap(), "/base/a");
        assert_eq!(upstream_target(&r, t, &uri("/echo")).unwrap(), "/base/");
        assert_eq!(upstream_target(&r, t, &uri("/echo/a?x=1&y")).unwrap(), "/base/a?x=1&y");
        let r = route("/echo", "http://127.0.0.1:8081/v2", false);
        assert_eq!(upstream_target(&r, &r.upstreams[0], &uri("/echo/a?x")).unwrap(), "/v2/echo/a?x");
    }

    #[test]
    fn a_stripped_prefix_takes_the_parameters_of_its_segments_with_it() {
        let r = route("/api/admin", "http://127.0.0.1:8081/base", true);
        let t = &r.upstreams[0];
        let uri = |s: &'static str| Uri::from_static(s);
        for (sent, forwarded) in [
            ("/api/admin/users", "/base/users"),
            ("/api/admin", "/base/"),
            ("/api/admin;jsessionid=1/users", "/base/users"),
            ("/api;v=2/admin;x/users;y?q=1", "/base/users;y?q=1"),
            ("/api/admin;x", "/base/"),
            // Matched only once `..;` was read as `..`: the resolved path, stripped.
            ("/api/public/..;/admin/users", "/base/users"),
        ] {
            assert_eq!(upstream_target(&r, t, &uri(sent)).unwrap(), forwarded, "{sent}");
        }
        // A route that ignores case strips its prefix in any case; the rest keeps its own.
        let mut r = route("/Api/Admin", "http://127.0.0.1:8081/base", true);
        r.ignore_case = true;
        let t = &r.upstreams[0];
        for (sent, forwarded) in [
            ("/API/ADMIN/Users", "/base/Users"),
            ("/api;v=1/admin/Users", "/base/Users"),
            ("/api/public/..;/ADMIN/Users", "/base/Users"),
        ] {
            assert_eq!(upstream_target(&r, t, &uri(sent)).unwrap(), forwarded, "{sent}");
        }
    }

    #[test]
    fn forwarded_for_replaces_untrusted_claims_and_extends_trusted_chains() {
        let peer = crate::Peer::new("10.0.0.7:5000".parse().unwrap(), false);
        let mut h = HeaderMap::new();
        assert_eq!(forwarded_for(&h, &peer, 0).unwrap(), "10.0.0.7");
        assert_eq!(forwarded_for(&h, &peer, 1).unwrap(), "10.0.0.7");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6, 203.0.113.9"));
        assert_eq!(forwarded_for(&h, &peer, 0).unwrap(), "10.0.0.7");
        assert_eq!(forwarded_for(&h, &peer, 1).unwrap(), "6.6.6.6, 203.0.113.9, 10.0.0.7");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.2"));
        assert_eq!(forwarded_for(&h, &peer, 2).unwrap(), "6.6.6.6, 203.0.113.9, 198.51.100.2, 10.0.0.7");
        let v6 = crate::Peer::new("[2001:db8::1]:443".parse().unwrap(), false);
        assert_eq!(forwarded_for(&HeaderMap::new(), &v6, 0).unwrap(), "2001:db8::1");
    }

    #[test]
    fn override_headers_are_removed_where_a_client_could_use_them() {
        let sent = || {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("forwarded", "for=6.6.6.6;host=admin.internal"),
                ("x-real-ip", "6.6.6.6"),
                ("x-forwarded-port", "8443"),
                ("x-forwarded-prefix", "/admin"),
                ("x-original-url", "/admin/delete"),
                ("x-rewrite-url", "/admin/delete"),
                ("x-http-method-override", "DELETE"),
                ("x-http-method", "DELETE"),
                ("x-method-override", "DELETE"),
                ("x-kept", "yes"),
                // Underscore twins (one header to CGI/WSGI/Rack applications): of the edge's
                // own headers, of overrides, of a claim header; and a plain underscore name.
                ("x-consumer_id", "admin"),
                ("x_forwarded_for", "6.6.6.6"),
                ("x-forwarded_host", "admin.internal"),
                ("x_api_key", "stolen"),
                ("x_original_url", "/admin"),
                ("x_forwarded_port", "8443"),
                ("x-user_email", "ceo@example.com"),
                ("x_kept_too", "yes"),
            ] {
                h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            h
        };
        let claim = |dashed: &str| dashed == "x-user-email";
        let left = |trusted_hops, methods_restricted| {
            let mut h = sent();
            scrub_request(&mut h, trusted_hops, methods_restricted, &claim);
            let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            names.sort_unstable();
            names.join(" ")
        };
        assert_eq!(left(0, true), "x-kept x_kept_too");
        assert_eq!(left(0, false), "x-http-method x-http-method-override x-kept x-method-override x_kept_too");
        assert_eq!(left(1, true), "forwarded x-forwarded-port x-forwarded-prefix x-kept x-real-ip x_kept_too");
        let mut plain = HeaderMap::new();
        plain.insert(HeaderName::from_static("x-kept"), HeaderValue::from_static("yes"));
        scrub_request(&mut plain, 0, true, &|_| false);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn a_switch_is_spliced_only_to_a_protocol_the_client_asked_for() {
        let switched = |asked: &'static str, answered: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(a) = answered {
                h.insert(http::header::UPGRADE, HeaderValue::from_static(a));
            }
            switched_as_asked(&HeaderValue::from_static(asked), &h)
        };
        assert!(switched("websocket", Some("websocket")));
        assert!(switched("websocket", Some("WebSocket")));
        assert!(switched("foo/2, websocket", Some("websocket")));
        assert!(switched("websocket/13", Some("websocket")));
        assert!(!switched("websocket", None));
        assert!(!switched("websocket", Some("h2c")));
        assert!(!switched("websocket", Some("")));
    }

    #[test]
    fn an_upgrade_to_h2c_is_never_passed_on() {
        let asked = |connection: &'static str, upgrade: &'static str, version| {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_static(connection));
            h.insert(http::header::UPGRADE, HeaderValue::from_static(upgrade));
            upgrade_protocol(&h, version)
        };
        let v11 = Version::HTTP_11;
        assert_eq!(asked("Upgrade", "websocket", v11).unwrap(), "websocket");
        assert_eq!(asked("keep-alive, Upgrade", "websocket", v11).unwrap(), "websocket");
        assert_eq!(asked("Upgrade, HTTP2-Settings", "h2c", v11), None);
        assert_eq!(asked("Upgrade, HTTP2-Settings", "H2C", v11), None);
        assert_eq!(asked("Upgrade", "h2c, websocket", v11).unwrap(), "websocket");
        assert_eq!(asked("Upgrade", "websocket,h2c/1", v11).unwrap(), "websocket");
        // Not asked for (no `Connection: upgrade`), or not HTTP/1.1.
        assert_eq!(asked("keep-alive", "websocket", v11), None);
        assert_eq!(asked("Upgrade", "websocket", Version::HTTP_10), None);
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
