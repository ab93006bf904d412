//! Metering: every call, rejected ones included, becomes one [`ApiCall`] event, emitted when
//! the response body completes (or the client goes away), so latency and bytes are real.
//!
//! The request path never waits for Kafka: [`EventSink::emit`] encodes the event (Avro, from
//! fields borrowed from the call: no `String` per field) and `try_send`s it into a bounded
//! queue drained by the producer task ([`producer`]). When that queue is full (the producer
//! task is behind), the event goes to the spool's writer instead, also without waiting; only
//! when that is full too (or the spool is) is the event dropped, and counted in
//! `tollgate_edge_events_dropped_total`.

pub mod producer;
pub mod spool;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;
use tollgate_schemas::{ApiCallRef, Encoder, Outcome};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::{CallInfo, Gateway};

/// `x-request-id`: the event id, sent upstream and to the client.
pub static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// User agents longer than this are truncated in events.
pub const MAX_USER_AGENT: usize = 256;

/// Facts about the call known before routing, available to inner layers.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub event_id: Uuid,
    /// W3C trace id.
    pub trace_id: TraceId,
    /// The client's `traceparent`, when valid, to pass upstream unchanged.
    pub traceparent: Option<HeaderValue>,
    /// The call's OpenTelemetry context (telemetry on): upstream gets its `traceparent`.
    pub otel: Option<opentelemetry::Context>,
}

/// A W3C trace id: 32 lower-case hex digits, held inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    /// `s` if it is 32 lower-case hex digits, not all zero.
    pub fn parse(s: &str) -> Option<Self> {
        let digits: [u8; 32] = s.as_bytes().try_into().ok()?;
        (lower_hex(&digits) && digits.iter().any(|&b| b != b'0')).then_some(Self(digits))
    }

    /// A new random trace id.
    fn random() -> Self {
        let mut digits = [0u8; uuid::fmt::Simple::LENGTH];
        Uuid::new_v4().simple().encode_lower(&mut digits);
        Self(digits)
    }

    pub fn as_str(&self) -> &str {
        // Only ever hex digits (see the constructors).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An encoded event on its way to the producer: the Kafka key (the consumer id; empty for
/// unauthenticated calls) and the single-object encoded Avro message.
#[derive(Debug)]
pub struct EncodedEvent {
    pub key: Option<Arc<str>>,
    pub payload: Vec<u8>,
}

impl EncodedEvent {
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or("")
    }
}

/// Where events go.
#[derive(Debug)]
pub struct EventSink {
    /// The producer task's queue and the spool it overflows into; `None` when metering is off.
    tx: Option<(mpsc::Sender<EncodedEvent>, spool::Spool)>,
    encoder: Encoder,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// A sink feeding `tx`, overflowing into the spool; `None` when metering is off.
    pub fn new(
        tx: Option<(mpsc::Sender<EncodedEvent>, spool::Spool)>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, tollgate_schemas::EncodeError> {
        Ok(Self { tx, encoder: Encoder::new()?, metrics })
    }

    /// Whether events go anywhere (metering on).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Encodes the event and hands it to the producer task (to the spool when the task's queue
    /// is full) without waiting.
    pub fn emit(&self, key: Option<&Arc<str>>, call: &ApiCallRef<'_>) {
        let Some((tx, spool)) = &self.tx else { return };
        let mut payload = Vec::with_capacity(256);
        self.encoder.encode_ref_into(call, &mut payload);
        let accepted = match tx.try_send(EncodedEvent { key: key.cloned(), payload }) {
            Ok(()) => true,
            // The spool counts its own drops.
            Err(mpsc::error::TrySendError::Full(e)) => spool.try_append(e.key().as_bytes(), &e.payload),
            // The producer task is gone (shutdown past its deadline).
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.events_dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        if accepted {
            self.metrics.event_enqueued();
        }
    }
}

/// Whether `s` is lower-case hex digits only.
fn lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Parses a W3C `traceparent` (version 00) and returns its trace id.
pub fn parse_traceparent(v: &str) -> Option<TraceId> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && lower_hex(s.as_bytes());
    if parts.next().is_some() || version != "00" || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if span.bytes().all(|b| b == b'0') {
        return None;
    }
    TraceId::parse(trace)
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// A call being metered: what is known when the request arrives, completed when the response
/// body ends. A call dropped before it has an answer (the client went away while the request
/// path, usually the upstream, was still working) is still one event: status 499,
/// `client_aborted` (503, `edge_shutdown` when the edge cut it at the end of its shutdown
/// grace).
pub struct Call {
    gw: Arc<Gateway>,
    /// The route, once routing found it.
    pub route: OnceLock<Arc<crate::config::Route>>,
    /// Who is calling, once authenticated.
    pub identity: OnceLock<Arc<crate::auth::Identity>>,
    finished: bool,
    pub meta: CallMeta,
    /// `x-request-id` (the event id), for the upstream and the client.
    pub request_id: HeaderValue,
    /// The client's address: the peer, or what a trusted hop says (`edge.trusted_hops`).
    pub client_addr: std::net::IpAddr,
    /// `client_addr` as text.
    client_ip: HeaderValue,
    /// Request body bytes, counted as they stream to the upstream.
    pub request_body: Arc<BodyCounter>,
    /// The call's span (telemetry on).
    pub span: Option<tracing::Span>,
    /// Microseconds until the upstream's response head; `u64::MAX` until there is one.
    pub upstream_latency_us: AtomicU64,
    /// The index of the route's target the call was last sent to; `u32::MAX`: none.
    pub upstream_target: AtomicU32,
    start: Instant,
    start_time_us: i64,
    // The request's facts for the event, shared with the request (no copies): method, the
    // host it addressed, its target (for the path) and its user agent.
    method: http::Method,
    host: Option<HeaderValue>,
    uri: http::Uri,
    user_agent: Option<HeaderValue>,
}

impl Call {
    /// Assigns the event id and trace, and notes the request's facts.
    pub fn begin<B>(gw: Arc<Gateway>, runtime: &crate::Runtime, peer: &crate::Peer, req: &http::Request<B>) -> Self {
        let start = Instant::now();
        let start_time_us = now_us();
        let event_id = Uuid::now_v7();
        let client_trace =
            req.headers().get(&TRACEPARENT).and_then(|v| Some((v.clone(), parse_traceparent(v.to_str().ok()?)?)));
        let (traceparent, mut trace_id) = match client_trace {
            Some((header, id)) => (Some(header), Some(id)),
            None => (None, None),
        };
        // With telemetry on, the call is a span (child of the client's traceparent) and its
        // trace id is the event's.
        let (span, otel) = if gw.telemetry {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let span = tracing::info_span!(
                "request",
                otel.name = tracing::field::Empty,
                otel.kind = "server",
                http.request.method = %req.method(),
                url.path = %req.uri().path(),
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                tollgate.event_id = %event_id,
            );
            let _ = span.set_parent(crate::telemetry::extract_parent(req.headers()));
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                trace_id = TraceId::parse(&sc.trace_id().to_string()).or(trace_id);
            }
            (Some(span), Some(cx))
        } else {
            (None, None)
        };
        // No trace from the client or the span: start one (random, only when needed).
        let trace_id = trace_id.unwrap_or_else(TraceId::random);
        let mut id_buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let request_id = HeaderValue::from_str(event_id.hyphenated().encode_lower(&mut id_buf))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        let client_addr = crate::forwarded::client_ip(peer.addr.ip(), req.headers(), runtime.http.trusted_hops);
        let client_ip = match client_addr {
            ip if ip == peer.addr.ip() => peer.ip_text.clone(),
            ip => HeaderValue::from_maybe_shared(Bytes::from(crate::forwarded::ip_text(ip)))
                .unwrap_or_else(|_| peer.ip_text.clone()),
        };
        Self {
            gw,
            route: OnceLock::new(),
            identity: OnceLock::new(),
            finished: false,
            meta: CallMeta { event_id, trace_id, traceparent, otel },
            request_id,
            client_addr,
            client_ip,
            request_body: Arc::new(BodyCounter::default()),
            span,
            upstream_latency_us: AtomicU64::new(u64::MAX),
            upstream_target: AtomicU32::new(u32::MAX),
            start,
            start_time_us,
            method: req.method().clone(),
            host: crate::request_host(req),
            uri: req.uri().clone(),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
        }
    }

    /// The gateway the call runs on.
    pub fn gw(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// The host the client addressed (see [`crate::request_host`]).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Ends the call: its status and duration go to the metrics and its event, encoded from the call's
    /// fields where they are (not copied), to the producer and the access log. `response_bytes` went to the
    /// client; `extra_request_bytes` came from it besides the request body (an upgrade's
    /// tunnel); `grpc_status`: a gRPC answer's code.
    fn complete(
        &self,
        status: u16,
        outcome: Outcome,
        response_bytes: u64,
        extra_request_bytes: u64,
        grpc_status: Option<u16>,
    ) {
        self.complete_at(Instant::now(), status, outcome, response_bytes, extra_request_bytes, grpc_status);
    }

    /// [`Call::complete`] for a call that ended at `end` (a tunnel, whose end metering learns
    /// of a little later).
    fn complete_at(
        &self,
        end: Instant,
        status: u16,
        outcome: Outcome,
        response_bytes: u64,
        extra_request_bytes: u64,
        grpc_status: Option<u16>,
    ) {
        let latency_us = u64::try_from(end.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX);
        let route = self.route.get();
        let route_id = route.map(|r| r.id.as_str());
        self.gw.metrics.record_call(route_id, status, latency_us);
        let (events, access_log) = (&self.gw.events, &self.gw.access_log);
        if !events.enabled() && !access_log.enabled() {
            return;
        }
        let identity = self.identity.get();
        let user_agent = self.user_agent.as_ref().map(|v| String::from_utf8_lossy(v.as_bytes()));
        let call = ApiCallRef {
            event_id: self.meta.event_id,
            start_time_us: self.start_time_us,
            edge_id: &self.gw.instance_id,
            consumer_id: identity.map(|i| &*i.consumer_id),
            credential_id: identity.map(|i| &*i.credential_id),
            route_id,
            method: self.method.as_str(),
            host: self.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or_default(),
            path: self.uri.path(),
            status,
            outcome,
            latency_us,
            upstream_latency_us: Some(self.upstream_latency_us.load(Ordering::Relaxed)).filter(|&us| us != u64::MAX),
            request_bytes: self.request_body.bytes.load(Ordering::Relaxed) + extra_request_bytes,
            response_bytes,
            client_ip: self.client_ip.to_str().unwrap_or_default(),
            user_agent: user_agent.as_deref().map(|ua| truncate(ua, MAX_USER_AGENT)),
            trace_id: Some(self.meta.trace_id.as_str()),
            plan_id: identity.map(|i| i.plan.name.as_str()),
            upstream_target: route.and_then(|r| {
                let i = usize::try_from(self.upstream_target.load(Ordering::Relaxed)).ok()?;
                r.target_keys.get(i).map(|k| &**k)
            }),
            grpc_status,
        };
        events.emit(identity.map(|i| &i.consumer_id), &call);
        access_log.record(&call);
    }

    /// Completes the response: `x-request-id`; the call's metrics and event follow when the
    /// response body ends (or the tunnel of an upgrade closes).
    pub fn finish(mut self, mut resp: Response) -> Response {
        self.finished = true;
        resp.headers_mut().insert(&REQUEST_ID, self.request_id.clone());
        let info = resp.extensions_mut().remove::<CallInfo>().unwrap_or_default();
        if info.unmetered {
            return resp;
        }
        let status = resp.status().as_u16();
        if let Some(span) = &self.span {
            let route = self.route.get().map_or(crate::metrics::NO_ROUTE, |r| r.id.as_str());
            span.record("otel.name", format!("{} {route}", self.method));
            span.record("http.route", route);
            span.record("http.response.status_code", status);
        }
        let outcome = info.outcome.unwrap_or(Outcome::Forwarded);
        // An upgraded connection (WebSocket) is one call lasting until the tunnel closes.
        if let Some(done) = resp.extensions_mut().remove::<crate::proxy::TunnelDone>().and_then(|t| t.take()) {
            tokio::spawn(async move {
                let (up, down, closed) = done.await.unwrap_or((0, 0, Instant::now()));
                self.complete_at(closed, status, outcome, down, up, None);
                self.gw.metrics.tunnels_open.fetch_sub(1, Ordering::Relaxed);
            });
            return resp;
        }
        // A gRPC answer is HTTP 200 whatever happened: its status is `grpc-status`, in the
        // trailers (or, for an answer without messages, the headers). Only HTTP/2 upstreams
        // speak gRPC: other answers are not looked at.
        let grpc = outcome == Outcome::Forwarded
            && status == 200
            && self.route.get().is_some_and(|r| r.upstream_h2)
            && is_grpc(resp.headers());
        let grpc_status = if grpc { resp.headers().get(&GRPC_STATUS).map(grpc_code) } else { None };
        let status = grpc_status.map_or(status, grpc_as_http);
        let pending = Pending { call: self, status, outcome, grpc, grpc_status: grpc_status.flatten() };
        resp.map(|inner| {
            let length = HttpBody::size_hint(&inner).exact();
            Body::new(MeteredBody { inner, bytes: 0, length, pending: Some(pending) })
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // No answer was made: the client went away (its connection closed) while the request
        // path was still working on it, or the edge closed the connection when its shutdown
        // grace ran out (nothing was sent: metered as 503, the edge's failure).
        if self.gw.metrics.grace_over.load(Ordering::Relaxed) {
            self.complete(503, Outcome::EdgeShutdown, 0, 0, None);
        } else {
            self.complete(499, Outcome::ClientAborted, 0, 0, None);
        }
    }
}

/// Request body bytes that went to the upstream, whether the body went over the route's
/// `max_body_bytes`, and whether the edge is (or was, at its end) waiting on the client for it.
#[derive(Debug, Default)]
pub struct BodyCounter {
    pub bytes: AtomicU64,
    pub over_limit: AtomicBool,
    /// The last read of the body waited on the client (it neither returned bytes nor ended):
    /// what an unfinished body at the route's timeout is blamed on.
    pub waiting_on_client: AtomicBool,
    /// No body bytes came for `edge.body_read_timeout_ms`.
    pub timed_out: AtomicBool,
}

/// The request body as it streams to the upstream: counted for the event, failing once more
/// than `left` bytes went through (bodies without a `Content-Length`, which is checked before
/// forwarding), or once no bytes came for `idle` (a client that stops sending would otherwise
/// hold its upstream connection until the route's timeout, and have it blamed on the upstream).
pub struct RequestBody {
    inner: hyper::body::Incoming,
    counter: Arc<BodyCounter>,
    left: u64,
    idle: Duration,
    /// The idle timer (only once a read had to wait), and whether it runs from the last wait.
    timer: Option<(Pin<Box<tokio::time::Sleep>>, bool)>,
}

impl RequestBody {
    pub fn new(inner: hyper::body::Incoming, counter: Arc<BodyCounter>, limit: u64, idle: Duration) -> Self {
        Self { inner, counter, left: limit, idle, timer: None }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        // Bytes, the end or an error: not waiting on the client (any more). Only a body that
        // has waited before has anything to reset.
        if polled.is_ready()
            && let Some((_, running)) = &mut this.timer
        {
            *running = false;
            this.counter.waiting_on_client.store(false, Ordering::Relaxed);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.counter.over_limit.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(axum::Error::new("request body over max_body_bytes"))));
                    }
                    this.left -= n;
                    this.counter.bytes.fetch_add(n, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(axum::Error::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                this.counter.waiting_on_client.store(true, Ordering::Relaxed);
                let idle = this.idle;
                let (sleep, running) = this.timer.get_or_insert_with(|| (Box::pin(tokio::time::sleep(idle)), true));
                if !*running {
                    // Bytes came since the timer was set: it runs from this wait.
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    *running = true;
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    this.counter.timed_out.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(axum::Error::new(
                        "no request body bytes within edge.body_read_timeout_ms",
                    ))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A call answered, its event waiting for the end of the response body. (The call's span,
/// telemetry on, ends with it.)
struct Pending {
    call: Call,
    status: u16,
    outcome: Outcome,
    /// A gRPC answer: its trailers' `grpc-status` decides `status`.
    grpc: bool,
    /// The gRPC answer's `grpc-status` code, once seen (and readable).
    grpc_status: Option<u16>,
}

static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// `application/grpc`, `application/grpc+proto`...: not gRPC-Web (whose status is in the body).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.strip_prefix("application/grpc").is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
    })
}

/// A `grpc-status` value's code; `None` when it is not a number 0..=65535.
fn grpc_code(value: &http::HeaderValue) -> Option<u16> {
    value.to_str().ok().and_then(|c| c.trim().parse::<u16>().ok())
}

/// The HTTP status that means what a `grpc-status` code means (the mapping of gRPC's HTTP
/// gateways): OK 200, CANCELLED 499, INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE 400,
/// DEADLINE_EXCEEDED 504, NOT_FOUND 404, ALREADY_EXISTS / ABORTED 409, PERMISSION_DENIED 403,
/// RESOURCE_EXHAUSTED 429, UNIMPLEMENTED 501, UNAVAILABLE 503, UNAUTHENTICATED 401; UNKNOWN,
/// INTERNAL, DATA_LOSS and anything unreadable (`None`) 500.
fn grpc_as_http(code: Option<u16>) -> u16 {
    match code {
        Some(0) => 200,
        Some(1) => 499,
        Some(3 | 9 | 11) => 400,
        Some(4) => 504,
        Some(5) => 404,
        Some(6 | 10) => 409,
        Some(7) => 403,
        Some(8) => 429,
        Some(12) => 501,
        Some(14) => 503,
        Some(16) => 401,
        _ => 500,
    }
}

/// The response body, counting bytes; emits the event exactly once: at end of stream, on a
/// body error, or when dropped early (client went away: status 499, `client_aborted`; or the
/// edge's shutdown grace ran out: the status sent, `edge_shutdown`).
struct MeteredBody {
    inner: Body,
    bytes: u64,
    /// The body's length when known up front (`Content-Length`).
    length: Option<u64>,
    pending: Option<Pending>,
}

impl MeteredBody {
    /// The whole body has gone out: its end was seen, or all the bytes of a known length (the
    /// server stops reading a body once it has written its `Content-Length`, and an HTTP/2
    /// upstream's body ends only with a later frame: trailers, or an empty `END_STREAM`).
    fn sent_all(&self) -> bool {
        self.inner.is_end_stream() || self.length.is_some_and(|n| self.bytes >= n)
    }

    fn finish(&mut self, aborted: bool) {
        if let Some(p) = self.pending.take() {
            let (status, outcome) = match aborted {
                false => (p.status, p.outcome),
                // The status line went out already: it stays, the outcome says who cut it.
                true if p.call.gw.metrics.grace_over.load(Ordering::Relaxed) => (p.status, Outcome::EdgeShutdown),
                true => (499, Outcome::ClientAborted),
            };
            p.call.complete(status, outcome, self.bytes, 0, p.grpc_status);
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
                let grpc = self.pending.as_ref().is_some_and(|p| p.grpc);
                if grpc
                    && let Some(code) = frame.trailers_ref().and_then(|t| t.get(&GRPC_STATUS))
                    && let Some(p) = self.pending.as_mut()
                {
                    p.grpc_status = grpc_code(code);
                    p.status = grpc_as_http(p.grpc_status);
                }
                // A gRPC answer's trailers come after its last bytes: waited for while the
                // body is read (a server that stops at `Content-Length` drops it instead).
                if if grpc { self.inner.is_end_stream() } else { self.sent_all() } {
                    self.finish(false);
                }
            }
            Poll::Ready(None) => self.finish(false),
            // The upstream broke off mid-body: the client got a truncated response.
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.as_mut() {
                    p.outcome = Outcome::UpstreamError;
                }
                self.finish(false);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Bodies that are empty (HEAD, 204, 304) may never be polled.
        let complete = self.sent_all();
        self.finish(!complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_answers_are_recognized_and_their_status_mapped() {
        let ct = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(v));
            h
        };
        for yes in ["application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"] {
            assert!(is_grpc(&ct(yes)), "{yes}");
        }
        for no in ["application/grpc-web", "application/grpc-web+proto", "application/json", "application/grpcx"] {
            assert!(!is_grpc(&ct(no)), "{no}");
        }
        assert!(!is_grpc(&http::HeaderMap::new()));
        let code = |c: &'static str| grpc_as_http(grpc_code(&http::HeaderValue::from_static(c)));
        // The code kept for the event: a number 0..=65535, else none.
        let kept = |c: &'static str| grpc_code(&http::HeaderValue::from_static(c));
        assert_eq!((kept("0"), kept(" 14 "), kept("65535")), (Some(0), Some(14), Some(65535)));
        assert_eq!((kept("65536"), kept("-1"), kept("x"), kept("")), (None, None, None, None));
        let table = [
            ("0", 200),
            ("1", 499),
            ("2", 500),
            ("3", 400),
            ("4", 504),
            ("5", 404),
            ("6", 409),
            ("7", 403),
            ("8", 429),
            ("9", 400),
            ("10", 409),
            ("11", 400),
            ("12", 501),
            ("13", 500),
            ("14", 503),
            ("15", 500),
            ("16", 401),
            ("17", 500),
            ("x", 500),
        ];
        for (c, status) in table {
            assert_eq!(code(c), status, "grpc-status {c}");
        }
    }

    #[test]
    fn traceparent_table() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(good).as_ref().map(TraceId::as_str), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn user_agent_truncation_respects_char_boundaries() {
        let s = "é".repeat(200);
        let t = truncate(&s, MAX_USER_AGENT);
        assert!(t.len() <= MAX_USER_AGENT && t.len().is_multiple_of(2));
    }
}
