//! tollgate edge: a thin gateway that authenticates (API keys, JWTs), rate-limits and forwards
//! HTTP traffic, and emits every call — rejected ones included — as an Avro `ApiCall` event
//! to Kafka without ever making a request wait for Kafka.
//!
//! The request path ([`app`]) is a stack of layers, outermost first:
//! [`metering`] → [`hygiene`] → [`routing`] → [`auth`] → [`limit`] → [`proxy::forward`].
//! Refusals are RFC 9457 problem documents built in one place ([`problem`]). Each layer
//! reports what it learned (route, consumer, outcome) to metering through [`CallInfo`] in the
//! response extensions.

pub mod admin;
pub mod auth;
pub mod config;
pub mod forwarded;
pub mod hygiene;
pub mod limit;
pub mod metering;
pub mod metrics;
pub mod problem;
pub mod proxy;
pub mod quota;
pub mod routing;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Request;
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
    /// Rate limiters; a reload starts with fresh ones (full budgets).
    pub limiters: limit::LimiterCache,
    /// Upstream targets and their health, by route id; a reload starts them healthy.
    pub pools: std::collections::HashMap<String, Arc<upstream::Pool>>,
}

impl Runtime {
    /// The runtime for `cfg`; `previous` (on reload) lends the JWKS keys it already fetched.
    pub fn new(cfg: &Config, metrics: &metrics::Metrics, previous: Option<&Runtime>) -> Self {
        Self {
            pools: upstream::pools(&cfg.routes),
            routes: routing::RouteTable::new(&cfg.routes),
            keys: auth::KeyStore::new(cfg),
            jwt: auth::jwt::Verifier::new(&cfg.jwt_issuers, previous.map(|p| &p.jwt), &metrics.jwt),
            plans: cfg.plans.clone(),
            limiters: limit::LimiterCache::new(Arc::clone(&metrics.limiters)),
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
    /// Client for the edge's own requests (JWKS).
    pub client: proxy::HttpClient,
    /// Upstream clients (per worker thread and connect timeout), kept across reloads.
    pub clients: upstream::Clients,
    pub events: metering::EventSink,
    pub metrics: Arc<metrics::Metrics>,
    /// Monthly quota states from `quota-state` (kept across reloads).
    pub quotas: Arc<quota::QuotaTable>,
    /// See `edge.trusted_hops`.
    pub trusted_hops: usize,
    /// See `edge.max_body_bytes`.
    pub max_body_bytes: u64,
    /// See `edge.max_headers` (checked by the hygiene layer).
    pub max_headers: usize,
    /// See `edge.max_header_bytes` (checked by the hygiene layer).
    pub max_header_bytes: usize,
    /// OpenTelemetry spans are made (`telemetry.otlp_endpoint` set).
    pub telemetry: bool,
    /// Set to true at shutdown: open upgrade tunnels close.
    pub tunnels: tokio::sync::watch::Sender<bool>,
}

/// The TCP peer of the connection, put in every request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// What inner layers learned about a call, carried to metering in the response extensions.
#[derive(Debug, Clone, Default)]
pub struct CallInfo {
    pub route_id: Option<Arc<str>>,
    pub consumer_id: Option<Arc<str>>,
    pub credential_id: Option<Arc<str>>,
    pub plan: Option<Arc<config::Plan>>,
    pub outcome: Option<Outcome>,
    pub upstream_latency_us: Option<u64>,
}

impl Gateway {
    /// The current routes and keys.
    pub fn runtime(&self) -> Arc<Runtime> {
        Arc::clone(&self.runtime.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The snapshot the request took at routing (so one request sees one config), else the
    /// current one.
    pub fn runtime_of(&self, req: &Request) -> Arc<Runtime> {
        req.extensions().get::<Arc<Runtime>>().cloned().unwrap_or_else(|| self.runtime())
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

/// The host the client addressed: `Host` header, else the URI authority (HTTP/2).
pub fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

/// The request path as an axum router. Layers run top to bottom of this list.
pub fn app(gw: Arc<Gateway>) -> axum::Router {
    use axum::middleware::from_fn_with_state;
    axum::Router::new()
        .fallback(proxy::forward)
        // 5. Per-consumer rate limit: after auth, so unauthenticated floods create no state.
        .layer(from_fn_with_state(Arc::clone(&gw), limit::layer))
        // 4. Authentication: needs the route (public or not); strips credentials.
        .layer(from_fn_with_state(Arc::clone(&gw), auth::layer))
        // 3. Routing: early, so 404s are cheap and everything after knows the route.
        .layer(from_fn_with_state(Arc::clone(&gw), routing::layer))
        // 2. Framing checks: refuse smuggling-prone requests before anything acts on them.
        .layer(from_fn_with_state(Arc::clone(&gw), hygiene::layer))
        // 1. Metering: outermost, so every call — refused ones too — becomes an event
        //    with the real latency and byte counts.
        .layer(from_fn_with_state(Arc::clone(&gw), metering::layer))
        .with_state(gw)
}
