//! Edge configuration: a TOML file, overridable with `TOLLGATE_EDGE_<SECTION>__<KEY>`.
//! Deserialized into raw structs (unknown keys are errors), then validated into [`Config`].
//! The reference of every key is `docs/config.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Uri};
use serde::Deserialize;
use tollgate_common::config::{self, ConfigError};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_EDGE_";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// Consumers in a JSON Lines file (besides `[[consumers]]`); a top-level key, so it is
    /// written before the first table.
    #[serde(default)]
    consumers_file: Option<String>,
    #[serde(default)]
    edge: RawEdge,
    kafka: RawKafka,
    #[serde(default)]
    routes: Vec<RawRoute>,
    /// CORS policies routes name in `cors_policy`.
    #[serde(default)]
    cors_policies: BTreeMap<String, RawCors>,
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    consumers: Vec<RawConsumer>,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    jwt: RawJwt,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    #[serde(default)]
    otlp_endpoint: Option<String>,
    #[serde(default = "default_service_name")]
    service_name: String,
    #[serde(default = "default_sample_ratio")]
    sample_ratio: f64,
    #[serde(default = "default_export_timeout_ms")]
    export_timeout_ms: u64,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            sample_ratio: default_sample_ratio(),
            export_timeout_ms: default_export_timeout_ms(),
        }
    }
}

fn default_service_name() -> String {
    "tollgate-edge".to_owned()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_export_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default)]
    issuers: Vec<RawIssuer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    id: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    algorithms: Vec<String>,
    #[serde(default = "default_consumer_claim")]
    consumer_claim: String,
    #[serde(default = "default_leeway_s")]
    leeway_s: u64,
    #[serde(default)]
    default_plan: Option<String>,
    #[serde(default)]
    keys: Vec<RawJwtKey>,
    #[serde(default)]
    jwks_file: Option<String>,
    #[serde(default)]
    jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh_s")]
    jwks_refresh_s: u64,
    #[serde(default = "default_unknown_kid_cooldown_s")]
    unknown_kid_cooldown_s: u64,
    #[serde(default = "default_jwks_timeout_ms")]
    jwks_timeout_ms: u64,
    /// Claim name → header for the upstream.
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwtKey {
    #[serde(default)]
    kid: Option<String>,
    alg: String,
    #[serde(default)]
    pem_file: Option<String>,
    #[serde(default)]
    secret_file: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
}

fn default_consumer_claim() -> String {
    "sub".to_owned()
}
fn default_leeway_s() -> u64 {
    60
}
fn default_jwks_refresh_s() -> u64 {
    300
}
fn default_unknown_kid_cooldown_s() -> u64 {
    30
}
fn default_jwks_timeout_ms() -> u64 {
    2_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    #[serde(default = "default_spool_dir")]
    dir: String,
    #[serde(default = "default_spool_max_bytes")]
    max_bytes: u64,
    #[serde(default = "default_fsync")]
    fsync: String,
    #[serde(default = "default_fsync_interval_ms")]
    fsync_interval_ms: u64,
}

impl Default for RawSpool {
    fn default() -> Self {
        Self {
            dir: default_spool_dir(),
            max_bytes: default_spool_max_bytes(),
            fsync: default_fsync(),
            fsync_interval_ms: default_fsync_interval_ms(),
        }
    }
}

fn default_spool_dir() -> String {
    "tollgate-spool".to_owned()
}
fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_fsync() -> String {
    "interval".to_owned()
}
fn default_fsync_interval_ms() -> u64 {
    100
}
fn default_message_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_admin_listen")]
    admin_listen: String,
    #[serde(default = "default_shutdown_grace_ms")]
    shutdown_grace_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_header_read_timeout_ms")]
    header_read_timeout_ms: u64,
    #[serde(default = "default_body_read_timeout_ms")]
    body_read_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    idle_timeout_ms: u64,
    #[serde(default = "default_http2_keepalive_interval_ms")]
    http2_keepalive_interval_ms: u64,
    #[serde(default = "default_http2_keepalive_timeout_ms")]
    http2_keepalive_timeout_ms: u64,
    #[serde(default = "default_max_headers")]
    max_headers: usize,
    #[serde(default = "default_max_header_bytes")]
    max_header_bytes: usize,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default)]
    trusted_hops: usize,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    proxy_protocol_from: Vec<String>,
    #[serde(default)]
    response_headers: RawHeaderRules,
    #[serde(default)]
    tls_ca_file: Option<String>,
    #[serde(default)]
    tls_cert_file: Option<String>,
    #[serde(default)]
    tls_key_file: Option<String>,
    #[serde(default)]
    tls_certificates: Vec<RawTlsCertificate>,
    #[serde(default)]
    tls_client_ca_file: Option<String>,
    #[serde(default)]
    upstream_tls_cert_file: Option<String>,
    #[serde(default)]
    upstream_tls_key_file: Option<String>,
    #[serde(default)]
    http_redirect_listen: Option<String>,
    #[serde(default)]
    https_public_port: Option<u16>,
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    access_log: Option<String>,
}

/// `[[edge.tls_certificates]]`: a certificate chosen by the name the client asks for (SNI).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsCertificate {
    cert_file: String,
    key_file: String,
}

impl Default for RawEdge {
    fn default() -> Self {
        Self {
            instance_id: None,
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            http2_keepalive_interval_ms: default_http2_keepalive_interval_ms(),
            http2_keepalive_timeout_ms: default_http2_keepalive_timeout_ms(),
            max_headers: default_max_headers(),
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            trusted_hops: 0,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            access_log: None,
            response_headers: RawHeaderRules::default(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_certificates: Vec::new(),
            tls_client_ca_file: None,
            upstream_tls_cert_file: None,
            upstream_tls_key_file: None,
            http_redirect_listen: None,
            https_public_port: None,
            worker_threads: None,
            max_connections: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    brokers: String,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default = "default_message_timeout_ms")]
    message_timeout_ms: u64,
    #[serde(default = "default_quota_topic")]
    quota_topic: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    id: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    upstreams: Vec<RawTarget>,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    allow_encoded_slashes: bool,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default = "default_auth")]
    auth: AuthNames,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default = "default_max_fails")]
    max_fails: u32,
    #[serde(default = "default_fail_timeout_ms")]
    fail_timeout_ms: u64,
    #[serde(default)]
    cors: Option<RawCors>,
    /// The name of a `[cors_policies.<name>]` table, instead of `cors`.
    #[serde(default)]
    cors_policy: Option<String>,
    /// Overrides `edge.max_body_bytes` for the route.
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    request_headers: RawHeaderRules,
    #[serde(default)]
    response_headers: RawHeaderRules,
    #[serde(default)]
    health_check: Option<RawHealthCheck>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    #[serde(default)]
    upstream_protocol: Option<String>,
    /// A limit for all the route's calls together (every consumer, and anonymous callers).
    #[serde(default)]
    rate_limit: Option<RawRate>,
    /// A limit for each client address's calls to the route (authenticated or not).
    #[serde(default)]
    rate_limit_per_client: Option<RawRate>,
    /// Only consumers on these plans may call the route.
    #[serde(default)]
    allowed_plans: Option<Vec<String>>,
    /// How long a call waits for a place under `max_in_flight` (the route's or a target's).
    #[serde(default)]
    queue_timeout_ms: u64,
    /// The longest line of calls waiting (each queue: the route's places, its targets').
    #[serde(default)]
    max_queued: Option<u32>,
    /// Scopes a JWT must grant to call the route.
    #[serde(default)]
    required_scopes: Option<Vec<String>>,
}

/// `routes[].health_check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: String,
    #[serde(default = "default_health_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_health_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_health_threshold")]
    fails: u32,
    #[serde(default = "default_health_threshold")]
    passes: u32,
}
fn default_health_threshold() -> u32 {
    1
}
fn default_health_interval_ms() -> u64 {
    5_000
}
fn default_health_timeout_ms() -> u64 {
    1_000
}

/// Active health checks of a route's targets (`routes[].health_check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path (and query) asked of each target, on the target's scheme and authority.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that take a target out of service.
    pub fails: u32,
    /// Passed checks in a row that bring a target back.
    pub passes: u32,
}

/// `routes[].request_headers`, `routes[].response_headers`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderRules {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    always: bool,
}

/// `routes[].cors`, or a `[cors_policies.<name>]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    allow_origins: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default = "default_cors_max_age_s")]
    max_age_s: u32,
    #[serde(default)]
    allow_credentials: bool,
}

fn default_cors_max_age_s() -> u32 {
    600
}

impl From<RawCors> for crate::cors::CorsSettings {
    fn from(c: RawCors) -> Self {
        Self {
            allow_origins: c.allow_origins,
            allow_headers: c.allow_headers,
            expose_headers: c.expose_headers,
            max_age_s: c.max_age_s,
            allow_credentials: c.allow_credentials,
        }
    }
}

fn default_retries() -> u32 {
    1
}
fn default_max_fails() -> u32 {
    3
}
fn default_fail_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    rate_per_second: u32,
    #[serde(default)]
    burst: Option<u32>,
    /// Per-route limits of this plan, by route id, on top of the plan-wide one.
    #[serde(default)]
    routes: BTreeMap<String, RawRate>,
    #[serde(default)]
    max_in_flight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    rate_per_second: u32,
    #[serde(default)]
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    id: String,
    plan: String,
    #[serde(default)]
    keys: Vec<RawKey>,
    /// Client certificates (mutual TLS), by fingerprint.
    #[serde(default)]
    certificates: Vec<RawKey>,
    #[serde(default)]
    allowed_ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    sha256: String,
    /// Addresses this credential works from, within the consumer's (empty: the consumer's).
    #[serde(default)]
    allowed_ips: Vec<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9901".to_owned()
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    10_000
}
fn default_http2_keepalive_interval_ms() -> u64 {
    30_000
}
fn default_http2_keepalive_timeout_ms() -> u64 {
    // hyper's.
    20_000
}
fn default_idle_timeout_ms() -> u64 {
    // nginx's former `http2_idle_timeout`.
    180_000
}
fn default_max_headers() -> usize {
    // Below the parser's own default (100), which then needs no per-request buffer
    // (see `hygiene::parser_max_headers`).
    64
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}

/// File descriptors kept for what is not a client connection: listeners, the spool, Kafka,
/// JWKS and OTLP clients, and the idle upstream connections beyond one per client.
const RESERVED_FILES: u64 = 256;
/// `edge.max_connections` when not set: 10,000, or fewer when the process may not open that
/// many files — each client connection can hold an upstream connection too, so half of what the
/// open-file limit leaves after [`RESERVED_FILES`] (at least 64).
pub fn default_max_connections(open_files: Option<u64>) -> usize {
    let fit = open_files.map_or(u64::MAX, |n| n.saturating_sub(RESERVED_FILES) / 2).max(64);
    usize::try_from(fit.min(10_000)).unwrap_or(10_000)
}

/// The process's soft limit of open files (`Max open files` in `/proc/self/limits`); `None`
/// when unknown or unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_true() -> bool {
    true
}
fn default_topic() -> String {
    tollgate_schemas::topics::API_CALLS.to_owned()
}
fn default_quota_topic() -> String {
    tollgate_schemas::topics::QUOTA_STATE.to_owned()
}
fn default_queue_capacity() -> usize {
    65_536
}
fn default_auth() -> AuthNames {
    AuthNames(vec!["api_key".to_owned()])
}

/// `routes[].auth`: one name or a list of names.
#[derive(Debug)]
struct AuthNames(Vec<String>);

impl<'de> Deserialize<'de> for AuthNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(s)) => Ok(Self(vec![s])),
            Ok(OneOrMany::Many(v)) => Ok(Self(v)),
            Err(_) => Err(serde::de::Error::custom("must be a name or a list of names (api_key, jwt, mtls, none)")),
        }
    }
}
/// `routes[].upstreams[]`: a URL, or `{ url, weight, max_in_flight }`.
#[derive(Debug)]
struct RawTarget {
    url: String,
    weight: u32,
    max_in_flight: Option<u32>,
}

impl<'de> Deserialize<'de> for RawTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Weighted {
            url: String,
            #[serde(default = "default_weight")]
            weight: u32,
            #[serde(default)]
            max_in_flight: Option<u32>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum UrlOrTable {
            Url(String),
            Weighted(Weighted),
        }
        match UrlOrTable::deserialize(d) {
            Ok(UrlOrTable::Url(url)) => Ok(Self { url, weight: default_weight(), max_in_flight: None }),
            Ok(UrlOrTable::Weighted(w)) => Ok(Self { url: w.url, weight: w.weight, max_in_flight: w.max_in_flight }),
            Err(_) => Err(serde::de::Error::custom(
                "must be a URL or a table { url = \"http(s)://host[:port][/base]\", weight = N, max_in_flight = N }",
            )),
        }
    }
}
fn default_weight() -> u32 {
    1
}
/// The largest `routes[].upstreams[].weight`.
pub const MAX_WEIGHT: u32 = 1000;

fn default_timeout_ms() -> u64 {
    30_000
}

/// The `[edge]` settings for client connections and requests. A reload applies them: per
/// request (the header limits, `trusted_hops`, `body_read_timeout`) or to the connections
/// accepted after it (the header-read and idle timeouts, HTTP/2 keep-alive, the parser's
/// backstop limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// A client must send the whole request head within this time, or is disconnected.
    pub header_read_timeout: Duration,
    /// A request body with no bytes for this long fails the call (408).
    pub body_read_timeout: Duration,
    /// A connection on which no request has started for this long is closed gracefully
    /// (HTTP/2's idle connections; HTTP/1.1's are closed by `header_read_timeout` first).
    pub idle_timeout: Duration,
    /// HTTP/2: a PING after this long without a frame from the client (`None`: never), and
    /// the connection closed when its answer does not come within `http2_keepalive_timeout`.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    /// More header fields than this: 431.
    pub max_headers: usize,
    /// A request head larger than this: 431.
    pub max_header_bytes: usize,
    /// Proxies in front of the edge whose `X-Forwarded-For` entries are trusted (0: use the
    /// TCP peer).
    pub trusted_hops: usize,
    /// Every connection on the traffic and redirect ports starts with a PROXY protocol header
    /// (v1 or v2) naming the client (`edge.proxy_protocol`; `crate::proxy_protocol`).
    pub proxy_protocol: bool,
    /// The balancers whose PROXY headers are believed (`edge.proxy_protocol_from`); from
    /// other peers the header is read and its address ignored. `None`: any peer.
    pub proxy_protocol_from: Option<Arc<[crate::forwarded::IpNet]>>,
}

/// Validated edge configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub instance_id: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub connect_timeout: Duration,
    /// The HTTP limits and timeouts of `[edge]` (applied by reloads too).
    pub http: HttpSettings,
    /// Extra trusted CA certificates for https upstreams, JWKS URLs and the OTLP collector
    /// (`edge.tls_ca_file`), besides Mozilla's roots.
    pub tls_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// HTTPS on the traffic port (`edge.tls_cert_file` and `edge.tls_key_file`); `None`:
    /// plain HTTP.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// The TLS files a reload reads again, so reloads watch them: the certificate and key
    /// files of `tls_server` and its client CA file, `edge.tls_ca_file` and the upstream
    /// client certificate and key.
    pub tls_files: Vec<PathBuf>,
    /// `tls_server` asks clients for a certificate (`edge.tls_client_ca_file`).
    pub mutual_tls: bool,
    /// Headers on every answer (`edge.response_headers`): `set` added where missing, `remove`
    /// from the upstreams' answers. `None`: no rule.
    pub response_headers: Option<Arc<crate::rewrite::HeaderRules>>,
    /// One JSON line per call (`edge.access_log`): stdout or a file; `None`: off.
    pub access_log: Option<crate::access_log::Destination>,
    /// The client certificate the edge presents to https upstreams that ask for one
    /// (`edge.upstream_tls_cert_file` and `_key_file`).
    pub upstream_identity: Option<Arc<rustls::sign::CertifiedKey>>,
    /// The TLS client configuration of upstream connections and the edge's own requests
    /// (JWKS): `tls_ca` and `upstream_identity`. Applied by reloads to new connections.
    pub upstream_tls: Arc<rustls::ClientConfig>,
    /// A plain-HTTP port answering every request with a redirect to HTTPS
    /// (`edge.http_redirect_listen`).
    pub http_redirect: Option<crate::redirect::HttpRedirect>,
    /// Threads serving requests, each with its own runtime, listener and upstream pools.
    pub worker_threads: usize,
    /// Client connections open at once on the traffic port (all workers together); at the
    /// limit the workers stop accepting until one closes.
    pub max_connections: usize,
    pub kafka: KafkaConfig,
    pub routes: Vec<Arc<Route>>,
    pub plans: HashMap<String, Arc<Plan>>,
    pub consumers: Vec<Consumer>,
    /// The JSON Lines file the consumers after `[[consumers]]` came from (reloads watch it).
    pub consumers_file: Option<PathBuf>,
    pub spool: crate::metering::spool::SpoolConfig,
    pub jwt_issuers: Vec<Arc<JwtIssuer>>,
    pub telemetry: TelemetryConfig,
}

/// OpenTelemetry trace export (`[telemetry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces URL (e.g. `http://collector:4318/v1/traces`); `None`: no spans.
    pub otlp_endpoint: Option<Uri>,
    pub service_name: String,
    /// Fraction of new traces sampled; a client's sampled flag is followed.
    pub sample_ratio: f64,
    pub export_timeout: Duration,
}

/// A trusted JWT issuer (`[[jwt.issuers]]`).
#[derive(Debug, Clone)]
pub struct JwtIssuer {
    /// Name in config and in events' `credential_id` (`jwt:<id>`).
    pub id: String,
    /// The exact `iss` claim of its tokens.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Algorithms accepted from this issuer, fixed here: never taken from the token alone.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Claim holding the consumer id.
    pub consumer_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
    /// Plan of consumers that are not in `consumers`; `None`: such tokens get 403.
    pub default_plan: Option<String>,
    /// Keys from the config (PEM files, shared secrets) and from `jwks_file` at load time.
    pub keys: Vec<crate::auth::jwt::JwtKey>,
    /// Where a JSON Web Key Set is (re)loaded from.
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
    /// At most one JWKS fetch per this interval for tokens whose `kid` is unknown.
    pub unknown_kid_cooldown: Duration,
    pub jwks_timeout: Duration,
    /// Claims passed to the upstream as headers (`claims_to_headers`: claim → header).
    pub claims_to_headers: Vec<(String, http::HeaderName)>,
}

/// A JSON Web Key Set's location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(std::path::PathBuf),
    /// `http://` URL.
    Url(Uri),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// False: metering is off (benchmarks only); no event is produced.
    pub enabled: bool,
    pub brokers: String,
    pub topic: String,
    /// Events buffered between the request path and the producer.
    pub queue_capacity: usize,
    /// How long librdkafka keeps trying one message before it is spooled.
    pub message_timeout: Duration,
    /// Monthly quota states from the aggregator (empty: quotas are not enforced).
    pub quota_topic: String,
    pub properties: BTreeMap<String, String>,
}

/// Which credentials a route accepts: any one of them is needed, unless it is public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMode(u8);

impl AuthMode {
    pub const API_KEY: Self = Self(1);
    pub const JWT: Self = Self(2);
    /// A client certificate (mutual TLS) registered to a consumer.
    pub const MTLS: Self = Self(4);
    pub const API_KEY_OR_JWT: Self = Self(1 | 2);
    /// Public route: no credential needed (an API key or JWT sent is still checked; a client
    /// certificate is not looked at).
    pub const NONE: Self = Self(8 | 1 | 2);

    /// The mode of `auth = "…"` (one name) or `auth = ["…", …]` (any of them).
    pub fn parse(names: &[String]) -> Result<Self, String> {
        let mut bits = 0;
        for n in names {
            bits |= match n.as_str() {
                "api_key" => Self::API_KEY.0,
                "jwt" => Self::JWT.0,
                "mtls" => Self::MTLS.0,
                "api_key_or_jwt" => Self::API_KEY_OR_JWT.0,
                "none" if names.len() == 1 => Self::NONE.0,
                "none" => return Err("`none` (a public route) cannot be combined with credentials".into()),
                other => return Err(format!("`{other}` is not one of api_key, jwt, mtls, api_key_or_jwt, none")),
            };
        }
        if bits == 0 {
            return Err("must name at least one of api_key, jwt, mtls (or none)".into());
        }
        Ok(Self(bits))
    }

    pub fn accepts_api_key(self) -> bool {
        self.0 & Self::API_KEY.0 != 0
    }
    pub fn accepts_jwt(self) -> bool {
        self.0 & Self::JWT.0 != 0
    }
    pub fn accepts_mtls(self) -> bool {
        self.0 & Self::MTLS.0 != 0
    }
    /// A request without any credential passes.
    pub fn is_public(self) -> bool {
        self.0 & 8 != 0
    }
    /// Only JWTs: needs an issuer.
    pub fn jwt_only(self) -> bool {
        self == Self::JWT
    }

    /// What the route accepts, for refusals: "API keys", "JWTs or client certificates"…
    pub fn accepted(self) -> &'static str {
        match (self.accepts_api_key(), self.accepts_jwt(), self.accepts_mtls()) {
            (true, false, false) => "API keys",
            (false, true, false) => "JWT bearer tokens",
            (false, false, true) => "client certificates (mutual TLS)",
            (true, true, false) => "API keys and JWTs",
            (true, false, true) => "API keys and client certificates",
            (false, true, true) => "JWTs and client certificates",
            _ => "API keys, JWTs and client certificates",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub id: String,
    /// `id` shared, as the rate limiters' key (made once, not per call).
    pub id_key: Arc<str>,
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// Starts with `/`; matches itself and anything below it at a segment boundary.
    pub path_prefix: String,
    /// True when the route came from `path`: it matches that path only.
    pub exact: bool,
    /// Empty: any method.
    pub methods: Vec<Method>,
    /// Targets, `http://authority[/base]` without query, chosen round robin.
    pub upstreams: Vec<Uri>,
    /// Each target's share of the requests, relative to the others' (weighted round robin;
    /// 0: none, a drained target).
    pub weights: Vec<u32>,
    /// Each target's calls in flight at once, per edge (`upstreams[].max_in_flight`, nginx's
    /// `max_conns`): a target at its limit is passed over. `None`: no limit.
    pub target_max_in_flight: Vec<Option<u32>>,
    /// Each target as `scheme://authority`: its connection-pool key and its name in events
    /// (`upstream_target`).
    pub target_keys: Vec<Arc<str>>,
    pub strip_prefix: bool,
    /// Paths with an encoded slash or backslash (`%2F`, `%5C`) are forwarded instead of
    /// refused (`crate::path`).
    pub allow_encoded_slashes: bool,
    /// The path matches (and `strip_prefix` strips) whatever the case of its letters
    /// (`routes[].ignore_case`: for upstreams that read `/ADMIN` as `/admin`, such as IIS).
    pub ignore_case: bool,
    pub auth: AuthMode,
    /// Time allowed for the upstream's response head (over all attempts).
    pub timeout: Duration,
    /// TCP connect timeout to a target.
    pub connect_timeout: Duration,
    /// Further attempts on another target, for idempotent requests without a body whose
    /// connection could not be established (the request never reached an upstream).
    pub retries: u32,
    /// Consecutive failures that eject a target.
    pub max_fails: u32,
    /// How long an ejected target is left alone before a probe request.
    pub fail_timeout: Duration,
    /// Browser clients from other origins (`routes[].cors`).
    pub cors: Option<Arc<crate::cors::Cors>>,
    /// Addresses that may call the route (`None`: any).
    pub allowed_ips: Option<Arc<[crate::forwarded::IpNet]>>,
    /// A larger request body gets 413 (`routes[].max_body_bytes`, else `edge.max_body_bytes`).
    pub max_body_bytes: u64,
    /// Headers set on or removed from the request to the upstream.
    pub request_headers: crate::rewrite::HeaderRules,
    /// Headers set on or removed from the upstream's answers.
    pub response_headers: crate::rewrite::HeaderRules,
    /// Active health checks of the targets; `None`: passive health only.
    pub health_check: Option<HealthCheck>,
    /// Calls to the route's upstream at once (per edge); more get 503. `None`: no limit.
    pub max_in_flight: Option<u32>,
    /// How long a call waits for a place under the route's or its targets' `max_in_flight`
    /// before the 503 (`routes[].queue_timeout_ms`). `None`: refused at once.
    pub queue_timeout: Option<Duration>,
    /// At most this many calls wait in each of the route's queues (`routes[].max_queued`);
    /// more are refused at once.
    pub max_queued: Option<u32>,
    /// The route's rate for all its callers together (`routes[].rate_limit`), per edge; on
    /// top of each consumer's plan limits. `None`: no such limit.
    pub rate_limit: Option<Rate>,
    /// Each client address's rate on the route (`routes[].rate_limit_per_client`; IPv6 by
    /// /64), per edge, checked before authentication. `None`: no such limit.
    pub client_rate_limit: Option<Rate>,
    /// Only consumers on these plans may call the route (`routes[].allowed_plans`; others get
    /// 403). `None`: every plan.
    pub allowed_plans: Option<Arc<[String]>>,
    /// Scopes the caller's JWT must all grant (`routes[].required_scopes`; the route takes JWTs
    /// only). `None`: no scope is needed.
    pub required_scopes: Option<Arc<[String]>>,
    /// The targets speak HTTP/2 (`upstream_protocol = "h2"`), else HTTP/1.1.
    pub upstream_h2: bool,
}

/// A GCRA rate: `rate_per_second` sustained, `burst` at once.
impl Route {
    /// A route to `upstreams` on `path_prefix` with default settings (tests).
    pub fn with_defaults(id: &str, path_prefix: &str, upstreams: &[&str]) -> Result<Self, http::uri::InvalidUri> {
        let route = Self {
            id: id.into(),
            id_key: Arc::from(id),
            host: None,
            path_prefix: path_prefix.into(),
            exact: false,
            methods: Vec::new(),
            upstreams: upstreams.iter().map(|u| u.parse()).collect::<Result<_, _>>()?,
            weights: vec![1; upstreams.len()],
            target_max_in_flight: vec![None; upstreams.len()],
            target_keys: Vec::new(),
            strip_prefix: false,
            allow_encoded_slashes: false,
            ignore_case: false,
            auth: AuthMode::API_KEY,
            timeout: Duration::from_millis(default_timeout_ms()),
            connect_timeout: Duration::from_millis(default_connect_timeout_ms()),
            retries: default_retries(),
            max_fails: default_max_fails(),
            fail_timeout: Duration::from_millis(default_fail_timeout_ms()),
            cors: None,
            allowed_ips: None,
            max_body_bytes: default_max_body_bytes(),
            request_headers: crate::rewrite::HeaderRules::default(),
            response_headers: crate::rewrite::HeaderRules::default(),
            health_check: None,
            max_in_flight: None,
            queue_timeout: None,
            max_queued: None,
            rate_limit: None,
            client_rate_limit: None,
            allowed_plans: None,
            required_scopes: None,
            upstream_h2: false,
        };
        Ok(route.with_target_keys())
    }

    /// The route with its `target_keys` made from its targets.
    fn with_target_keys(mut self) -> Self {
        self.target_keys = self
            .upstreams
            .iter()
            .map(|u| {
                Arc::from(format!(
                    "{}://{}",
                    u.scheme_str().unwrap_or("http"),
                    u.authority().map_or("", |a| a.as_str())
                ))
            })
            .collect();
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub rate_per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    /// Limit over all of a consumer's calls.
    pub limit: Rate,
    /// Extra limits on single routes, by route id; a call must pass both.
    pub routes: HashMap<String, Rate>,
    /// A consumer's calls in flight at once (per edge); more get 429. `None`: no limit.
    pub max_in_flight: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Consumer {
    pub id: String,
    pub plan: String,
    pub keys: Vec<ApiKey>,
    /// Client certificates (mutual TLS): `sha256` is the certificate's fingerprint.
    pub certificates: Vec<ApiKey>,
    /// Addresses the consumer may call from (empty: any).
    pub allowed_ips: Vec<crate::forwarded::IpNet>,
}

/// A credential registered by its SHA-256: an API key's, or a client certificate's (of its DER
/// encoding).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    /// SHA-256 of the key as the client sends it, or of the certificate.
    pub sha256: [u8; 32],
    /// Addresses this credential works from (its own list within the consumer's; empty: the
    /// consumer's list).
    pub allowed_ips: Box<[crate::forwarded::IpNet]>,
}

impl Config {
    pub fn load(path: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let text = config::read(path)?;
        Self::parse_from(&text, &path.display().to_string(), path.parent().unwrap_or(Path::new(".")), env)
    }

    /// Parses a config text; relative file paths in it are relative to the working directory.
    pub fn parse(text: &str, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        Self::parse_from(text, "<inline>", Path::new("."), env)
    }

    fn parse_from(text: &str, origin: &str, base: &Path, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        // `[[consumers]]` tables are parsed one at a time: 100,000 of them would otherwise
        // take ~490 MB of document tree at every load and reload.
        let (raw, tables) = config::parse_split::<Raw>(text, origin, ENV_PREFIX, env, "consumers")?;
        validate(raw, tables, origin, base, env)
    }
}

fn rate(
    rate_per_second: u32,
    burst: Option<u32>,
    key: &dyn Fn(&str) -> String,
    origin: &str,
) -> Result<Rate, ConfigError> {
    let rate = NonZeroU32::new(rate_per_second)
        .ok_or_else(|| ConfigError::invalid(origin, key("rate_per_second"), "must be at least 1"))?;
    let burst = match burst {
        None => rate,
        Some(b) => {
            NonZeroU32::new(b).ok_or_else(|| ConfigError::invalid(origin, key("burst"), "must be at least 1"))?
        }
    };
    Ok(Rate { rate_per_second: rate, burst })
}

fn validate(
    raw: Raw,
    tables: config::ArrayTables<'_>,
    origin: &str,
    base: &Path,
    env: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let err = |key: String, reason: String| ConfigError::invalid(origin, key, reason);
    let addr = |key: &str, v: &str| -> Result<SocketAddr, ConfigError> {
        v.parse().map_err(|e| err(key.to_owned(), format!("`{v}` is not an ip:port address: {e}")))
    };
    let listen = addr("edge.listen", &raw.edge.listen)?;
    let admin_listen = addr("edge.admin_listen", &raw.edge.admin_listen)?;
    let instance_id = match raw.edge.instance_id {
        Some(id) if id.trim().is_empty() => return Err(err("edge.instance_id".into(), "must not be empty".into())),
        Some(id) => id,
        None => std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "edge".to_owned()),
    };
    if raw.kafka.enabled && raw.kafka.brokers.trim().is_empty() {
        return Err(err(
            "kafka.brokers".into(),
            "must list at least one host:port (or set kafka.enabled = false)".into(),
        ));
    }
    if raw.kafka.topic.trim().is_empty() {
        return Err(err("kafka.topic".into(), "must not be empty".into()));
    }
    if raw.kafka.queue_capacity == 0 {
        return Err(err("kafka.queue_capacity".into(), "must be at least 1".into()));
    }

    if raw.edge.header_read_timeout_ms == 0 {
        return Err(err("edge.header_read_timeout_ms".into(), "must be at least 1".into()));
    }
    let header_read_timeout = Duration::from_millis(raw.edge.header_read_timeout_ms);
    if !raw.edge.proxy_protocol_from.is_empty() && !raw.edge.proxy_protocol {
        return Err(err(
            "edge.proxy_protocol_from".into(),
            "needs proxy_protocol = true (the balancers it names send PROXY protocol headers)".into(),
        ));
    }
    let proxy_protocol_from = if raw.edge.proxy_protocol_from.is_empty() {
        None
    } else {
        Some(ip_nets(&raw.edge.proxy_protocol_from, &|j| format!("edge.proxy_protocol_from[{j}]"), origin)?.into())
    };
    if raw.edge.body_read_timeout_ms == 0 {
        return Err(err("edge.body_read_timeout_ms".into(), "must be at least 1".into()));
    }
    if raw.edge.idle_timeout_ms == 0 {
        return Err(err("edge.idle_timeout_ms".into(), "must be at least 1".into()));
    }
    if raw.edge.http2_keepalive_timeout_ms == 0 {
        return Err(err("edge.http2_keepalive_timeout_ms".into(), "must be at least 1".into()));
    }
    if !(1..=1000).contains(&raw.edge.max_headers) {
        return Err(err("edge.max_headers".into(), "must be between 1 and 1000".into()));
    }
    if raw.edge.max_header_bytes < 1024 {
        return Err(err("edge.max_header_bytes".into(), "must be at least 1024".into()));
    }
    if raw.kafka.message_timeout_ms < 1_000 {
        return Err(err("kafka.message_timeout_ms".into(), "must be at least 1000".into()));
    }
    let message_timeout = Duration::from_millis(raw.kafka.message_timeout_ms);
    if raw.spool.dir.trim().is_empty() {
        return Err(err("spool.dir".into(), "must not be empty".into()));
    }
    if raw.spool.max_bytes < 1 << 20 {
        return Err(err("spool.max_bytes".into(), "must be at least 1048576 (1 MiB)".into()));
    }
    let fsync = match raw.spool.fsync.as_str() {
        "always" => crate::metering::spool::FsyncPolicy::Always,
        "interval" if raw.spool.fsync_interval_ms > 0 => {
            crate::metering::spool::FsyncPolicy::Interval(Duration::from_millis(raw.spool.fsync_interval_ms))
        }
        "interval" => return Err(err("spool.fsync_interval_ms".into(), "must be at least 1".into())),
        other => return Err(err("spool.fsync".into(), format!("`{other}` is not one of always, interval"))),
    };
    let spool =
        crate::metering::spool::SpoolConfig { dir: raw.spool.dir.into(), max_bytes: raw.spool.max_bytes, fsync };

    let mut plans = HashMap::new();
    let mut plan_routes = Vec::new();
    for (name, p) in raw.plans {
        let limit = rate(p.rate_per_second, p.burst, &|k| format!("plans.{name}.{k}"), origin)?;
        let mut routes = HashMap::new();
        for (route, r) in p.routes {
            let key = |k: &str| format!("plans.{name}.routes.{route}.{k}");
            routes.insert(route.clone(), rate(r.rate_per_second, r.burst, &key, origin)?);
            plan_routes.push((format!("plans.{name}.routes.{route}"), route));
        }
        if p.max_in_flight == Some(0) {
            return Err(err(
                format!("plans.{name}.max_in_flight"),
                "must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        plans.insert(name.clone(), Arc::new(Plan { name, limit, routes, max_in_flight: p.max_in_flight }));
    }

    // Every policy is checked, also one no route uses yet (a typo there would otherwise wait).
    for (name, c) in &raw.cors_policies {
        crate::cors::Cors::new(c.clone().into(), &[])
            .map_err(|(field, reason)| err(format!("cors_policies.{name}.{field}"), reason))?;
    }
    let mut routes = Vec::new();
    let mut route_ids = HashSet::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        if r.id.trim().is_empty() {
            return Err(err(key("id"), "must not be empty".into()));
        }
        if !route_ids.insert(r.id.clone()) {
            return Err(err(key("id"), format!("duplicate route id `{}`", r.id)));
        }
        let (path_key, raw_path, exact) = match (r.path_prefix, r.path) {
            (Some(p), None) => ("path_prefix", p, false),
            (None, Some(p)) => ("path", p, true),
            _ => {
                return Err(err(
                    key("path_prefix"),
                    "set exactly one of path_prefix (prefix match) and path (exact match)".into(),
                ));
            }
        };
        if !raw_path.starts_with('/') {
            return Err(err(key(path_key), format!("`{raw_path}` must start with /")));
        }
        let path_prefix =
            if !exact && raw_path.len() > 1 { raw_path.trim_end_matches('/').to_owned() } else { raw_path };
        let (upstream_key, raw_upstreams) = match (r.upstream, r.upstreams.is_empty()) {
            (Some(url), true) => ("upstream", vec![RawTarget { url, weight: 1, max_in_flight: None }]),
            (None, false) => ("upstreams", r.upstreams),
            _ => {
                return Err(err(
                    key("upstream"),
                    "set exactly one of upstream (one target) and upstreams (a non-empty list)".into(),
                ));
            }
        };
        let mut upstreams = Vec::with_capacity(raw_upstreams.len());
        let mut weights = Vec::with_capacity(raw_upstreams.len());
        let mut target_max_in_flight = Vec::with_capacity(raw_upstreams.len());
        for RawTarget { url: u, weight, max_in_flight } in raw_upstreams {
            let uri: Uri = u.parse().map_err(|e| err(key(upstream_key), format!("`{u}` is not a URL: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() || uri.query().is_some()
            {
                return Err(err(
                    key(upstream_key),
                    format!("`{u}` must be http(s)://host[:port][/base] without query"),
                ));
            }
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err(err(
                    key(upstream_key),
                    format!(
                        "`{u}`: credentials in the URL are not sent (and would show in events and metrics); \
                         set the upstream's Authorization with request_headers"
                    ),
                ));
            }
            if weight > MAX_WEIGHT {
                return Err(err(key(upstream_key), format!("`{u}`: weight must be between 0 and {MAX_WEIGHT}")));
            }
            if max_in_flight == Some(0) {
                return Err(err(
                    key(upstream_key),
                    format!("`{u}`: max_in_flight must be at least 1 (leave it out for no limit)"),
                ));
            }
            upstreams.push(uri);
            weights.push(weight);
            target_max_in_flight.push(max_in_flight);
        }
        if weights.iter().all(|&w| w == 0) {
            return Err(err(key(upstream_key), "at least one target needs a weight above 0".into()));
        }
        if r.max_fails == 0 {
            return Err(err(key("max_fails"), "must be at least 1".into()));
        }
        if r.connect_timeout_ms == Some(0) {
            return Err(err(key("connect_timeout_ms"), "must be at least 1".into()));
        }
        let mut methods = Vec::new();
        for m in &r.methods {
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| err(key("methods"), format!("`{m}` is not an HTTP method")))?;
            methods.push(method);
        }
        let auth = AuthMode::parse(&r.auth.0).map_err(|e| err(key("auth"), e))?;
        if r.timeout_ms == 0 {
            return Err(err(key("timeout_ms"), "must be at least 1".into()));
        }
        // The policy (inline, or named), and the key that names it in errors.
        let policy = match (r.cors, r.cors_policy) {
            (None, None) => None,
            (Some(c), None) => Some((c, key("cors"))),
            (None, Some(name)) => match raw.cors_policies.get(&name) {
                Some(c) => Some((c.clone(), format!("cors_policies.{name}"))),
                None => {
                    return Err(err(
                        key("cors_policy"),
                        format!("unknown CORS policy `{name}` (define it as a [cors_policies.{name}] table)"),
                    ));
                }
            },
            (Some(_), Some(_)) => {
                return Err(err(
                    key("cors_policy"),
                    "set either cors (inline) or cors_policy (a name), not both".into(),
                ));
            }
        };
        let cors = match policy {
            None => None,
            Some((c, at)) => Some(Arc::new(
                crate::cors::Cors::new(c.into(), &methods)
                    .map_err(|(field, reason)| err(format!("{at}.{field}"), reason))?,
            )),
        };
        let allowed_ips = ip_nets(&r.allowed_ips, &|j| key(&format!("allowed_ips[{j}]")), origin)?;
        let header_rules = |raw: &RawHeaderRules, table: &str, direction| {
            if raw.always && direction == crate::rewrite::Direction::Request {
                return Err(err(key(&format!("{table}.always")), "only response_headers take `always`".into()));
            }
            let mut rules = crate::rewrite::HeaderRules::new(&raw.set, &raw.remove, direction, env)
                .map_err(|(at, reason)| err(key(&format!("{table}.{at}")), reason))?;
            rules.always = raw.always;
            Ok(rules)
        };
        let request_headers = header_rules(&r.request_headers, "request_headers", crate::rewrite::Direction::Request)?;
        let response_headers =
            header_rules(&r.response_headers, "response_headers", crate::rewrite::Direction::Response)?;
        let upstream_h2 = match r.upstream_protocol.as_deref() {
            None | Some("http1") => false,
            Some("h2") => true,
            Some(other) => {
                return Err(err(key("upstream_protocol"), format!("`{other}` is not one of \"http1\", \"h2\"")));
            }
        };
        if r.max_in_flight == Some(0) {
            return Err(err(key("max_in_flight"), "must be at least 1 (leave it out for no limit)".into()));
        }
        let queue_timeout = match r.queue_timeout_ms {
            0 => None,
            _ if r.max_in_flight.is_none() && target_max_in_flight.iter().all(Option::is_none) => {
                return Err(err(
                    key("queue_timeout_ms"),
                    "needs max_in_flight, on the route or on one of its upstreams (there is nothing to wait for)"
                        .into(),
                ));
            }
            ms if ms > r.timeout_ms => {
                return Err(err(key("queue_timeout_ms"), format!("must not exceed timeout_ms ({})", r.timeout_ms)));
            }
            ms => Some(Duration::from_millis(ms)),
        };
        match r.max_queued {
            Some(0) => {
                return Err(err(key("max_queued"), "must be at least 1 (leave it out for no limit)".into()));
            }
            Some(_) if queue_timeout.is_none() => {
                return Err(err(key("max_queued"), "needs queue_timeout_ms (without it no call waits)".into()));
            }
            _ => {}
        }
        let required_scopes = match &r.required_scopes {
            None => None,
            Some(_) if auth != AuthMode::JWT => {
                return Err(err(
                    key("required_scopes"),
                    "needs auth = \"jwt\" (API keys and client certificates carry no scopes)".into(),
                ));
            }
            Some(scopes) if scopes.is_empty() => {
                return Err(err(key("required_scopes"), "is empty (leave it out for no scope)".into()));
            }
            Some(scopes) => {
                if let Some((j, s)) =
                    scopes.iter().enumerate().find(|(_, s)| s.is_empty() || s.contains(' ') || s.contains('"'))
                {
                    return Err(err(
                        key(&format!("required_scopes[{j}]")),
                        format!("`{s}` is not a scope (no spaces or quotes, not empty)"),
                    ));
                }
                Some(scopes.clone().into())
            }
        };
        let allowed_plans = match &r.allowed_plans {
            None => None,
            Some(_) if auth.is_public() => {
                return Err(err(
                    key("allowed_plans"),
                    "needs a route that requires a credential (auth is \"none\")".into(),
                ));
            }
            Some(names) if names.is_empty() => {
                return Err(err(key("allowed_plans"), "is empty: no consumer could call the route".into()));
            }
            Some(names) => {
                if let Some((j, name)) = names.iter().enumerate().find(|(_, n)| !plans.contains_key(n.as_str())) {
                    return Err(err(key(&format!("allowed_plans[{j}]")), format!("no plan is named `{name}`")));
                }
                Some(names.clone().into())
            }
        };
        let rate_limit = match &r.rate_limit {
            None => None,
            Some(l) => Some(rate(l.rate_per_second, l.burst, &|k| key(&format!("rate_limit.{k}")), origin)?),
        };
        let client_rate_limit = match &r.rate_limit_per_client {
            None => None,
            Some(l) => Some(rate(l.rate_per_second, l.burst, &|k| key(&format!("rate_limit_per_client.{k}")), origin)?),
        };
        let health_check = match r.health_check {
            None => None,
            Some(h) => {
                if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(err(key("health_check.path"), format!("`{}` must be a path starting with /", h.path)));
                }
                if h.interval_ms < 100 {
                    return Err(err(key("health_check.interval_ms"), "must be at least 100".into()));
                }
                if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
                    return Err(err(
                        key("health_check.timeout_ms"),
                        "must be at least 1 and at most health_check.interval_ms".into(),
                    ));
                }
                for (name, n) in [("fails", h.fails), ("passes", h.passes)] {
                    if !(1..=100).contains(&n) {
                        return Err(err(key(&format!("health_check.{name}")), format!("{n} must be 1..100")));
                    }
                }
                Some(HealthCheck {
                    path: h.path,
                    interval: Duration::from_millis(h.interval_ms),
                    timeout: Duration::from_millis(h.timeout_ms),
                    fails: h.fails,
                    passes: h.passes,
                })
            }
        };
        routes.push(Arc::new(
            Route {
                id_key: Arc::from(r.id.as_str()),
                id: r.id,
                host: r.host.map(|h| h.to_ascii_lowercase()),
                path_prefix,
                exact,
                methods,
                upstreams,
                weights,
                target_max_in_flight,
                target_keys: Vec::new(),
                strip_prefix: r.strip_prefix,
                allow_encoded_slashes: r.allow_encoded_slashes,
                ignore_case: r.ignore_case,
                auth,
                timeout: Duration::from_millis(r.timeout_ms),
                connect_timeout: Duration::from_millis(
                    r.connect_timeout_ms.unwrap_or(raw.edge.connect_timeout_ms).max(1),
                ),
                retries: r.retries,
                max_fails: r.max_fails,
                fail_timeout: Duration::from_millis(r.fail_timeout_ms),
                cors,
                allowed_ips: (!allowed_ips.is_empty()).then(|| allowed_ips.into()),
                max_body_bytes: r.max_body_bytes.unwrap_or(raw.edge.max_body_bytes),
                request_headers,
                response_headers,
                health_check,
                max_in_flight: r.max_in_flight,
                queue_timeout,
                max_queued: r.max_queued,
                rate_limit,
                client_rate_limit,
                allowed_plans,
                required_scopes,
                upstream_h2,
            }
            .with_target_keys(),
        ));
    }

    for (key, route) in plan_routes {
        if !route_ids.contains(&route) {
            return Err(err(key, format!("no route has id `{route}`")));
        }
    }

    // Either `raw.consumers` (an inline array) or the `[[consumers]]` tables, not both.
    let mut consumers = Vec::with_capacity(raw.consumers.len() + tables.len());
    for (i, c) in raw.consumers.into_iter().map(Ok).chain(tables.iter::<RawConsumer>()).enumerate() {
        consumers.push(consumer(c?, &|k| format!("consumers[{i}].{k}"), origin, &plans)?);
    }
    let in_config = consumers.len();
    let consumers_file = raw.consumers_file.as_deref().map(|f| base.join(f));
    if let Some(path) = &consumers_file {
        read_consumers_file(path, &plans, &mut consumers)?;
    }
    check_unique(&consumers, in_config, origin, consumers_file.as_deref())?;

    let mut jwt_issuers = Vec::new();
    let mut issuer_ids = HashSet::new();
    let mut issuer_names = HashSet::new();
    for (i, raw_issuer) in raw.jwt.issuers.into_iter().enumerate() {
        let prefix = format!("jwt.issuers[{i}]");
        if !issuer_ids.insert(raw_issuer.id.clone()) {
            return Err(err(format!("{prefix}.id"), format!("duplicate issuer id `{}`", raw_issuer.id)));
        }
        if !issuer_names.insert(raw_issuer.issuer.clone()) {
            return Err(err(format!("{prefix}.issuer"), format!("issuer `{}` is configured twice", raw_issuer.issuer)));
        }
        if raw_issuer.default_plan.as_ref().is_some_and(|p| !plans.contains_key(p)) {
            return Err(err(
                format!("{prefix}.default_plan"),
                format!("unknown plan `{}`", raw_issuer.default_plan.unwrap_or_default()),
            ));
        }
        jwt_issuers.push(Arc::new(validate_issuer(raw_issuer, &prefix, origin, base, env)?));
    }
    if jwt_issuers.is_empty()
        && let Some(r) = routes.iter().find(|r| r.auth.jwt_only())
    {
        return Err(err(format!("routes (id `{}`).auth", r.id), "`jwt` needs at least one [[jwt.issuers]]".into()));
    }

    let t = raw.telemetry;
    let otlp_endpoint = match t.otlp_endpoint {
        None => None,
        Some(u) => {
            let uri: Uri =
                u.parse().map_err(|e| err("telemetry.otlp_endpoint".into(), format!("`{u}` is not a URL: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(err(
                    "telemetry.otlp_endpoint".into(),
                    format!("`{u}` must be an http(s):// OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces"),
                ));
            }
            Some(uri)
        }
    };
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        return Err(err("telemetry.sample_ratio".into(), "must be between 0 and 1".into()));
    }
    if t.service_name.is_empty() {
        return Err(err("telemetry.service_name".into(), "must not be empty".into()));
    }
    let telemetry = TelemetryConfig {
        otlp_endpoint,
        service_name: t.service_name,
        sample_ratio: t.sample_ratio,
        export_timeout: Duration::from_millis(t.export_timeout_ms.max(1)),
    };

    let path = |f: &str| -> PathBuf { if Path::new(f).is_absolute() { f.into() } else { base.join(f) } };
    let tls_ca = match &raw.edge.tls_ca_file {
        None => Vec::new(),
        Some(f) => crate::tls::read_ca_file(&path(f), f).map_err(|e| err("edge.tls_ca_file".into(), e))?,
    };

    let extra = &raw.edge.tls_certificates;
    let tls_files: Vec<PathBuf> = [
        &raw.edge.tls_cert_file,
        &raw.edge.tls_key_file,
        &raw.edge.tls_client_ca_file,
        &raw.edge.tls_ca_file,
        &raw.edge.upstream_tls_cert_file,
        &raw.edge.upstream_tls_key_file,
    ]
    .into_iter()
    .flatten()
    .chain(extra.iter().flat_map(|c| [&c.cert_file, &c.key_file]))
    .map(|f| path(f))
    .collect();
    let upstream_identity = match (&raw.edge.upstream_tls_cert_file, &raw.edge.upstream_tls_key_file) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(err(
                "edge.upstream_tls_key_file".into(),
                "must be set with edge.upstream_tls_cert_file".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(err(
                "edge.upstream_tls_cert_file".into(),
                "must be set with edge.upstream_tls_key_file".into(),
            ));
        }
        (Some(c), Some(k)) => Some(crate::tls::certified_key((&path(c), c), (&path(k), k)).map_err(|(which, e)| {
            err(if which == 0 { "edge.upstream_tls_cert_file" } else { "edge.upstream_tls_key_file" }.into(), e)
        })?),
    };
    let upstream_tls = crate::tls::client_config_with(&tls_ca, upstream_identity.clone())
        .map_err(|e| err("edge.tls_ca_file".into(), e))?;
    let client_roots = match &raw.edge.tls_client_ca_file {
        None => None,
        Some(_) if raw.edge.tls_cert_file.is_none() => {
            return Err(err(
                "edge.tls_client_ca_file".into(),
                "client certificates are part of HTTPS, which needs edge.tls_cert_file and edge.tls_key_file".into(),
            ));
        }
        Some(f) => Some(crate::tls::read_ca_file(&path(f), f).map_err(|e| err("edge.tls_client_ca_file".into(), e))?),
    };
    let tls_server = match (&raw.edge.tls_cert_file, &raw.edge.tls_key_file) {
        (None, None) if extra.is_empty() => None,
        (None, None) => {
            return Err(err(
                "edge.tls_certificates".into(),
                "needs edge.tls_cert_file and edge.tls_key_file (the default certificate)".into(),
            ));
        }
        (Some(_), None) => return Err(err("edge.tls_key_file".into(), "must be set with edge.tls_cert_file".into())),
        (None, Some(_)) => return Err(err("edge.tls_cert_file".into(), "must be set with edge.tls_key_file".into())),
        (Some(c), Some(k)) => {
            let default = crate::tls::certified_key((&path(c), c), (&path(k), k)).map_err(|(which, e)| {
                err(if which == 0 { "edge.tls_cert_file" } else { "edge.tls_key_file" }.into(), e)
            })?;
            let mut others = Vec::with_capacity(extra.len());
            for (i, t) in extra.iter().enumerate() {
                let key =
                    crate::tls::certified_key((&path(&t.cert_file), &t.cert_file), (&path(&t.key_file), &t.key_file))
                        .map_err(|(which, e)| {
                        err(
                            format!("edge.tls_certificates[{i}].{}", if which == 0 { "cert_file" } else { "key_file" }),
                            e,
                        )
                    })?;
                others.push((key, t.cert_file.clone()));
            }
            let resolver = crate::tls::SniResolver::new(default, &others)
                .map_err(|(i, e)| err(format!("edge.tls_certificates[{i}].cert_file"), e))?;
            let config = crate::tls::server_config(resolver, client_roots.as_deref()).map_err(|e| {
                err(if client_roots.is_some() { "edge.tls_client_ca_file" } else { "edge.tls_cert_file" }.into(), e)
            })?;
            Some(config)
        }
    };

    // Client certificates are only asked for with a client CA: without one, `mtls` routes and
    // registered certificates could never match.
    if client_roots.is_none() {
        if let Some(r) = routes.iter().find(|r| r.auth.accepts_mtls()) {
            return Err(err(
                format!("routes (id `{}`).auth", r.id),
                "`mtls` needs edge.tls_client_ca_file (the CA that signs client certificates)".into(),
            ));
        }
        if let Some(c) = consumers.iter().find(|c| !c.certificates.is_empty()) {
            return Err(err(
                format!("consumers (id `{}`).certificates", c.id),
                "client certificates need edge.tls_client_ca_file (the CA that signs them)".into(),
            ));
        }
    }

    let http_redirect = match (&raw.edge.http_redirect_listen, raw.edge.https_public_port) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(err("edge.https_public_port".into(), "is only used with edge.http_redirect_listen".into()));
        }
        (Some(_), _) if tls_server.is_none() => {
            return Err(err(
                "edge.http_redirect_listen".into(),
                "redirects to HTTPS, which needs edge.tls_cert_file and edge.tls_key_file".into(),
            ));
        }
        (Some(_), Some(0)) => return Err(err("edge.https_public_port".into(), "must be between 1 and 65535".into())),
        (Some(l), public) => {
            let redirect_listen = addr("edge.http_redirect_listen", l)?;
            if redirect_listen.port() != 0 && [listen, admin_listen].iter().any(|a| a.port() == redirect_listen.port())
            {
                return Err(err(
                    "edge.http_redirect_listen".into(),
                    format!("port {} is already edge.listen's or edge.admin_listen's", redirect_listen.port()),
                ));
            }
            Some(crate::redirect::HttpRedirect { listen: redirect_listen, https_port: public.unwrap_or(listen.port()) })
        }
    };

    // Only partitioners that keep every event of a key, the empty one included, in one
    // partition: aggregator replicas own whole consumers (docs/ARCHITECTURE.md).
    if let Some(p) = raw.kafka.properties.get("partitioner")
        && !["consistent", "murmur2", "fnv1a"].contains(&p.as_str())
    {
        return Err(err(
            "kafka.properties.partitioner".into(),
            format!(
                "`{p}` spreads events without a consumer (empty key) over partitions, and aggregator replicas \
                 would then each count a part of them; use consistent (the default), murmur2 or fnv1a"
            ),
        ));
    }

    let worker_threads = match raw.edge.worker_threads {
        None => std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
        Some(n) if (1..=256).contains(&n) => n,
        Some(_) => return Err(err("edge.worker_threads".into(), "must be between 1 and 256".into())),
    };

    let max_connections = match raw.edge.max_connections {
        None => default_max_connections(open_files_limit()),
        Some(n) if (1..=1_000_000).contains(&n) => n,
        Some(_) => return Err(err("edge.max_connections".into(), "must be between 1 and 1000000".into())),
    };

    if raw.edge.response_headers.always {
        return Err(err(
            "edge.response_headers.always".into(),
            "not needed: the edge's response_headers apply to every answer".into(),
        ));
    }
    let response_headers = crate::rewrite::HeaderRules::new(
        &raw.edge.response_headers.set,
        &raw.edge.response_headers.remove,
        crate::rewrite::Direction::Response,
        env,
    )
    .map_err(|(at, reason)| err(format!("edge.response_headers.{at}"), reason))?;
    let response_headers = (!response_headers.is_empty()).then(|| Arc::new(response_headers));

    let access_log = match raw.edge.access_log.as_deref() {
        None | Some("") => None,
        Some(value) => {
            let dest = crate::access_log::Destination::parse(value);
            match dest {
                crate::access_log::Destination::File(f) => {
                    let f = if f.is_absolute() { f } else { base.join(f) };
                    if f.is_dir() {
                        return Err(err(
                            "edge.access_log".into(),
                            format!("{} is a directory, not a file", f.display()),
                        ));
                    }
                    if f.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
                        return Err(err(
                            "edge.access_log".into(),
                            format!("the directory of {} does not exist", f.display()),
                        ));
                    }
                    Some(crate::access_log::Destination::File(f))
                }
                stdout => Some(stdout),
            }
        }
    };

    Ok(Config {
        access_log,
        worker_threads,
        max_connections,
        response_headers,
        tls_ca,
        mutual_tls: client_roots.is_some(),
        upstream_identity,
        upstream_tls,
        tls_server,
        tls_files,
        http_redirect,
        telemetry,
        jwt_issuers,
        instance_id,
        listen,
        admin_listen,
        shutdown_grace: Duration::from_millis(raw.edge.shutdown_grace_ms),
        connect_timeout: Duration::from_millis(raw.edge.connect_timeout_ms.max(1)),
        http: HttpSettings {
            header_read_timeout,
            body_read_timeout: Duration::from_millis(raw.edge.body_read_timeout_ms),
            idle_timeout: Duration::from_millis(raw.edge.idle_timeout_ms),
            http2_keepalive_interval: (raw.edge.http2_keepalive_interval_ms > 0)
                .then(|| Duration::from_millis(raw.edge.http2_keepalive_interval_ms)),
            http2_keepalive_timeout: Duration::from_millis(raw.edge.http2_keepalive_timeout_ms),
            max_headers: raw.edge.max_headers,
            max_header_bytes: raw.edge.max_header_bytes,
            trusted_hops: raw.edge.trusted_hops,
            proxy_protocol: raw.edge.proxy_protocol,
            proxy_protocol_from,
        },
        kafka: KafkaConfig {
            enabled: raw.kafka.enabled,
            brokers: raw.kafka.brokers,
            topic: raw.kafka.topic,
            queue_capacity: raw.kafka.queue_capacity,
            message_timeout,
            quota_topic: raw.kafka.quota_topic,
            properties: raw.kafka.properties,
        },
        routes,
        plans,
        consumers,
        consumers_file,
        spool,
    })
}

/// Validates one consumer; `key` names a field of it in errors. (Ids and key hashes are
/// checked for duplicates across all consumers by [`check_unique`].)
fn consumer(
    c: RawConsumer,
    key: &dyn Fn(&str) -> String,
    origin: &str,
    plans: &HashMap<String, Arc<Plan>>,
) -> Result<Consumer, ConfigError> {
    let err = |key: String, reason: String| ConfigError::invalid(origin, key, reason);
    if c.id.trim().is_empty() {
        return Err(err(key("id"), "must not be empty".into()));
    }
    if !plans.contains_key(&c.plan) {
        return Err(err(key("plan"), format!("unknown plan `{}`", c.plan)));
    }
    let consumer_ips = ip_nets(&c.allowed_ips, &|j| key(&format!("allowed_ips[{j}]")), origin)?;
    // Each entry of `field` with its SHA-256 (64 hex digits) decoded; `what` says what was
    // hashed and how to get the hash, for the error.
    let hashed = |entries: Vec<RawKey>, field: &str, what: &str| -> Result<Vec<ApiKey>, ConfigError> {
        let mut out = Vec::with_capacity(entries.len());
        for (j, k) in entries.into_iter().enumerate() {
            let sha256 = hex::decode(&k.sha256).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| {
                err(key(&format!("{field}[{j}].sha256")), format!("must be the 64 hex digits of {what}"))
            })?;
            let own = ip_nets(&k.allowed_ips, &|i| key(&format!("{field}[{j}].allowed_ips[{i}]")), origin)?;
            // Within the consumer's list: the addresses in both.
            let allowed_ips = if own.is_empty() || consumer_ips.is_empty() {
                own
            } else {
                let both = crate::forwarded::intersect(&consumer_ips, &own);
                if both.is_empty() {
                    return Err(err(
                        key(&format!("{field}[{j}].allowed_ips")),
                        "no address of this list is in the consumer's allowed_ips: the credential could never be used"
                            .into(),
                    ));
                }
                both
            };
            out.push(ApiKey { id: k.id, sha256, allowed_ips: allowed_ips.into() });
        }
        Ok(out)
    };
    let keys = hashed(c.keys, "keys", "the key's SHA-256 (see `tollgate-edge hash-key`)")?;
    let certificates = hashed(
        c.certificates,
        "certificates",
        "the certificate's SHA-256 fingerprint (see `tollgate-edge cert-fingerprint`)",
    )?;
    Ok(Consumer { id: c.id, plan: c.plan, keys, certificates, allowed_ips: consumer_ips })
}

/// `allowed_ips` entries as address blocks; `key(j)` names entry `j` in errors.
fn ip_nets(
    entries: &[String],
    key: &dyn Fn(usize) -> String,
    origin: &str,
) -> Result<Vec<crate::forwarded::IpNet>, ConfigError> {
    entries
        .iter()
        .enumerate()
        .map(|(j, e)| e.parse().map_err(|reason| ConfigError::invalid(origin, key(j), reason)))
        .collect()
}

/// Reads `consumers_file`: one consumer per line as a JSON object with the fields of
/// `[[consumers]]` (`{"id": "acme", "plan": "pro", "keys": [{"id": "k1", "sha256": "…"}]}`);
/// blank lines and lines starting with `#` are skipped. Read line by line, so even millions
/// of consumers need no more memory than the consumers themselves.
fn read_consumers_file(
    path: &Path,
    plans: &HashMap<String, Arc<Plan>>,
    out: &mut Vec<Consumer>,
) -> Result<(), ConfigError> {
    use std::io::{BufRead, Read, Seek};
    let shown = path.display().to_string();
    let read_err = |source| ConfigError::Read { path: shown.clone(), source };
    // Sized once from the number of lines (a growing list would hold up to 3x its size while
    // it moves).
    let mut lines = 1;
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
    out.reserve_exact(lines);
    // The same file, read again from the start (not reopened: a file replaced in between
    // would not match its count).
    file.rewind().map_err(read_err)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(read_err)? == 0 {
            return Ok(());
        }
        n += 1;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let origin = format!("consumers_file {shown} line {n}");
        let raw: RawConsumer = serde_json::from_str(text).map_err(|e| {
            ConfigError::invalid(
                &origin,
                "consumers_file",
                format!("not a consumer object ({{\"id\", \"plan\", \"keys\"}}): {e}"),
            )
        })?;
        out.push(consumer(raw, &|k| k.to_owned(), &origin, plans)?);
    }
}

/// Consumer ids and key hashes must be unique across `[[consumers]]` and `consumers_file`
/// (sorted references, not a copy of every id). Errors name the second occurrence.
fn check_unique(
    consumers: &[Consumer],
    in_config: usize,
    origin: &str,
    file: Option<&Path>,
) -> Result<(), ConfigError> {
    let place = |i: usize, field: &str| -> (String, String) {
        if i < in_config {
            (origin.to_owned(), format!("consumers[{i}].{field}"))
        } else {
            let file = file.map(|f| f.display().to_string()).unwrap_or_default();
            (format!("consumers_file {file} (consumer {} of the file)", i - in_config + 1), field.to_owned())
        }
    };
    let mut ids: Vec<(&str, usize)> = consumers.iter().enumerate().map(|(i, c)| (c.id.as_str(), i)).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0].0 == w[1].0) {
        let (origin, key) = place(w[0].1.max(w[1].1), "id");
        return Err(ConfigError::invalid(&origin, key, format!("duplicate consumer id `{}`", w[0].0)));
    }
    drop(ids);
    for (field, what, of) in [
        ("keys", "key hash", (|c: &Consumer| &c.keys) as fn(&Consumer) -> &Vec<ApiKey>),
        ("certificates", "certificate fingerprint", |c: &Consumer| &c.certificates),
    ] {
        let mut hashes: Vec<(&[u8; 32], usize, usize)> = consumers
            .iter()
            .enumerate()
            .flat_map(|(i, c)| of(c).iter().enumerate().map(move |(j, k)| (&k.sha256, i, j)))
            .collect();
        hashes.sort_unstable();
        if let Some(w) = hashes.windows(2).find(|w| w[0].0 == w[1].0) {
            let (_, i, j) = w[0].max(w[1]);
            let (origin, key) = place(i, &format!("{field}[{j}].sha256"));
            return Err(ConfigError::invalid(&origin, key, format!("this {what} is already registered")));
        }
    }
    Ok(())
}

fn validate_issuer(
    r: RawIssuer,
    prefix: &str,
    origin: &str,
    base: &Path,
    env: &BTreeMap<String, String>,
) -> Result<JwtIssuer, ConfigError> {
    use crate::auth::jwt::{JwtKey, parse_algorithm, parse_jwks};
    let err = |k: &str, reason: String| ConfigError::invalid(origin, format!("{prefix}.{k}"), reason);
    let path = |p: &str| if Path::new(p).is_absolute() { p.into() } else { base.join(p) };
    if r.id.trim().is_empty() {
        return Err(err("id", "must not be empty".into()));
    }
    if r.issuer.is_empty() {
        return Err(err("issuer", "must be the exact `iss` claim of the tokens".into()));
    }
    if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
        return Err(err("audiences", "list at least one audience (tokens must carry one in `aud`)".into()));
    }
    if r.algorithms.is_empty() {
        return Err(err("algorithms", "list the accepted algorithms, e.g. [\"ES256\"]".into()));
    }
    let algorithms = r
        .algorithms
        .iter()
        .map(|a| parse_algorithm(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("algorithms", e))?;
    if r.consumer_claim.is_empty() {
        return Err(err("consumer_claim", "must name a claim".into()));
    }
    let mut keys = Vec::new();
    for (j, k) in r.keys.into_iter().enumerate() {
        let kerr = |field: &str, reason: String| err(&format!("keys[{j}].{field}"), reason);
        let alg = parse_algorithm(&k.alg).map_err(|e| kerr("alg", e))?;
        if !algorithms.contains(&alg) {
            return Err(kerr("alg", format!("`{}` is not in this issuer's algorithms", k.alg)));
        }
        let key = match (k.pem_file, k.secret_file, k.secret_env) {
            (Some(f), None, None) => {
                let pem = std::fs::read(path(&f)).map_err(|e| kerr("pem_file", format!("cannot read `{f}`: {e}")))?;
                JwtKey::from_pem(k.kid, alg, &pem).map_err(|e| kerr("pem_file", format!("`{f}`: {e}")))?
            }
            (None, Some(f), None) => {
                let secret =
                    std::fs::read(path(&f)).map_err(|e| kerr("secret_file", format!("cannot read `{f}`: {e}")))?;
                let secret = secret.trim_ascii();
                JwtKey::from_secret(k.kid, alg, secret).map_err(|e| kerr("secret_file", e))?
            }
            (None, None, Some(var)) => {
                let secret = env.get(&var).ok_or_else(|| kerr("secret_env", format!("variable `{var}` is not set")))?;
                JwtKey::from_secret(k.kid, alg, secret.as_bytes()).map_err(|e| kerr("secret_env", e))?
            }
            _ => return Err(kerr("pem_file", "set exactly one of pem_file, secret_file, secret_env".into())),
        };
        keys.push(key);
    }
    let jwks = match (r.jwks_file, r.jwks_url) {
        (None, None) => None,
        (Some(f), None) => {
            let p = path(&f);
            let text = std::fs::read(&p).map_err(|e| err("jwks_file", format!("cannot read `{f}`: {e}")))?;
            let set = parse_jwks(&text).map_err(|e| err("jwks_file", format!("`{f}`: {e}")))?;
            keys.extend(set);
            Some(JwksSource::File(p))
        }
        (None, Some(u)) => {
            let uri: Uri = u.parse().map_err(|e| err("jwks_url", format!("`{u}` is not a URL: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(err("jwks_url", format!("`{u}` must be an http(s):// URL")));
            }
            Some(JwksSource::Url(uri))
        }
        (Some(_), Some(_)) => return Err(err("jwks_url", "set at most one of jwks_file and jwks_url".into())),
    };
    if keys.is_empty() && jwks.is_none() {
        return Err(err("keys", "give the issuer's keys: keys, jwks_file or jwks_url".into()));
    }
    if r.jwks_refresh_s == 0 {
        return Err(err("jwks_refresh_s", "must be at least 1".into()));
    }
    if r.jwks_timeout_ms == 0 {
        return Err(err("jwks_timeout_ms", "must be at least 1".into()));
    }
    let mut claims_to_headers = Vec::with_capacity(r.claims_to_headers.len());
    for (claim, header) in r.claims_to_headers {
        let at = format!("claims_to_headers.{claim}");
        let name = http::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| err(&at, format!("`{header}` is not a header name")))?;
        if crate::rewrite::edge_owned_request_header(&name) || ["authorization", "x-api-key"].contains(&name.as_str()) {
            return Err(err(&at, format!("`{name}` is the edge's to write (or a credential); name another header")));
        }
        claims_to_headers.push((claim, name));
    }
    Ok(JwtIssuer {
        claims_to_headers,
        id: r.id,
        issuer: r.issuer,
        audiences: r.audiences,
        algorithms,
        consumer_claim: r.consumer_claim,
        leeway_s: r.leeway_s,
        default_plan: r.default_plan,
        keys,
        jwks,
        jwks_refresh: Duration::from_secs(r.jwks_refresh_s),
        unknown_kid_cooldown: Duration::from_secs(r.unknown_kid_cooldown_s),
        jwks_timeout: Duration::from_millis(r.jwks_timeout_ms),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
[plans.free]
rate_per_second = 5
[[routes]]
id = "echo"
path_prefix = "/echo/"
upstream = "http://127.0.0.1:8081"
[[consumers]]
id = "acme"
plan = "free"
keys = [{ id = "k1", sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae" }]
"#;

    #[test]
    fn valid_config_normalizes() {
        let c = Config::parse(BASE, &BTreeMap::new()).unwrap();
        assert_eq!(c.routes[0].path_prefix, "/echo");
        assert_eq!(c.plans["free"].limit.burst.get(), 5);
        assert_eq!(c.consumers[0].keys[0].sha256[0], 0x2c);
        // A route's body limit: its own, else the edge's.
        assert_eq!(c.routes[0].max_body_bytes, 10 * 1024 * 1024);
        let edge_wide = Config::parse(&format!("[edge]\nmax_body_bytes = 7\n{BASE}"), &BTreeMap::new()).unwrap();
        assert_eq!(edge_wide.routes[0].max_body_bytes, 7);
        let own = BASE.replace("upstream = ", "max_body_bytes = 5\nupstream = ");
        assert_eq!(
            Config::parse(&format!("[edge]\nmax_body_bytes = 7\n{own}"), &BTreeMap::new()).unwrap().routes[0]
                .max_body_bytes,
            5
        );
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("path_prefix = \"/echo/\"", "path_prefix = \"echo\"", "routes[0].path_prefix"),
            ("path_prefix = \"/echo/\"", "path = \"echo\"", "routes[0].path"),
            ("path_prefix = \"/echo/\"", "path_prefix = \"/a\"\npath = \"/b\"", "exactly one of path_prefix"),
            ("upstream = \"http://127.0.0.1:8081\"", "upstream = \"ftp://x\"", "routes[0].upstream"),
            ("plan = \"free\"", "plan = \"gold\"", "consumers[0].plan"),
            ("rate_per_second = 5", "rate_per_second = 0", "plans.free.rate_per_second"),
            ("sha256 = \"2c26", "sha256 = \"zz26", "consumers[0].keys[0].sha256"),
            (
                "sha256 = \"2c26",
                "allowed_ips = [\"10.0.0.0/33\"], sha256 = \"2c26",
                "consumers[0].keys[0].allowed_ips[0]",
            ),
            ("keys = [", "allowed_ips = [\"10.0.0.1/8\"]\nkeys = [", "consumers[0].allowed_ips[0]"),
            (
                "keys = [",
                &format!(
                    "allowed_ips = [\"10.0.0.0/8\"]\nkeys = [{{ id = \"k0\", sha256 = \"{}\", allowed_ips = [\"11.0.0.0/8\"] }}, ",
                    "a".repeat(64)
                ),
                "consumers[0].keys[0].allowed_ips`: no address of this list is in the consumer's",
            ),
            ("upstream = ", "allowed_ips = [\"10.0.0.0/8\", \"example.com\"]\nupstream = ", "routes[0].allowed_ips[1]"),
            ("[kafka]", "[kafka]\nbrokerz = 1", "brokerz"),
            ("upstream = ", "cors_policy = \"web\"\nupstream = ", "routes[0].cors_policy"),
            (
                "upstream = ",
                "cors_policy = \"web\"\ncors = { allow_origins = [\"*\"] }\nupstream = ",
                "either cors (inline) or cors_policy",
            ),
            (
                "[kafka]",
                "[cors_policies.web]\nallow_origins = [\"app.example\"]\n[kafka]",
                "cors_policies.web.allow_origins",
            ),
            ("upstream = ", "cors_policy = \"web\"\nupstream = ", "define it as a [cors_policies.web] table"),
        ];
        for (from, to, key) in cases {
            let text = BASE.replace(from, to);
            let msg = Config::parse(&text, &BTreeMap::new()).unwrap_err().to_string();
            assert!(msg.contains(key), "{to}: {msg}");
        }
        let env = [("TOLLGATE_EDGE_EDGE__LISTEN".to_owned(), "nope".to_owned())].into();
        assert!(Config::parse(BASE, &env).unwrap_err().to_string().contains("edge.listen"));
        let edge = |line: &str| Config::parse(&format!("[edge]\n{line}\n{BASE}"), &BTreeMap::new());
        assert_eq!(edge("").unwrap().http.idle_timeout, Duration::from_secs(180));
        assert_eq!(edge("idle_timeout_ms = 2500").unwrap().http.idle_timeout, Duration::from_millis(2500));
        let msg = edge("idle_timeout_ms = 0").unwrap_err().to_string();
        assert!(msg.contains("edge.idle_timeout_ms") && msg.contains("at least 1"), "{msg}");
        assert_eq!(edge("").unwrap().http.body_read_timeout, Duration::from_secs(10));
        use crate::access_log::Destination;
        assert_eq!(edge("").unwrap().access_log, None);
        assert_eq!(edge("access_log = \"\"").unwrap().access_log, None);
        assert_eq!(edge("access_log = \"stdout\"").unwrap().access_log, Some(Destination::Stdout));
        assert_eq!(edge("access_log = \"-\"").unwrap().access_log, Some(Destination::Stdout));
        // Relative to the config file (here: the working directory).
        assert_eq!(
            edge("access_log = \"access.log\"").unwrap().access_log,
            Some(Destination::File(PathBuf::from("./access.log")))
        );
        let msg = edge("access_log = \"/no/such/dir/access.log\"").unwrap_err().to_string();
        assert!(msg.contains("edge.access_log") && msg.contains("/no/such/dir/access.log does not exist"), "{msg}");
        let msg = edge("access_log = \"/tmp\"").unwrap_err().to_string();
        assert!(msg.contains("edge.access_log") && msg.contains("is a directory"), "{msg}");
        let msg = edge("body_read_timeout_ms = 0").unwrap_err().to_string();
        assert!(msg.contains("edge.body_read_timeout_ms") && msg.contains("at least 1"), "{msg}");
        let c = edge("").unwrap();
        assert_eq!(
            (c.http.http2_keepalive_interval, c.http.http2_keepalive_timeout),
            (Some(Duration::from_secs(30)), Duration::from_secs(20))
        );
        let c = edge("http2_keepalive_interval_ms = 0").unwrap();
        assert_eq!(c.http.http2_keepalive_interval, None);
        let c = edge("http2_keepalive_interval_ms = 1500\nhttp2_keepalive_timeout_ms = 700").unwrap();
        assert_eq!(
            (c.http.http2_keepalive_interval, c.http.http2_keepalive_timeout),
            (Some(Duration::from_millis(1500)), Duration::from_millis(700))
        );
        let msg = edge("http2_keepalive_timeout_ms = 0").unwrap_err().to_string();
        assert!(msg.contains("edge.http2_keepalive_timeout_ms"), "{msg}");
        assert_eq!(edge("max_connections = 3").unwrap().max_connections, 3);
        let msg = edge("max_connections = 0").unwrap_err().to_string();
        assert!(msg.contains("edge.max_connections") && msg.contains("between 1 and 1000000"), "{msg}");
        assert_eq!(edge("").unwrap().max_connections, default_max_connections(open_files_limit()));
    }

    #[test]
    fn the_default_connection_limit_fits_the_open_file_limit() {
        assert_eq!(default_max_connections(None), 10_000);
        assert_eq!(default_max_connections(Some(1_048_576)), 10_000);
        // systemd's usual soft limit: (1024 - 256) / 2.
        assert_eq!(default_max_connections(Some(1024)), 384);
        assert_eq!(default_max_connections(Some(100)), 64);
        // This process's limit is read from /proc (Linux).
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn header_rules_name_their_key_and_read_the_environment() {
        let with = |rules: &str, env: &[(&str, &str)]| {
            let env: BTreeMap<String, String> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            Config::parse(&BASE.replace("upstream = ", &format!("{rules}\nupstream = ")), &env)
        };
        let c =
            with(r#"request_headers = { set = { authorization = "Bearer ${TOKEN}" } }"#, &[("TOKEN", "t0k")]).unwrap();
        assert_eq!(c.routes[0].request_headers.set[0].1, "Bearer t0k");
        assert!(c.routes[0].response_headers.is_empty());
        let msg =
            with(r#"request_headers = { set = { authorization = "Bearer ${TOKEN}" } }"#, &[]).unwrap_err().to_string();
        assert!(
            msg.contains("routes[0].request_headers.set.authorization") && msg.contains("`TOKEN` is not set"),
            "{msg}"
        );
        let msg = with(r#"response_headers = { remove = ["server", "retry-after"] }"#, &[]).unwrap_err().to_string();
        assert!(msg.contains("routes[0].response_headers.remove[1]"), "{msg}");
        let msg = with(r#"response_headers = { drop = ["server"] }"#, &[]).unwrap_err().to_string();
        assert!(msg.contains("drop"), "{msg}");
        let c = with(r#"response_headers = { set = { x-frame-options = "DENY" }, always = true }"#, &[]).unwrap();
        assert!(c.routes[0].response_headers.always && !c.routes[0].request_headers.always);
        let msg = with(r#"request_headers = { set = { x-a = "1" }, always = true }"#, &[]).unwrap_err().to_string();
        assert!(msg.contains("routes[0].request_headers.always"), "{msg}");
        // The edge's own: on every answer.
        let edge =
            |rules: &str| Config::parse(&format!("[edge]\nresponse_headers = {rules}\n{BASE}"), &BTreeMap::new());
        assert!(edge("{ }").unwrap().response_headers.is_none());
        let c = edge(r#"{ set = { x-content-type-options = "nosniff" }, remove = ["server"] }"#).unwrap();
        let rules = c.response_headers.unwrap();
        assert_eq!((rules.set[0].0.as_str(), rules.remove[0].as_str()), ("x-content-type-options", "server"));
        let msg = edge(r#"{ remove = ["x-request-id"] }"#).unwrap_err().to_string();
        assert!(msg.contains("edge.response_headers.remove[0]"), "{msg}");
        let msg = edge(r#"{ set = { a = "1" }, always = true }"#).unwrap_err().to_string();
        assert!(msg.contains("edge.response_headers.always"), "{msg}");
    }

    #[test]
    fn max_in_flight_is_a_positive_limit_or_none() {
        let with =
            |line: &str| Config::parse(&BASE.replace("upstream = ", &format!("{line}\nupstream = ")), &BTreeMap::new());
        assert_eq!(with("").unwrap().routes[0].max_in_flight, None);
        assert_eq!(with("max_in_flight = 64").unwrap().routes[0].max_in_flight, Some(64));
        let msg = with("max_in_flight = 0").unwrap_err().to_string();
        assert!(msg.contains("key `routes[0].max_in_flight`: must be at least 1"), "{msg}");
        let msg = with("max_in_flight = -1").unwrap_err().to_string();
        assert!(msg.contains("max_in_flight"), "{msg}");
        // A plan's: per consumer.
        let plan = |line: &str| {
            Config::parse(&BASE.replace("[plans.free]\n", &format!("[plans.free]\n{line}\n")), &BTreeMap::new())
        };
        assert_eq!(plan("max_in_flight = 8").unwrap().plans["free"].max_in_flight, Some(8));
        assert_eq!(plan("").unwrap().plans["free"].max_in_flight, None);
        let msg = plan("max_in_flight = 0").unwrap_err().to_string();
        assert!(msg.contains("key `plans.free.max_in_flight`: must be at least 1"), "{msg}");
    }

    #[test]
    fn a_queue_needs_a_limit_and_fits_in_the_timeout() {
        let with =
            |line: &str| Config::parse(&BASE.replace("upstream = ", &format!("{line}\nupstream = ")), &BTreeMap::new());
        assert_eq!(with("").unwrap().routes[0].queue_timeout, None);
        let c = with("max_in_flight = 4\nqueue_timeout_ms = 250").unwrap();
        assert_eq!(c.routes[0].queue_timeout, Some(Duration::from_millis(250)));
        let msg = with("queue_timeout_ms = 250").unwrap_err().to_string();
        assert!(msg.contains("routes[0].queue_timeout_ms") && msg.contains("needs max_in_flight"), "{msg}");
        let msg = with("max_in_flight = 4\ntimeout_ms = 100\nqueue_timeout_ms = 250").unwrap_err().to_string();
        assert!(msg.contains("routes[0].queue_timeout_ms") && msg.contains("timeout_ms (100)"), "{msg}");
        // A target's limit is enough.
        let target = BASE.replace(
            "upstream = \"http://127.0.0.1:8081\"",
            "upstreams = [{ url = \"http://127.0.0.1:8081\", max_in_flight = 2 }]\nqueue_timeout_ms = 100",
        );
        assert!(Config::parse(&target, &BTreeMap::new()).unwrap().routes[0].queue_timeout.is_some());
        // The line's length: at least 1, with a queue.
        let c = with("max_in_flight = 4\nqueue_timeout_ms = 250\nmax_queued = 100").unwrap();
        assert_eq!(c.routes[0].max_queued, Some(100));
        let msg = with("max_in_flight = 4\nqueue_timeout_ms = 250\nmax_queued = 0").unwrap_err().to_string();
        assert!(msg.contains("routes[0].max_queued") && msg.contains("at least 1"), "{msg}");
        let msg = with("max_in_flight = 4\nmax_queued = 10").unwrap_err().to_string();
        assert!(msg.contains("routes[0].max_queued") && msg.contains("needs queue_timeout_ms"), "{msg}");
    }

    #[test]
    fn required_scopes_are_for_jwt_routes() {
        let with = |line: &str| {
            let text = BASE.replace("upstream = ", &format!("{line}\nupstream = ")).replace(
                "[kafka]",
                "[[jwt.issuers]]\nid = \"i\"\nissuer = \"https://i\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]\n\
                 keys = [{ alg = \"HS256\", secret_env = \"S\" }]\n[kafka]",
            );
            Config::parse(&text, &[("S".to_owned(), "0123456789abcdef0123456789abcdef".to_owned())].into())
        };
        assert!(with("auth = \"jwt\"").unwrap().routes[0].required_scopes.is_none());
        let c = with("auth = \"jwt\"\nrequired_scopes = [\"orders:read\", \"orders:write\"]").unwrap();
        assert_eq!(c.routes[0].required_scopes.as_deref().map(<[String]>::len), Some(2));
        let msg = with("required_scopes = [\"orders:read\"]").unwrap_err().to_string();
        assert!(msg.contains("routes[0].required_scopes") && msg.contains("needs auth = \"jwt\""), "{msg}");
        let msg = with("auth = \"api_key_or_jwt\"\nrequired_scopes = [\"a\"]").unwrap_err().to_string();
        assert!(msg.contains("needs auth = \"jwt\""), "{msg}");
        let msg = with("auth = \"jwt\"\nrequired_scopes = [\"a b\"]").unwrap_err().to_string();
        assert!(msg.contains("routes[0].required_scopes[0]"), "{msg}");
        let msg = with("auth = \"jwt\"\nrequired_scopes = []").unwrap_err().to_string();
        assert!(msg.contains("routes[0].required_scopes") && msg.contains("empty"), "{msg}");
        // An issuer's claims as upstream headers: never one the edge writes, nor a credential.
        let issuer = |line: &str| {
            let text = BASE.replace("upstream = ", "auth = \"jwt\"\nupstream = ").replace(
                "[kafka]",
                &format!(
                    "[[jwt.issuers]]\nid = \"i\"\nissuer = \"https://i\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]\n\
                     keys = [{{ alg = \"HS256\", secret_env = \"S\" }}]\n{line}\n[kafka]"
                ),
            );
            Config::parse(&text, &[("S".to_owned(), "0123456789abcdef0123456789abcdef".to_owned())].into()).map(|_| ())
        };
        assert!(issuer("claims_to_headers = { email = \"x-user-email\" }").is_ok());
        for (header, why) in
            [("x-consumer-id", "the edge's"), ("authorization", "credential"), ("bad header", "not a header")]
        {
            let msg = issuer(&format!("claims_to_headers = {{ email = \"{header}\" }}")).unwrap_err().to_string();
            assert!(msg.contains("jwt.issuers[0].claims_to_headers.email") && msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn allowed_plans_name_existing_plans_on_routes_that_authenticate() {
        let with =
            |line: &str| Config::parse(&BASE.replace("upstream = ", &format!("{line}\nupstream = ")), &BTreeMap::new());
        assert!(with("").unwrap().routes[0].allowed_plans.is_none());
        let c = with("allowed_plans = [\"free\"]").unwrap();
        assert_eq!(c.routes[0].allowed_plans.as_deref(), Some(&["free".to_owned()][..]));
        let msg = with("allowed_plans = [\"free\", \"gold\"]").unwrap_err().to_string();
        assert!(msg.contains("key `routes[0].allowed_plans[1]`: no plan is named `gold`"), "{msg}");
        let msg = with("allowed_plans = []").unwrap_err().to_string();
        assert!(msg.contains("routes[0].allowed_plans") && msg.contains("empty"), "{msg}");
        let msg = with("auth = \"none\"\nallowed_plans = [\"free\"]").unwrap_err().to_string();
        assert!(msg.contains("routes[0].allowed_plans") && msg.contains("auth is \"none\""), "{msg}");
    }

    #[test]
    fn proxy_protocol_from_names_the_balancers_and_needs_the_protocol() {
        let with = |lines: &str| Config::parse(&format!("[edge]\n{lines}\n{BASE}"), &BTreeMap::new());
        let c = with("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\", \"2001:db8::1\"]").unwrap();
        assert_eq!(c.http.proxy_protocol_from.as_deref().map(<[_]>::len), Some(2));
        assert!(with("proxy_protocol = true").unwrap().http.proxy_protocol_from.is_none());
        let msg = with("proxy_protocol_from = [\"10.0.0.0/8\"]").unwrap_err().to_string();
        assert!(msg.contains("edge.proxy_protocol_from") && msg.contains("proxy_protocol = true"), "{msg}");
        let msg = with("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/33\"]").unwrap_err().to_string();
        assert!(msg.contains("edge.proxy_protocol_from[0]"), "{msg}");
    }

    #[test]
    fn a_routes_shared_rate_limit_is_a_rate_with_an_optional_burst() {
        let with =
            |line: &str| Config::parse(&BASE.replace("upstream = ", &format!("{line}\nupstream = ")), &BTreeMap::new());
        assert!(with("").unwrap().routes[0].rate_limit.is_none());
        let r = with("rate_limit = { rate_per_second = 100, burst = 250 }").unwrap().routes[0].rate_limit.unwrap();
        assert_eq!((r.rate_per_second.get(), r.burst.get()), (100, 250));
        let r = with("rate_limit = { rate_per_second = 100 }").unwrap().routes[0].rate_limit.unwrap();
        assert_eq!(r.burst.get(), 100, "the burst defaults to the rate");
        let msg = with("rate_limit = { rate_per_second = 0 }").unwrap_err().to_string();
        assert!(msg.contains("key `routes[0].rate_limit.rate_per_second`: must be at least 1"), "{msg}");
        let msg = with("rate_limit = { rate_per_second = 5, burst = 0 }").unwrap_err().to_string();
        assert!(msg.contains("key `routes[0].rate_limit.burst`: must be at least 1"), "{msg}");
        let msg = with("rate_limit = { rate = 5 }").unwrap_err().to_string();
        assert!(msg.contains("rate_limit"), "{msg}");
        let r = with("rate_limit_per_client = { rate_per_second = 2 }").unwrap().routes[0].client_rate_limit.unwrap();
        assert_eq!((r.rate_per_second.get(), r.burst.get()), (2, 2));
        let msg = with("rate_limit_per_client = { rate_per_second = 0 }").unwrap_err().to_string();
        assert!(msg.contains("key `routes[0].rate_limit_per_client.rate_per_second`: must be at least 1"), "{msg}");
    }

    #[test]
    fn health_checks_need_a_path_and_a_timeout_within_the_interval() {
        let with = |table: &str| {
            Config::parse(
                &BASE.replace("upstream = ", &format!("health_check = {table}\nupstream = ")),
                &BTreeMap::new(),
            )
        };
        let c = with(r#"{ path = "/health?deep=1" }"#).unwrap();
        let hc = c.routes[0].health_check.clone().unwrap();
        assert_eq!(
            (hc.path.as_str(), hc.interval, hc.timeout, hc.fails, hc.passes),
            ("/health?deep=1", Duration::from_secs(5), Duration::from_secs(1), 1, 1)
        );
        let hc = with(r#"{ path = "/h", fails = 3, passes = 2 }"#).unwrap().routes[0].health_check.clone().unwrap();
        assert_eq!((hc.fails, hc.passes), (3, 2));
        assert!(Config::parse(BASE, &BTreeMap::new()).unwrap().routes[0].health_check.is_none());
        for (table, expected) in [
            (r#"{ path = "health" }"#, "routes[0].health_check.path"),
            (r#"{ path = "/h", interval_ms = 50 }"#, "routes[0].health_check.interval_ms"),
            (r#"{ path = "/h", interval_ms = 500, timeout_ms = 600 }"#, "routes[0].health_check.timeout_ms"),
            (r#"{ path = "/h", timeout_ms = 0 }"#, "routes[0].health_check.timeout_ms"),
            (r#"{ path = "/h", fails = 0 }"#, "key `routes[0].health_check.fails`: 0 must be 1..100"),
            (r#"{ path = "/h", passes = 101 }"#, "key `routes[0].health_check.passes`: 101 must be 1..100"),
            (r#"{ interval_ms = 500 }"#, "path"),
        ] {
            let msg = with(table).unwrap_err().to_string();
            assert!(msg.contains(expected), "{table}: {msg}");
        }
    }

    #[test]
    fn targets_are_urls_or_tables_with_a_weight() {
        let with = |list: &str| {
            Config::parse(
                &BASE.replace("upstream = \"http://127.0.0.1:8081\"", &format!("upstreams = {list}")),
                &BTreeMap::new(),
            )
        };
        let c = with(r#"["http://a:1", { url = "http://b:2", weight = 9 }, { url = "http://c:3" }, { url = "http://d:4", weight = 0 }]"#)
            .unwrap();
        assert_eq!(
            c.routes[0].upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["http://a:1/", "http://b:2/", "http://c:3/", "http://d:4/"]
        );
        assert_eq!(c.routes[0].weights, [1, 9, 1, 0]);
        assert_eq!(c.routes[0].target_max_in_flight, [None; 4]);
        let c = with(r#"[{ url = "http://a:1", max_in_flight = 4 }, "http://b:2"]"#).unwrap();
        assert_eq!(c.routes[0].target_max_in_flight, [Some(4), None]);
        assert_eq!(Config::parse(BASE, &BTreeMap::new()).unwrap().routes[0].weights, [1]);
        for (list, expected) in [
            (
                r#"[{ url = "http://a:1", weight = 1001 }]"#,
                "routes[0].upstreams`: `http://a:1`: weight must be between 0 and 1000",
            ),
            (
                r#"[{ url = "http://a:1", weight = 0 }]"#,
                "routes[0].upstreams`: at least one target needs a weight above 0",
            ),
            (r#"[{ url = "http://a:1", weigth = 2 }]"#, "routes[0].upstreams[0]`: must be a URL or a table"),
            (
                r#"[{ url = "http://a:1", max_in_flight = 0 }]"#,
                "routes[0].upstreams`: `http://a:1`: max_in_flight must be at least 1",
            ),
            (r#"[{ url = "http://a:1", weight = -1 }]"#, "routes[0].upstreams[0]`: must be a URL or a table"),
            (r#"["http://a:1", 7]"#, "routes[0].upstreams[1]`: must be a URL or a table"),
            (r#"[{ url = "ftp://a:1" }]"#, "routes[0].upstreams`: `ftp://a:1` must be http(s)"),
            (r#"["http://user:pw@a:1"]"#, "credentials in the URL are not sent"),
        ] {
            let msg = with(list).unwrap_err().to_string();
            assert!(msg.contains(expected), "{list}: {msg}");
        }
    }

    #[test]
    fn https_needs_a_certificate_and_its_key() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        let with = |cert: &str, key: &str| {
            let mut edge = String::from("[edge]\n");
            for (k, f) in [("tls_cert_file", cert), ("tls_key_file", key)] {
                if !f.is_empty() {
                    edge.push_str(&format!("{k} = \"{}\"\n", dir.join(f).display()));
                }
            }
            Config::parse(&format!("{edge}{BASE}"), &BTreeMap::new())
        };
        let c = with("server.pem", "server.key.pem").unwrap();
        let tls = c.tls_server.unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(with("other.pem", "other.key.pem").unwrap().tls_server.is_some(), "an ECDSA key");
        assert!(Config::parse(BASE, &BTreeMap::new()).unwrap().tls_server.is_none());
        for (cert, key, names, says) in [
            ("server.pem", "", "edge.tls_key_file", "must be set"),
            ("", "server.key.pem", "edge.tls_cert_file", "must be set"),
            ("server.pem", "other.key.pem", "edge.tls_key_file", "is not the key of the certificate"),
            ("server.pem", "server.pem", "edge.tls_key_file", "no PEM private key"),
            ("server.key.pem", "server.key.pem", "edge.tls_cert_file", "no certificate"),
            ("missing.pem", "server.key.pem", "edge.tls_cert_file", "cannot read"),
        ] {
            let msg = with(cert, key).unwrap_err().to_string();
            assert!(msg.contains(names) && msg.contains(says), "{cert} + {key}: {msg}");
        }
    }

    #[test]
    fn route_auth_is_a_name_or_a_list_of_them() {
        let parse = |names: &[&str]| AuthMode::parse(&names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(parse(&["api_key"]), Ok(AuthMode::API_KEY));
        assert_eq!(parse(&["api_key_or_jwt"]), Ok(AuthMode::API_KEY_OR_JWT));
        assert_eq!(parse(&["jwt", "api_key"]), Ok(AuthMode::API_KEY_OR_JWT));
        let both = parse(&["mtls", "api_key"]).unwrap();
        assert!(both.accepts_mtls() && both.accepts_api_key() && !both.accepts_jwt() && !both.is_public());
        assert_eq!(both.accepted(), "API keys and client certificates");
        let public = parse(&["none"]).unwrap();
        assert!(public.is_public() && public.accepts_api_key() && public.accepts_jwt() && !public.accepts_mtls());
        assert!(parse(&["jwt"]).unwrap().jwt_only() && !parse(&["jwt", "mtls"]).unwrap().jwt_only());
        for bad in [&["none", "mtls"][..], &[], &["basic"]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let c =
            Config::parse(&BASE.replace("upstream = ", "auth = [\"api_key\", \"jwt\"]\nupstream = "), &BTreeMap::new());
        assert!(c.is_ok_and(|c| c.routes[0].auth == AuthMode::API_KEY_OR_JWT));
        let msg = Config::parse(&BASE.replace("upstream = ", "auth = 3\nupstream = "), &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("routes[0].auth") && msg.contains("a name or a list"), "{msg}");
    }

    #[test]
    fn mutual_tls_needs_https_and_a_client_ca_for_its_routes_and_certificates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        let file = |f: &str| dir.join(f).display().to_string();
        let https =
            format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", file("server.pem"), file("server.key.pem"));
        let ca = format!("tls_client_ca_file = \"{}\"\n", file("client-ca.pem"));
        let fp = "63eaafb16ff36a76b60dcce5cb06ce73f16ced28389d848ba8b2dd6e24352d27";
        let cert = format!("certificates = [{{ id = \"c1\", sha256 = \"{fp}\" }}]\n");
        let with = |edge: &str, route_auth: &str, consumer: &str| {
            let base = BASE.replace("upstream = ", &format!("auth = {route_auth}\nupstream = "));
            let base = base.replace("keys = [", &format!("{consumer}keys = ["));
            Config::parse(&format!("[edge]\n{edge}{base}"), &BTreeMap::new())
        };
        let ok = with(&format!("{https}{ca}"), "[\"mtls\", \"api_key\"]", &cert).unwrap();
        assert!(ok.mutual_tls && ok.tls_server.is_some());
        assert_eq!(ok.consumers[0].certificates[0].sha256[..2], [0x63, 0xea]);
        assert_eq!(ok.tls_files.len(), 3, "the client CA file is watched too");
        assert!(!with(&https, "\"api_key\"", "").unwrap().mutual_tls);
        for (edge, auth, consumer, names, says) in [
            (ca.clone(), "\"api_key\"", String::new(), "edge.tls_client_ca_file", "needs edge.tls_cert_file"),
            (https.clone(), "\"mtls\"", String::new(), ".auth", "needs edge.tls_client_ca_file"),
            (https.clone(), "\"api_key\"", cert.clone(), ".certificates", "need edge.tls_client_ca_file"),
            (
                format!("{https}tls_client_ca_file = \"{}\"\n", file("nope.pem")),
                "\"api_key\"",
                String::new(),
                "edge.tls_client_ca_file",
                "cannot read",
            ),
            (
                format!("{https}{ca}"),
                "\"mtls\"",
                cert.replace(fp, "abc"),
                "consumers[0].certificates[0].sha256",
                "cert-fingerprint",
            ),
        ] {
            let msg = with(&edge, auth, &consumer).unwrap_err().to_string();
            assert!(msg.contains(names) && msg.contains(says), "{auth} {consumer}: {msg}");
        }
    }

    #[test]
    fn sni_certificates_need_the_default_one_and_errors_name_their_entry() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        let file = |f: &str| dir.join(f).display().to_string();
        let default =
            format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", file("server.pem"), file("server.key.pem"));
        let entry = |cert: &str, key: &str| {
            format!("[[edge.tls_certificates]]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", file(cert), file(key))
        };
        let with =
            |edge: &str, entries: &str| Config::parse(&format!("[edge]\n{edge}{BASE}\n{entries}"), &BTreeMap::new());
        let ok = with(&default, &(entry("api.pem", "api.key.pem") + &entry("wild.pem", "wild.key.pem"))).unwrap();
        assert!(ok.tls_server.is_some());
        assert_eq!(ok.tls_files.len(), 6, "every certificate and key file is watched for reloads");
        for (edge, entries, names, says) in [
            ("", entry("api.pem", "api.key.pem"), "edge.tls_certificates", "needs edge.tls_cert_file"),
            (&default[..], entry("api.pem", "wild.key.pem"), "edge.tls_certificates[0].key_file", "is not the key"),
            (
                &default[..],
                entry("api.pem", "api.key.pem") + &entry("missing.pem", "api.key.pem"),
                "edge.tls_certificates[1].cert_file",
                "cannot read",
            ),
            (
                &default[..],
                entry("api.pem", "api.key.pem") + &entry("iponly.pem", "iponly.key.pem"),
                "edge.tls_certificates[1].cert_file",
                "no DNS host",
            ),
        ] {
            let msg = with(edge, &entries).unwrap_err().to_string();
            assert!(msg.contains(names) && msg.contains(says), "{entries}: {msg}");
        }
    }

    #[test]
    fn only_partitioners_that_keep_an_empty_key_in_one_partition_are_accepted() {
        let with =
            |p: &str| Config::parse(&format!("{BASE}\n[kafka.properties]\npartitioner = \"{p}\"\n"), &BTreeMap::new());
        for ok in ["consistent", "murmur2", "fnv1a"] {
            assert_eq!(with(ok).unwrap().kafka.properties["partitioner"], ok);
        }
        for bad in ["consistent_random", "murmur2_random", "random", "fnv1a_random"] {
            let msg = with(bad).unwrap_err().to_string();
            assert!(msg.contains("kafka.properties.partitioner") && msg.contains(bad), "{bad}: {msg}");
        }
    }

    #[test]
    fn the_redirect_port_needs_https_and_a_port_of_its_own() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/tls");
        let tls = format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            dir.join("server.pem").display(),
            dir.join("server.key.pem").display()
        );
        let with =
            |edge: &str| Config::parse(&format!("[edge]\nlisten = \"127.0.0.1:8443\"\n{edge}{BASE}"), &BTreeMap::new());
        let r = with(&format!("{tls}http_redirect_listen = \"127.0.0.1:8080\"\n")).unwrap().http_redirect.unwrap();
        assert_eq!((r.listen.port(), r.https_port), (8080, 8443), "edge.listen's port by default");
        let r = with(&format!("{tls}http_redirect_listen = \"127.0.0.1:8080\"\nhttps_public_port = 443\n"))
            .unwrap()
            .http_redirect
            .unwrap();
        assert_eq!(r.https_port, 443);
        assert!(with(&tls).unwrap().http_redirect.is_none());
        for (edge, names, says) in [
            ("http_redirect_listen = \"127.0.0.1:8080\"\n".to_owned(), "edge.http_redirect_listen", "tls_cert_file"),
            (format!("{tls}https_public_port = 443\n"), "edge.https_public_port", "only used with"),
            (
                format!("{tls}http_redirect_listen = \"127.0.0.1:8080\"\nhttps_public_port = 0\n"),
                "edge.https_public_port",
                "between 1 and 65535",
            ),
            (format!("{tls}http_redirect_listen = \"127.0.0.1:8443\"\n"), "edge.http_redirect_listen", "already"),
            (format!("{tls}http_redirect_listen = \"8080\"\n"), "edge.http_redirect_listen", "ip:port"),
        ] {
            let msg = with(&edge).unwrap_err().to_string();
            assert!(msg.contains(names) && msg.contains(says), "{edge}: {msg}");
        }
    }

    #[test]
    fn consumers_file_is_read_line_by_line_and_checked_with_the_config() {
        let dir = std::env::temp_dir().join(format!("tollgate-consumers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hash = |n: u8| hex::encode([n; 32]);
        let line = |id: &str, n: u8| {
            format!(
                "{{\"id\": \"{id}\", \"plan\": \"free\", \"keys\": [{{\"id\": \"{id}-k\", \"sha256\": \"{}\"}}]}}",
                hash(n)
            )
        };
        let load = |lines: &[String]| {
            std::fs::write(dir.join("consumers.jsonl"), lines.join("\n")).unwrap();
            let cfg = format!("consumers_file = \"consumers.jsonl\"\n{BASE}");
            std::fs::write(dir.join("edge.toml"), cfg).unwrap();
            Config::load(&dir.join("edge.toml"), &BTreeMap::new())
        };
        let ok = load(&["# comment".into(), String::new(), line("globex", 1), line("initech", 2)]).unwrap();
        let ids: Vec<&str> = ok.consumers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["acme", "globex", "initech"]);
        assert_eq!(ok.consumers[2].keys[0].sha256, [2; 32]);
        assert_eq!(ok.consumers_file.as_deref(), Some(dir.join("consumers.jsonl").as_path()));
        let err = |lines: &[String]| load(lines).unwrap_err().to_string();
        // Each error names the file, the line (or the consumer) and the field.
        let e = err(&[line("globex", 1), line("initech", 2).replace("free", "gold")]);
        assert!(e.contains("consumers.jsonl line 2") && e.contains("`plan`") && e.contains("gold"), "{e}");
        let e = err(&[line("globex", 1), "{\"id\": \"x\"".into()]);
        assert!(e.contains("line 2") && e.contains("not a consumer object"), "{e}");
        let e = err(&[line("globex", 1), line("acme", 3)]);
        assert!(e.contains("(consumer 2 of the file)") && e.contains("duplicate consumer id `acme`"), "{e}");
        let acme_hash = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
        let e = err(&[line("globex", 1).replace(&hash(1), acme_hash)]);
        assert!(e.contains("keys[0].sha256") && e.contains("already registered"), "{e}");
        let e = err(&[line("globex", 1), line("initech", 1)]);
        assert!(e.contains("(consumer 2 of the file)") && e.contains("keys[0].sha256"), "{e}");
        std::fs::remove_file(dir.join("consumers.jsonl")).unwrap();
        let e = Config::load(&dir.join("edge.toml"), &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("consumers.jsonl"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
