//! Per-consumer rate limits with `governor` (GCRA). Each consumer gets one limiter, built from
//! its plan when the config loads, so memory is bounded by the configured consumers and
//! unauthenticated traffic creates no state. Limits are per edge replica.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

use crate::Gateway;
use crate::auth::Identity;
use crate::config::Plan;
use crate::problem::Problem;

/// One consumer's limiter.
#[derive(Debug)]
pub struct Limiter {
    inner: governor::DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl Limiter {
    pub fn new(plan: &Plan) -> Self {
        let quota = Quota::per_second(plan.rate_per_second).allow_burst(plan.burst);
        Self { inner: RateLimiter::direct(quota), clock: DefaultClock::default() }
    }

    /// `Err(wait)` when the call is over the limit.
    pub fn check(&self) -> Result<(), Duration> {
        self.inner.check().map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// Seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Layer: 429 with `Retry-After` when the consumer is over its rate.
pub async fn layer(State(_gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    if let Some(identity) = req.extensions().get::<Arc<Identity>>()
        && let Err(wait) = identity.limiter.check()
    {
        return Problem::rate_limited(retry_after_secs(wait)).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn burst_then_refuse_with_wait() {
        let plan = Plan { rate_per_second: NonZeroU32::MIN, burst: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN) };
        let l = Limiter::new(&plan);
        assert!((0..3).all(|_| l.check().is_ok()));
        let wait = l.check().err();
        assert!(wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_secs(1)), "{wait:?}");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
