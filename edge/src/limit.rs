//! Per-consumer rate limits with `governor` (GCRA). Each consumer gets one limiter, built from
//! its plan when the config loads, so memory is bounded by the configured consumers and
//! unauthenticated traffic creates no state. Limits are per edge replica.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::Gateway;
use crate::auth::Identity;
use crate::config::Plan;
use crate::problem::Problem;

type Inner = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One consumer's limiter.
#[derive(Debug)]
pub struct Limiter {
    inner: Inner,
    clock: DefaultClock,
    rate: u32,
    burst: u32,
}

/// The limiter's answer, enough to write the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Calls that could be made right now.
    pub remaining: u32,
    /// Seconds until the full burst is available again (when allowed), or until the next call
    /// is allowed (when refused).
    pub reset_secs: u64,
}

impl Limiter {
    pub fn new(plan: &Plan) -> Self {
        let quota = Quota::per_second(plan.rate_per_second).allow_burst(plan.burst);
        Self {
            inner: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
            rate: plan.rate_per_second.get(),
            burst: plan.burst.get(),
        }
    }

    /// Takes one call from the budget, if there is one.
    pub fn check(&self) -> Decision {
        match self.inner.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = u64::from(self.burst - remaining.min(self.burst));
                Decision { allowed: true, remaining, reset_secs: missing.div_ceil(u64::from(self.rate)) }
            }
            Err(not_until) => Decision {
                allowed: false,
                remaining: 0,
                reset_secs: retry_after_secs(not_until.wait_time_from(self.clock.now())),
            },
        }
    }

    /// The policy headers' values: (quota, window seconds).
    pub fn policy(&self) -> (u32, u64) {
        (self.burst, u64::from(self.burst).div_ceil(u64::from(self.rate)).max(1))
    }
}

/// Adds `RateLimit-Policy` / `RateLimit` (IETF draft-ietf-httpapi-ratelimit-headers) and the
/// common `X-RateLimit-Limit/-Remaining/-Reset`.
pub fn write_headers(headers: &mut http::HeaderMap, limiter: &Limiter, d: Decision) {
    let (quota, window) = limiter.policy();
    let pairs = [
        ("ratelimit-policy", format!("\"default\";q={quota};w={window}")),
        ("ratelimit", format!("\"default\";r={};t={}", d.remaining, d.reset_secs)),
        ("x-ratelimit-limit", quota.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        ("x-ratelimit-reset", d.reset_secs.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Layer: 429 with `Retry-After` when the consumer is over its rate; rate-limit headers on
/// every answer to an authenticated call.
pub async fn layer(State(_gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let Some(identity) = req.extensions().get::<Arc<Identity>>().cloned() else {
        return next.run(req).await;
    };
    let decision = identity.limiter.check();
    let mut resp =
        if decision.allowed { next.run(req).await } else { Problem::rate_limited(decision.reset_secs).into_response() };
    write_headers(resp.headers_mut(), &identity.limiter, decision);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn burst_then_refuse_with_wait() {
        let plan = Plan { rate_per_second: NonZeroU32::MIN, burst: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN) };
        let l = Limiter::new(&plan);
        let remaining: Vec<u32> =
            (0..3).map(|_| l.check()).inspect(|d| assert!(d.allowed)).map(|d| d.remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let refused = l.check();
        assert_eq!(refused, Decision { allowed: false, remaining: 0, reset_secs: 1 });
        assert_eq!(l.policy(), (3, 3));
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &l, refused);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=3");
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=1");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
