//! A route's upstream targets: round-robin choice and passive health.
//!
//! Passive health (nginx's `max_fails`/`fail_timeout`): a target that fails `max_fails` times
//! in a row (connect error, broken connection, or no response head within the route's
//! timeout; an HTTP 5xx is an answer, not a failure) is ejected for `fail_timeout`. After that
//! one request is let through as a probe: success brings the target back, failure ejects it
//! again. When every target is ejected the edge still tries one (fail open) rather than
//! refusing all traffic on the strength of its own bookkeeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

use crate::config::Route;
use crate::proxy::{self, HttpClient};

/// One target's health.
#[derive(Debug)]
struct Health {
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's epoch until which the target is ejected; 0: in service.
    ejected_until_ms: AtomicU64,
}

/// The targets of one route.
#[derive(Debug)]
pub struct Pool {
    pub targets: Vec<Uri>,
    health: Vec<Health>,
    next: AtomicU64,
    epoch: Instant,
    max_fails: u32,
    fail_timeout: Duration,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(route: &Route) -> Self {
        Self {
            targets: route.upstreams.clone(),
            health: route
                .upstreams
                .iter()
                .map(|_| Health { consecutive_failures: AtomicU32::new(0), ejected_until_ms: AtomicU64::new(0) })
                .collect(),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            max_fails: route.max_fails,
            fail_timeout: route.fail_timeout,
            connect_timeout: route.connect_timeout,
        }
    }

    /// The calling worker thread's client for this route's connect timeout.
    pub fn client(&self, clients: &Clients) -> HttpClient {
        clients.local(self.connect_timeout)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// The next target in round-robin order that is in service (or due a probe), skipping
    /// `tried`. `None` when every target was tried.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.targets.len();
        let start = (self.next.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
        let now = self.now_ms();
        let mut fallback = None;
        for i in (0..n).map(|k| (start + k) % n).filter(|i| !tried.contains(i)) {
            let h = &self.health[i];
            let until = h.ejected_until_ms.load(Ordering::Acquire);
            if until == 0 {
                return Some(i);
            }
            // Ejection over: the first request to claim the probe (by pushing the deadline
            // out again) goes; others keep avoiding the target until the probe succeeds.
            if until <= now
                && h.ejected_until_ms
                    .compare_exchange(until, now + self.fail_timeout_ms(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(i);
            }
            fallback = fallback.or(Some(i));
        }
        fallback
    }

    fn fail_timeout_ms(&self) -> u64 {
        u64::try_from(self.fail_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// The target answered.
    pub fn success(&self, i: usize) {
        let h = &self.health[i];
        h.consecutive_failures.store(0, Ordering::Relaxed);
        if h.ejected_until_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(target = %self.targets[i], "upstream target back in service");
        }
    }

    /// The target failed; returns true when this failure ejected it.
    pub fn failure(&self, i: usize) -> bool {
        let h = &self.health[i];
        let fails = h.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= self.max_fails {
            let was = h.ejected_until_ms.swap(self.now_ms() + self.fail_timeout_ms(), Ordering::AcqRel);
            if was == 0 {
                tracing::warn!(target = %self.targets[i], fails, fail_timeout_ms = self.fail_timeout_ms(), "upstream target ejected");
                return true;
            }
        }
        false
    }

    /// Whether target `i` is ejected right now.
    #[cfg(test)]
    fn is_ejected(&self, i: usize) -> bool {
        let until = self.health[i].ejected_until_ms.load(Ordering::Acquire);
        until != 0 && until > self.now_ms()
    }
}

/// Upstream clients: one per worker thread and connect timeout, so a request and the task
/// driving its upstream connection stay on the worker's runtime. Kept across reloads.
#[derive(Debug)]
pub struct Clients {
    tls: Arc<rustls::ClientConfig>,
}

impl Clients {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self { tls }
    }

    /// This thread's client for `connect_timeout` (created on first use).
    pub fn local(&self, connect_timeout: Duration) -> HttpClient {
        thread_local! {
            // Few distinct timeouts (usually one): a list.
            static LOCAL: std::cell::RefCell<Vec<(Duration, HttpClient)>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LOCAL.with(|m| {
            let mut m = m.borrow_mut();
            if let Some((_, c)) = m.iter().find(|(t, _)| *t == connect_timeout) {
                return c.clone();
            }
            let c = proxy::client(connect_timeout, &self.tls);
            m.push((connect_timeout, c.clone()));
            c
        })
    }
}

/// Pools by route id.
pub type Pools = HashMap<String, Arc<Pool>, foldhash::fast::RandomState>;

/// Every route's pool, by route id.
pub fn pools(routes: &[Arc<Route>]) -> Pools {
    routes.iter().map(|r| (r.id.clone(), Arc::new(Pool::new(r)))).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn route(n: usize, max_fails: u32, fail_timeout: Duration) -> Route {
        let targets: Vec<String> = (0..n).map(|i| format!("http://127.0.0.1:{}", 1000 + i)).collect();
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let mut r = Route::with_defaults("r", "/", &targets).unwrap();
        r.max_fails = max_fails;
        r.fail_timeout = fail_timeout;
        r
    }

    #[tokio::test]
    async fn round_robin_ejection_probe_and_fail_open() {
        let pool = Pool::new(&route(3, 2, Duration::from_millis(300)));
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pool.pick(&[0, 1]), Some(2));
        assert_eq!(pool.pick(&[0, 1, 2]), None);

        // Two failures in a row eject target 1; a success in between resets the count.
        assert!(!pool.failure(1));
        pool.success(1);
        assert!(!pool.failure(1));
        assert!(pool.failure(1));
        assert!(pool.is_ejected(1));
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");

        // After fail_timeout exactly one request probes it.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let picks: Vec<usize> = (0..9).map(|_| pool.pick(&[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");
        pool.success(1);
        assert!(!pool.is_ejected(1));

        // All ejected: still one target is tried.
        for i in 0..3 {
            pool.failure(i);
            pool.failure(i);
        }
        assert!(pool.pick(&[]).is_some());
    }
}
