//! Metering: every call, rejected ones included, becomes one [`ApiCall`] event, emitted when
//! the response body completes (or the client goes away), so latency and bytes are real.
//!
//! The request path never waits for Kafka: [`EventSink::emit`] is a `try_send` into a bounded
//! queue drained by the producer task ([`producer`]). A full queue is counted as a drop in
//! `tollgate_edge_events_dropped_total`.

pub mod producer;
pub mod spool;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::mpsc;
use tollgate_schemas::{ApiCall, Outcome};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::{CallInfo, Gateway, PeerAddr};

/// `x-request-id`: the event id, sent upstream and to the client.
pub const REQUEST_ID: &str = "x-request-id";
/// User agents longer than this are truncated in events.
pub const MAX_USER_AGENT: usize = 256;

/// Facts about the call known before routing, available to inner layers.
#[derive(Debug, Clone)]
pub struct CallMeta {
    pub event_id: Uuid,
    /// W3C trace id, 32 lower-case hex digits.
    pub trace_id: String,
    /// The client's `traceparent`, when valid, to pass upstream unchanged.
    pub traceparent: Option<HeaderValue>,
    /// The call's OpenTelemetry context (telemetry on): upstream gets its `traceparent`.
    pub otel: Option<opentelemetry::Context>,
}

/// Where events go. Cloned into every response body.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: Option<mpsc::Sender<ApiCall>>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// A sink feeding `tx`; `None` when metering is off.
    pub fn new(tx: Option<mpsc::Sender<ApiCall>>, metrics: Arc<Metrics>) -> Self {
        Self { tx, metrics }
    }

    /// Hands the event to the producer without waiting.
    pub fn emit(&self, call: ApiCall) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(call) {
            Ok(()) => self.metrics.events_enqueued.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.metrics.events_dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Parses a W3C `traceparent` (version 00) and returns its trace id.
pub fn parse_traceparent(v: &str) -> Option<String> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if parts.next().is_some() || version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(trace.to_owned())
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Layer (outermost): assigns the event id, measures, and emits the event when the response
/// body ends.
pub async fn layer(State(gw): State<Arc<Gateway>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let start_time_us = now_us();
    let event_id = Uuid::now_v7();
    let client_trace =
        req.headers().get("traceparent").and_then(|v| Some((v.clone(), parse_traceparent(v.to_str().ok()?)?)));
    let (traceparent, client_trace_id) = match client_trace {
        Some((header, id)) => (Some(header), Some(id)),
        None => (None, None),
    };
    let mut trace_id = client_trace_id;
    // With telemetry on, the call is a span (child of the client's traceparent) and its trace
    // id is the event's.
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
            trace_id = Some(sc.trace_id().to_string());
        }
        (Some(span), Some(cx))
    } else {
        (None, None)
    };
    // No trace from the client or the span: start one (random, only when needed).
    let trace_id = trace_id.unwrap_or_else(|| format!("{:032x}", rand_u128()));
    req.extensions_mut().insert(CallMeta { event_id, trace_id: trace_id.clone(), traceparent, otel });

    let client_ip = req
        .extensions()
        .get::<PeerAddr>()
        .map(|p| crate::forwarded::client_ip(p.0.ip(), req.headers(), gw.trusted_hops));
    if let Some(ip) = client_ip {
        req.extensions_mut().insert(crate::forwarded::ClientIp(ip));
    }
    let client_ip = client_ip.map(|ip| ip.to_string()).unwrap_or_default();
    let user_agent = req.headers().get(http::header::USER_AGENT).map(|v| {
        let s = String::from_utf8_lossy(v.as_bytes());
        truncate(&s, MAX_USER_AGENT).to_owned()
    });
    let host = crate::request_host(&req).unwrap_or_default();
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();

    let request_bytes = Arc::new(AtomicU64::new(0));
    let req = req.map(|b| Body::new(CountingBody { inner: b, count: Arc::clone(&request_bytes) }));

    let mut resp = match &span {
        Some(span) => tracing::Instrument::instrument(next.run(req), span.clone()).await,
        None => next.run(req).await,
    };
    if let Ok(v) = HeaderValue::from_str(&event_id.to_string()) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let info = resp.extensions_mut().remove::<CallInfo>().unwrap_or_default();
    let status = resp.status().as_u16();
    gw.metrics.record_request(info.route_id.as_deref(), status);
    if let Some(span) = &span {
        let route = info.route_id.as_deref().unwrap_or(crate::metrics::NO_ROUTE);
        span.record("otel.name", format!("{method} {route}"));
        span.record("http.route", route);
        span.record("http.response.status_code", status);
    }
    let call = ApiCall {
        event_id,
        start_time_us,
        edge_id: gw.instance_id.clone(),
        consumer_id: info.consumer_id.as_deref().map(str::to_owned),
        credential_id: info.credential_id.as_deref().map(str::to_owned),
        route_id: info.route_id.as_deref().map(str::to_owned),
        method,
        host,
        path,
        status,
        outcome: info.outcome.unwrap_or(Outcome::Forwarded),
        latency_us: 0,
        upstream_latency_us: info.upstream_latency_us,
        request_bytes: 0,
        response_bytes: 0,
        client_ip,
        user_agent,
        trace_id: Some(trace_id),
        plan_id: info.plan.as_ref().map(|p| p.name.clone()),
    };
    let pending = Pending { call, start, request_bytes, sink: gw.events.clone(), _span: span };
    // An upgraded connection (WebSocket) is one call lasting until the tunnel closes.
    if let Some(done) = resp.extensions_mut().remove::<crate::proxy::TunnelDone>().and_then(|t| t.take()) {
        let metrics = Arc::clone(&gw.metrics);
        tokio::spawn(async move {
            let (up, down) = done.await.unwrap_or((0, 0));
            let mut call = pending.call;
            call.latency_us = u64::try_from(pending.start.elapsed().as_micros()).unwrap_or(u64::MAX);
            call.request_bytes = pending.request_bytes.load(Ordering::Relaxed) + up;
            call.response_bytes = down;
            pending.sink.emit(call);
            metrics.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        });
        return resp;
    }
    resp.map(|inner| Body::new(MeteredBody { inner, bytes: 0, pending: Some(pending) }))
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

fn rand_u128() -> u128 {
    // UUIDv4 randomness is enough for trace ids; avoids another RNG dependency.
    Uuid::new_v4().as_u128()
}

/// Counts request body bytes as they stream to the upstream.
struct CountingBody {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl HttpBody for CountingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
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

struct Pending {
    call: ApiCall,
    start: Instant,
    request_bytes: Arc<AtomicU64>,
    sink: EventSink,
    /// The call's span, ended with the response body (telemetry on).
    _span: Option<tracing::Span>,
}

/// The response body, counting bytes; emits the event exactly once: at end of stream, on a
/// body error, or when dropped early (client went away: status 499, `client_aborted`).
struct MeteredBody {
    inner: Body,
    bytes: u64,
    pending: Option<Pending>,
}

impl MeteredBody {
    fn finish(&mut self, aborted: bool) {
        if let Some(p) = self.pending.take() {
            let mut call = p.call;
            call.latency_us = u64::try_from(p.start.elapsed().as_micros()).unwrap_or(u64::MAX);
            call.request_bytes = p.request_bytes.load(Ordering::Relaxed);
            call.response_bytes = self.bytes;
            if aborted {
                call.status = 499;
                call.outcome = Outcome::ClientAborted;
            }
            p.sink.emit(call);
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
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Ready(None) => self.finish(false),
            // The upstream broke off mid-body: the client got a truncated response.
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.as_mut() {
                    p.call.outcome = Outcome::UpstreamError;
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
        let complete = self.inner.is_end_stream();
        self.finish(!complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_table() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(good).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
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
