//! tollgate edge: a thin gateway that authenticates (API keys, JWTs), rate-limits and forwards
//! HTTP traffic, and emits every call — rejected ones included — as an Avro `ApiCall` event
//! to Kafka without ever making a request wait for Kafka.
//!
//! The request path ([`handle`]) is one function calling each step in turn:
//! [`metering`] → [`hygiene`] → [`routing`] → [`auth`] → [`limit`] → [`proxy::forward`],
//! then back through metering. Refusals are RFC 9457 problem documents built in one place
//! ([`problem`]); their outcome reaches metering as [`CallInfo`] in the response extensions.

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod config;
pub mod cors;
pub mod forwarded;
pub mod hygiene;
pub mod limit;
pub mod metering;
pub mod metrics;
pub mod path;
pub mod problem;
pub mod proxy;
pub mod proxy_protocol;
pub mod queue;
pub mod quota;
pub mod redirect;
pub mod rewrite;
pub mod routing;
pub mod server;
pub mod silent;
pub mod telemetry;
pub use tollgate_common::tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::response::Response;
use tollgate_schemas::Outcome;

pub use config::Config;
pub use server::serve;

/// The part of the state that a config reload replaces as a whole.
#[derive(Debug)]
pub struct Runtime {
    pub routes: routing::RouteTable,
    pub keys: auth::KeyStore,
    pub jwt: auth::jwt::Verifier,
    pub plans: std::collections::HashMap<String, Arc<config::Plan>>,
    /// Rate limiters; a reload carries them over (spent budgets stay spent; a changed rate
    /// starts a fresh limiter).
    pub limiters: limit::LimiterCache,
    /// Upstream targets and their health, by route id; a reload keeps each target's health.
    pub pools: upstream::Pools,
    /// HTTPS on the traffic port: a reload rotates the certificate for new connections.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Client for the edge's own requests (JWKS), with the config's TLS settings.
    pub client: proxy::HttpClient,
    /// The HTTP limits and timeouts: per request, and for connections accepted from now on.
    pub http: config::HttpSettings,
    /// Headers on every answer (`edge.response_headers`).
    pub response_headers: Option<Arc<rewrite::HeaderRules>>,
    /// Every header the issuers' `claims_to_headers` write: taken off every request a client
    /// sends before the edge writes its own, so none can be forged.
    pub claim_headers: Box<[http::HeaderName]>,
}

impl Runtime {
    /// The runtime for `cfg`, taking its consumers (the config's own list is not needed
    /// afterwards: reloads read the files again); `previous` (on reload) lends the JWKS keys it
    /// already fetched.
    pub fn new(cfg: &mut Config, metrics: &metrics::Metrics, previous: Option<&Runtime>) -> Self {
        Self {
            pools: upstream::pools(&cfg.routes, previous.map(|p| &p.pools)),
            tls: cfg.tls_server.clone(),
            client: proxy::client(cfg.connect_timeout, &cfg.upstream_tls),
            routes: routing::RouteTable::new(&cfg.routes),
            keys: auth::KeyStore::new(&cfg.plans, std::mem::take(&mut cfg.consumers)),
            jwt: auth::jwt::Verifier::new(&cfg.jwt_issuers, previous.map(|p| &p.jwt), &metrics.jwt),
            plans: cfg.plans.clone(),
            limiters: match previous {
                Some(p) => p.limiters.carry_over(),
                None => limit::LimiterCache::new(Arc::clone(&metrics.limiters)),
            },
            http: cfg.http.clone(),
            response_headers: cfg.response_headers.clone(),
            claim_headers: {
                let mut names: Vec<_> =
                    cfg.jwt_issuers.iter().flat_map(|i| i.claims_to_headers.iter().map(|(_, n)| n.clone())).collect();
                names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
                names.dedup();
                names.into()
            },
        }
    }
}

/// State shared by the request path.
#[derive(Debug)]
pub struct Gateway {
    pub instance_id: String,
    /// Routes, keys and limiters; swapped on reload. A request takes one snapshot and keeps it,
    /// so in-flight requests finish with the config they started with.
    pub runtime: std::sync::RwLock<Arc<Runtime>>,
    /// Upstream clients (per worker thread and connect timeout), kept across reloads.
    pub clients: upstream::Clients,
    pub events: metering::EventSink,
    /// One JSON line per call (`edge.access_log`), kept across reloads.
    pub access_log: access_log::AccessLog,
    pub metrics: Arc<metrics::Metrics>,
    /// Monthly quota states from `quota-state` (kept across reloads).
    pub quotas: Arc<quota::QuotaTable>,
    /// OpenTelemetry spans are made (`telemetry.otlp_endpoint` set).
    pub telemetry: bool,
    /// Set to true at shutdown: open upgrade tunnels close.
    pub tunnels: tokio::sync::watch::Sender<bool>,
}

/// How a refusal ended a call, carried to metering in the response extensions (a forwarded
/// response carries none: its outcome is `forwarded`).
#[derive(Debug, Clone, Default)]
pub struct CallInfo {
    pub outcome: Option<Outcome>,
    /// Not a call: no event, no request metrics (a CORS preflight the edge answered).
    pub unmetered: bool,
}

impl Gateway {
    /// The current routes and keys.
    pub fn runtime(&self) -> Arc<Runtime> {
        Arc::clone(&self.runtime.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Replaces routes and keys (config reload).
    pub fn swap_runtime(&self, runtime: Runtime) {
        *self.runtime.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(runtime);
    }
}

impl CallInfo {
    /// The response's `CallInfo`, inserted if absent.
    pub fn of(resp: &mut Response) -> &mut CallInfo {
        resp.extensions_mut().get_or_insert_default::<CallInfo>()
    }
}

/// A connection's TCP peer, with its address as text made once per connection (for the
/// event and `X-Forwarded-For`), not once per request. Shared by the connection's requests
/// (one reference count per request, as a `HeaderValue` clone would be).
#[derive(Debug, Clone)]
pub struct Peer(Arc<PeerInfo>);

#[derive(Debug)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub ip_text: http::HeaderValue,
    /// The connection is HTTPS (the edge terminated TLS).
    pub tls: bool,
    /// SHA-256 fingerprint of the client certificate the TLS handshake verified (mutual TLS).
    pub client_cert: Option<[u8; 32]>,
    /// Requests started on the connection (its idle timer and timeout reasons read it).
    requests: std::sync::atomic::AtomicU64,
}

impl Peer {
    pub fn new(addr: SocketAddr, tls: bool) -> Self {
        Self::with_client_cert(addr, tls, None)
    }

    /// A TLS connection's peer with the fingerprint of its verified client certificate.
    pub fn with_client_cert(addr: SocketAddr, tls: bool, client_cert: Option<[u8; 32]>) -> Self {
        let text = forwarded::ip_text(addr.ip());
        let ip_text = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        Self(Arc::new(PeerInfo { addr, ip_text, tls, client_cert, requests: std::sync::atomic::AtomicU64::new(0) }))
    }

    /// Counts a request started on the connection. A load and a store, not a read-modify-write:
    /// only the connection's task writes it.
    fn request_started(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.requests.store(self.0.requests.load(Relaxed) + 1, Relaxed);
    }

    /// Requests started on the connection so far.
    pub fn requests(&self) -> u64 {
        self.0.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::ops::Deref for Peer {
    type Target = PeerInfo;

    fn deref(&self) -> &PeerInfo {
        &self.0
    }
}

/// The host the client addressed: the request target's authority when it has one (HTTP/2,
/// or an absolute-form HTTP/1.1 target), else the `Host` header (shared, not copied).
pub fn request_host<B>(req: &http::Request<B>) -> Option<http::HeaderValue> {
    // The request target's authority first (HTTP/2's `:authority`, HTTP/1.1's absolute form:
    // RFC 9112 §3.2.2, a `Host` beside it is ignored).
    match req.uri().authority() {
        Some(a) => http::HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(http::header::HOST).filter(|h| h.to_str().is_ok()).cloned(),
    }
}

/// The request path, one call from start to end: metering starts the call (event id,
/// trace, client address); framing and header checks; routing; authentication; rate limits
/// and the monthly quota; forwarding. Every answer — refusals included — goes back through
/// metering, which emits the call's event when the response body ends.
pub async fn handle(gw: Arc<Gateway>, peer: Peer, mut req: http::Request<hyper::body::Incoming>) -> Response {
    peer.request_started();
    // The path as routed, forwarded and metered (a refused one is metered as it came).
    let path = path::normalize_request(&mut req);
    // One config snapshot per request: in-flight requests finish with the config they
    // started with.
    let runtime = gw.runtime();
    let call = metering::Call::begin(gw, &runtime, &peer, &req);
    // One await point (with a disabled span when telemetry is off): each await of the request
    // path is a slot in the connection's future, moved on every request.
    let span = call.span.clone().unwrap_or_else(tracing::Span::none);
    let everywhere = runtime.response_headers.clone();
    let mut resp = tracing::Instrument::instrument(admit_and_forward(&call, runtime, &peer, req, path), span).await;
    if let Some(rules) = everywhere {
        // An upstream's answer carries no `CallInfo` (or one without an outcome).
        let forwarded = resp.extensions().get::<CallInfo>().is_none_or(|i| i.outcome.is_none() && !i.unmetered);
        if forwarded {
            for name in &rules.remove {
                resp.headers_mut().remove(name);
            }
        }
        rules.add_missing(resp.headers_mut());
    }
    call.finish(resp)
}

async fn admit_and_forward(
    call: &metering::Call,
    runtime: Arc<Runtime>,
    peer: &Peer,
    mut req: http::Request<hyper::body::Incoming>,
    path: Result<bool, path::BadPath>,
) -> Response {
    use axum::response::IntoResponse;
    let gw = call.gw();
    // Framing checks first: refuse smuggling-prone requests before anything acts on them.
    if let Some(refused) = hygiene::check(&runtime.http, &req) {
        return refused;
    }
    let encoded_slash = match path {
        Ok(encoded_slash) => encoded_slash,
        Err(bad) => return problem::Problem::bad_request(bad.detail()).into_response(),
    };
    // A CORS preflight for a route with a policy is answered here: not forwarded, not a call.
    if let Some((origin, method)) = cors::preflight_of(&req)
        && let Ok(route) = routing::route_as(&runtime, &req, &method)
        && let Some(policy) = &route.cors
    {
        let mut resp = policy.preflight(&origin);
        let refused = resp.status() != http::StatusCode::NO_CONTENT;
        gw.metrics.cors_preflights[usize::from(refused)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallInfo::of(&mut resp).unmetered = true;
        return resp;
    }
    let route = match routing::route(&runtime, &req) {
        Ok(route) => route,
        Err(no_match) => return routing::refusal(no_match, req.uri().path()),
    };
    let _ = call.route.set(Arc::clone(&route));
    // Only routes with a CORS policy look at `Origin`.
    let origin = route.cors.as_ref().and_then(|_| req.headers().get(http::header::ORIGIN).cloned());
    // The route's and the credential's address lists (`allowed_ips`), and authentication: a
    // refusal here gets the route's CORS headers too.
    let mut refusal = if encoded_slash && !route.allow_encoded_slashes {
        let detail = format!(
            "the path has an encoded slash or backslash (%2F, %5C), which route `{}` does not accept \
             (`routes[].allow_encoded_slashes`)",
            route.id
        );
        Some(problem::Problem::bad_request(detail).into_response())
    } else {
        route.allowed_ips.as_ref().and_then(|nets| address_refusal(nets, call.client_addr, "this route"))
    };
    // The route's limit for each client address comes before authentication: a client
    // flooding the route (failed credentials included, whose JWT signatures would each be
    // verified) is cut off cheaply.
    let mut client_limit = None;
    if refusal.is_none() {
        match limit::check_client(gw, &runtime, &route, call.client_addr) {
            None => {}
            Some(Ok(passed)) => client_limit = Some(passed),
            Some(Err(refused)) => refusal = Some(refused),
        }
    }
    let mut identity = None;
    if refusal.is_none() {
        match auth::admit(&runtime, &route, peer, &mut req).await {
            Ok(admitted) => identity = admitted,
            Err(refused) => refusal = Some(refused),
        }
    }
    if let Some(i) = &identity {
        let _ = call.identity.set(Arc::clone(i));
        if let Some(nets) = &i.allowed_ips {
            refusal = address_refusal(nets, call.client_addr, "this credential");
        }
        // The route is for some plans only (`allowed_plans`): checked before the limits, so a
        // refused call spends no budget.
        if refusal.is_none()
            && let Some(plans) = &route.allowed_plans
            && !plans.iter().any(|p| *p == i.plan.name)
        {
            let detail = format!("plan `{}` does not include route `{}`", i.plan.name, route.id);
            refusal = Some(problem::Problem::forbidden(detail).into_response());
        }
        if refusal.is_none()
            && let Some(required) = &route.required_scopes
            && !i.has_scopes(required)
        {
            refusal = Some(problem::Problem::insufficient_scope(required).into_response());
        }
    }
    if let Some(mut refused) = refusal {
        if let Some(policy) = &route.cors {
            policy.decorate(origin.as_ref(), refused.headers_mut());
        }
        if route.response_headers.always {
            route.response_headers.add_missing(refused.headers_mut());
        }
        return refused;
    }
    let ctx = proxy::Forward { runtime: &runtime, route: &route, identity: identity.as_deref(), call, peer };
    // Rate limits after authentication, so unauthenticated floods create no limiter state (an
    // anonymous call on a route with `auth = "none"` meets the route's shared limit only;
    // the per-client limit, passed above, is reported with them).
    let mut admission = (identity.is_some() || route.rate_limit.is_some() || client_limit.is_some())
        .then(|| limit::admit(gw, &runtime, identity.as_deref(), &route, client_limit));
    let mut resp = match admission.as_mut().and_then(|a| a.refusal.take()) {
        Some(refused) => refused,
        None => proxy::forward(gw, &ctx, req).await,
    };
    if let Some(mut admission) = admission {
        if let Some(slot) = admission.in_flight.take() {
            resp = resp.map(|body| slot.hold(body));
        }
        // Room for the rate-limit, quota and request-id headers: one allocation, not several.
        resp.headers_mut().reserve(10);
        admission.write_headers(resp.headers_mut());
    }
    if let Some(policy) = &route.cors {
        policy.decorate(origin.as_ref(), resp.headers_mut());
    }
    // The edge's own answers (an upstream's had the rules applied by the proxy).
    if route.response_headers.always {
        route.response_headers.add_missing(resp.headers_mut());
    }
    resp
}

/// 403 when `ip` is in none of `nets` (`whose`: whose list it is, for the detail).
fn address_refusal(nets: &[forwarded::IpNet], ip: std::net::IpAddr, whose: &str) -> Option<Response> {
    use axum::response::IntoResponse;
    (!nets.iter().any(|n| n.contains(ip))).then(|| {
        problem::Problem::forbidden(format!("{whose} may not be called from {ip} (allowed_ips)")).into_response()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_host_is_the_host_header_if_text_else_the_authority() {
        let req = |uri: &str, host: Option<&[u8]>| {
            let mut b = http::Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header(http::header::HOST, http::HeaderValue::from_bytes(h).unwrap());
            }
            b.body(()).unwrap()
        };
        assert_eq!(request_host(&req("/a", Some(b"api.example:8080"))).unwrap(), "api.example:8080");
        // HTTP/2 (or absolute form): the authority.
        assert_eq!(request_host(&req("http://h2.example/a", None)).unwrap(), "h2.example");
        // A Host that is not text (obs-text) is not taken; the authority is, if any.
        assert_eq!(request_host(&req("http://h2.example/a", Some(b"caf\xe9"))).unwrap(), "h2.example");
        assert_eq!(request_host(&req("/a", Some(b"caf\xe9"))), None);
        assert_eq!(request_host(&req("/a", None)), None);
    }

    #[test]
    fn peer_text_is_the_address_without_port() {
        assert_eq!(Peer::new("192.0.2.7:4000".parse().unwrap(), false).ip_text, "192.0.2.7");
        assert_eq!(Peer::new("[2001:db8::7]:4000".parse().unwrap(), false).ip_text, "2001:db8::7");
    }
}
