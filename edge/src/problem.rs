//! The one place where the edge turns a refusal into an HTTP response: RFC 9457
//! `application/problem+json`. Bodies never carry credentials or internal error text.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode};
use tollgate_schemas::Outcome;

use crate::CallInfo;

/// Base of the `type` URIs; each problem appends its slug.
pub const TYPE_BASE: &str = "https://tollgate.dev/problems/";

/// A refusal by the edge.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// Short, stable id: the last segment of the `type` URI.
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub outcome: Outcome,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        outcome: Outcome,
        detail: impl Into<String>,
    ) -> Self {
        Self { status, slug, title, detail: detail.into(), outcome, headers: Vec::new() }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", "Unauthorized", Outcome::Unauthenticated, detail)
            .with_header(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tollgate\""))
    }

    /// 401 for a JWT that failed verification (RFC 6750 `error="invalid_token"`).
    pub fn invalid_token(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", "Unauthorized", Outcome::Unauthenticated, detail)
            .with_header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tollgate\", error=\"invalid_token\""),
            )
    }

    /// 403: the JWT is valid but does not grant the route's `required_scopes` (RFC 6750 §3.1:
    /// `WWW-Authenticate` names the scopes needed).
    pub fn insufficient_scope(required: &[String]) -> Self {
        let scope = required.join(" ");
        let challenge = format!("Bearer realm=\"tollgate\", error=\"insufficient_scope\", scope=\"{scope}\"");
        let problem = Problem::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            "Forbidden",
            Outcome::Forbidden,
            format!("the token does not grant the scopes this route needs: {scope}"),
        );
        match HeaderValue::from_str(&challenge) {
            Ok(v) => problem.with_header(http::header::WWW_AUTHENTICATE, v),
            Err(_) => problem,
        }
    }

    /// 403: authenticated, but not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", Outcome::Forbidden, detail)
    }

    pub fn no_route(path: &str) -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            "no-route",
            "Not Found",
            Outcome::NoRoute,
            format!("no route matches {path}"),
        )
    }

    pub fn method_not_allowed(allow: &str) -> Self {
        let mut p = Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method Not Allowed",
            Outcome::NoRoute,
            "the route does not accept this method",
        );
        if let Ok(v) = HeaderValue::from_str(allow) {
            p = p.with_header(http::header::ALLOW, v);
        }
        p
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            Outcome::RateLimited,
            format!("rate limit exceeded; retry in {retry_after_secs} s"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// 429: the route's rate limit for all its callers together (`routes[].rate_limit`) is
    /// reached: not the consumer's own limit.
    pub fn route_rate_limited(retry_after_secs: u64) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            Outcome::RateLimited,
            format!("this route's rate limit, shared by all its callers, is reached; retry in {retry_after_secs} s"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// 429: the client's address has used its budget on the route
    /// (`routes[].rate_limit_per_client`).
    pub fn client_rate_limited(retry_after_secs: u64) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too Many Requests",
            Outcome::RateLimited,
            format!("this route's rate limit for each client address is reached; retry in {retry_after_secs} s"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// 429: the consumer already has its plan's `max_in_flight` calls in flight.
    pub fn concurrency_limited(max_in_flight: u32) -> Self {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "concurrency-limited",
            "Too Many Requests",
            Outcome::RateLimited,
            format!("{max_in_flight} calls of this consumer are in flight already, its plan's limit; retry when one has finished"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 429: the consumer's hard monthly quota is used up until `resets_at` (Unix seconds).
    pub fn quota_exceeded(quota: u64, resets_at: i64, now_s: i64) -> Self {
        let reset = tollgate_common::time::format_utc(resets_at);
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota-exceeded",
            "Quota Exceeded",
            Outcome::QuotaExceeded,
            format!("the monthly quota of {quota} calls is used up; it resets at {reset}"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from((resets_at - now_s).max(1)))
    }

    pub fn upstream_unreachable() -> Self {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            "Bad Gateway",
            Outcome::UpstreamError,
            "the upstream could not be reached or answered invalidly",
        )
    }

    /// 503: the route already has `max_in_flight` calls in flight (its upstream's capacity).
    pub fn upstream_overloaded(max_in_flight: u32) -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream-overloaded",
            "Service Unavailable",
            Outcome::UpstreamError,
            format!("the upstream already has {max_in_flight} calls in flight, its limit; retry shortly"),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 503: every target of the route that is in service has its `max_in_flight` calls in
    /// flight (`routes[].upstreams[].max_in_flight`).
    pub fn targets_overloaded() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream-overloaded",
            "Service Unavailable",
            Outcome::UpstreamError,
            "every target of this route has as many calls in flight as it takes; retry shortly".to_owned(),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// 503: the route's calls are at their limit and its queue has `routes[].max_queued`
    /// calls waiting already.
    pub fn queue_full() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream-overloaded",
            "Service Unavailable",
            Outcome::UpstreamError,
            "the upstream has as many calls in flight as it takes and the queue for a place is full; retry shortly"
                .to_owned(),
        )
        .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    pub fn upstream_timeout(timeout_ms: u128) -> Self {
        Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream-timeout",
            "Gateway Timeout",
            Outcome::UpstreamTimeout,
            format!("the upstream did not answer within {timeout_ms} ms"),
        )
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Content Too Large",
            Outcome::BadRequest,
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 408: the request body did not arrive in time.
    pub fn request_timeout(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::REQUEST_TIMEOUT, "request-timeout", "Request Timeout", Outcome::BadRequest, detail)
    }

    pub fn header_fields_too_large(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header-fields-too-large",
            "Request Header Fields Too Large",
            Outcome::BadRequest,
            detail,
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", "Bad Request", Outcome::BadRequest, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": format!("{TYPE_BASE}{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = Response::new(Body::from(body.to_string()));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        headers.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        CallInfo::of(&mut resp).outcome = Some(self.outcome);
        resp
    }
}
