//! The `ApiCall` event: one per HTTP call seen by the edge.

use uuid::Uuid;

/// What the edge did with a call. The Avro enum `Outcome` carries the same symbols in the same
/// order; the ClickHouse `Enum8` uses `index + 1` as its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The upstream answered; `status` is the upstream's status.
    Forwarded,
    /// No valid credential: 401.
    Unauthenticated,
    /// The credential is valid but not allowed on this route: 403.
    Forbidden,
    /// Per-second rate limit hit: 429.
    RateLimited,
    /// Monthly quota exhausted: 429.
    QuotaExceeded,
    /// The upstream could not be reached or broke the protocol: 502; or the route already had
    /// `max_in_flight` calls in flight: 503 (nothing sent).
    UpstreamError,
    /// The upstream did not answer in time: 504.
    UpstreamTimeout,
    /// The request was malformed or too large: 400, 413, 431.
    BadRequest,
    /// No route matched: 404.
    NoRoute,
    /// The client went away before the response completed.
    ClientAborted,
    /// The edge's shutdown grace ran out before the response completed, and the edge closed
    /// the connection: status 503 when no response had started, else the status sent.
    EdgeShutdown,
}

impl Outcome {
    /// All outcomes, in Avro symbol order.
    pub const ALL: [Outcome; 11] = [
        Outcome::Forwarded,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::BadRequest,
        Outcome::NoRoute,
        Outcome::ClientAborted,
        Outcome::EdgeShutdown,
    ];

    /// The Avro symbol, also the ClickHouse enum name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::BadRequest => "bad_request",
            Outcome::NoRoute => "no_route",
            Outcome::ClientAborted => "client_aborted",
            Outcome::EdgeShutdown => "edge_shutdown",
        }
    }

    /// Parses an Avro symbol.
    pub fn from_symbol(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Position in the Avro enum.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// Value of the ClickHouse `Enum8` column `outcome`.
    pub fn clickhouse_value(self) -> i8 {
        self as i8 + 1
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One call seen by an edge. Field meanings are documented in `schemas/avro/api_call.avsc`.
/// Generic over how its text is held: [`ApiCall`] owns its strings; [`ApiCallRef`] borrows
/// them, so the edge encodes its calls from what it already holds (the request's method, path
/// and headers, the route, the consumer) without copying each into a `String` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCallOf<S> {
    pub event_id: Uuid,
    pub start_time_us: i64,
    pub edge_id: S,
    pub consumer_id: Option<S>,
    pub credential_id: Option<S>,
    pub route_id: Option<S>,
    pub method: S,
    pub host: S,
    pub path: S,
    pub status: u16,
    pub outcome: Outcome,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub client_ip: S,
    pub user_agent: Option<S>,
    pub trace_id: Option<S>,
    pub plan_id: Option<S>,
    /// The target the call was sent to (`scheme://host:port`); `None` when not forwarded.
    pub upstream_target: Option<S>,
    /// A gRPC answer's `grpc-status` code (`status` holds the HTTP status it means); `None`
    /// for every other call.
    pub grpc_status: Option<u16>,
}

/// A call with its own strings (decoded events, tests).
pub type ApiCall = ApiCallOf<String>;
/// A call with borrowed strings (what the encoder writes).
pub type ApiCallRef<'a> = ApiCallOf<&'a str>;

impl ApiCall {
    /// The Kafka message key: the consumer id, or empty for unauthenticated calls.
    pub fn kafka_key(&self) -> &str {
        self.consumer_id.as_deref().unwrap_or("")
    }

    /// The event as borrowed fields (what the encoder writes).
    pub fn as_ref(&self) -> ApiCallRef<'_> {
        ApiCallRef {
            event_id: self.event_id,
            start_time_us: self.start_time_us,
            edge_id: &self.edge_id,
            consumer_id: self.consumer_id.as_deref(),
            credential_id: self.credential_id.as_deref(),
            route_id: self.route_id.as_deref(),
            method: &self.method,
            host: &self.host,
            path: &self.path,
            status: self.status,
            outcome: self.outcome,
            latency_us: self.latency_us,
            upstream_latency_us: self.upstream_latency_us,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            client_ip: &self.client_ip,
            user_agent: self.user_agent.as_deref(),
            trace_id: self.trace_id.as_deref(),
            plan_id: self.plan_id.as_deref(),
            upstream_target: self.upstream_target.as_deref(),
            grpc_status: self.grpc_status,
        }
    }
}
