//! Rate limits with `governor` (GCRA): per client address on a route
//! (`routes[].rate_limit_per_client`, checked before authentication), per consumer (the
//! plan's `rate_per_second`/`burst`), per consumer and route (the plan's `routes.<id>`), and
//! per route for all its callers together (`routes[].rate_limit`, the upstream's protection,
//! anonymous callers included); a call must pass each that applies, in that order: the
//! client's, the plan's route limit, the consumer's, the route's shared one. Limits are per
//! edge replica.
//!
//! Limiters are created when a consumer first calls and live in a sharded map. Memory stays
//! bounded by the consumers active recently: only authenticated calls create consumer state
//! (never an unauthenticated flood; a flood of random keys creates none), a route's
//! per-client limit keeps one limiter per client network (an IPv4 address, an IPv6 /64: a
//! party that completed TCP handshakes from it, which cannot be invented like keys), and a
//! limiter idle long enough to have refilled its whole burst is pruned — dropping it loses
//! nothing, since a fresh limiter is in the same state.
//!
//! A config reload keeps what every consumer has spent: the new generation starts with the
//! limiters of the one it replaces ([`LimiterCache::carry_over`]), and a limiter whose rate or
//! burst the new config changed is replaced (full, at the new rate) on its next use. Otherwise
//! every reload — each change to a `consumers_file`, say — would hand every consumer a fresh
//! burst.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::auth::Identity;
use crate::config::{Rate, Route};
use crate::problem::Problem;
use crate::{Gateway, Runtime};

type Inner = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One limiter (a consumer, or a consumer on one route).
#[derive(Debug)]
pub struct Limiter {
    inner: Inner,
    clock: DefaultClock,
    rate: u32,
    burst: u32,
    /// Its name in the headers: `route` (the plan's limit for one route), `default` (the
    /// consumer's), `shared` (the route's, for all callers together) or `client` (the route's
    /// for each client address).
    name: &'static str,
    /// This limit's `RateLimit-Policy` list member (`"<name>";q=<burst>;w=<refill s>`) and its
    /// `X-RateLimit-Limit`, made once rather than on every call.
    policy_header: http::HeaderValue,
    limit_header: http::HeaderValue,
    /// Milliseconds since the cache's epoch of the last check.
    last_used_ms: AtomicU64,
    /// The consumer's calls in flight (its plan's `max_in_flight`; on the consumer-wide
    /// limiter only).
    in_flight: Arc<AtomicU32>,
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
    /// A limiter for `rate`, named `name` in the policy headers (`route`, `default`, `shared`).
    pub fn new(rate: &Rate, name: &'static str) -> Self {
        let quota = Quota::per_second(rate.rate_per_second).allow_burst(rate.burst);
        let (burst, per_s) = (rate.burst.get(), rate.rate_per_second.get());
        let policy = format!("\"{name}\";q={burst};w={}", refill_secs(burst, per_s));
        Self {
            inner: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
            rate: per_s,
            burst,
            name,
            policy_header: http::HeaderValue::from_str(&policy).unwrap_or_else(|_| http::HeaderValue::from_static("")),
            limit_header: http::HeaderValue::from(burst),
            last_used_ms: AtomicU64::new(0),
            in_flight: Arc::default(),
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
        (self.burst, self.refill_secs())
    }

    /// Whether this limiter enforces `rate` (a reload may have changed the plan's).
    fn enforces(&self, rate: &Rate) -> bool {
        self.rate == rate.rate_per_second.get() && self.burst == rate.burst.get()
    }

    /// Seconds for an empty bucket to refill completely (at least 1).
    fn refill_secs(&self) -> u64 {
        refill_secs(self.burst, self.rate)
    }
}

/// Seconds for an empty bucket of `burst` to refill at `rate` per second (at least 1).
fn refill_secs(burst: u32, rate: u32) -> u64 {
    u64::from(burst).div_ceil(u64::from(rate)).max(1)
}

/// Which budget a limiter guards: the consumer's (consumer, no route), the consumer's on one
/// route (both), the route's shared by all callers (the route alone), or a client network's
/// on the route (the route and [`client_key`]).
type CacheKey = (Option<Arc<str>>, Option<Arc<str>>, Option<std::net::IpAddr>);

/// The address a client's budget is kept under: an IPv4 address (also when IPv4-mapped), an
/// IPv6 address's /64 (the least a network gives one site: per address, one party would have
/// 2^64 budgets).
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => std::net::Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1)).into(),
        },
        v4 => v4,
    }
}

const SHARDS: usize = 16;
/// A shard is pruned when it has grown to this many entries, then to twice what survived.
const MIN_PRUNE_AT: usize = 256;

#[derive(Debug)]
struct Shard {
    map: HashMap<CacheKey, Arc<Limiter>, foldhash::fast::RandomState>,
    prune_at: usize,
}

/// All limiters of one config generation.
#[derive(Debug)]
pub struct LimiterCache {
    shards: Vec<Mutex<Shard>>,
    hasher: foldhash::fast::RandomState,
    epoch: Instant,
    /// Limiters held, by every generation alive (the `tollgate_edge_limiters` gauge).
    gauge: Arc<AtomicU64>,
}

impl Default for LimiterCache {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl Drop for LimiterCache {
    fn drop(&mut self) {
        self.gauge.fetch_sub(self.len() as u64, Ordering::Relaxed);
    }
}

impl LimiterCache {
    /// An empty cache counting its limiters in `gauge`.
    pub fn new(gauge: Arc<AtomicU64>) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { map: HashMap::default(), prune_at: MIN_PRUNE_AT }))
                .collect(),
            hasher: Default::default(),
            epoch: Instant::now(),
            gauge,
        }
    }

    /// The next generation's cache (config reload): it holds the same limiters (shared with
    /// this one while requests of the old config finish), so budgets spent stay spent. Calls
    /// that the old generation admits after this copy is made create limiters the new one does
    /// not see (a reload's few milliseconds).
    pub fn carry_over(&self) -> Self {
        let shards: Vec<Mutex<Shard>> = self
            .shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Mutex::new(Shard { map: s.map.clone(), prune_at: s.prune_at })
            })
            .collect();
        let held = shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.len() as u64)
            .sum::<u64>();
        self.gauge.fetch_add(held, Ordering::Relaxed);
        Self { shards, hasher: self.hasher.clone(), epoch: self.epoch, gauge: Arc::clone(&self.gauge) }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The limiter of `consumer` (on `route`), or of `route` for all its callers (no
    /// consumer), created from `rate` on first use (or when the one held enforces another
    /// rate: a reload changed the plan or the route).
    pub fn get(&self, consumer: Option<&Arc<str>>, route: Option<&Arc<str>>, rate: &Rate) -> Arc<Limiter> {
        let name = match (consumer, route) {
            (None, _) => "shared",
            (Some(_), Some(_)) => "route",
            (Some(_), None) => "default",
        };
        self.get_key((consumer.cloned(), route.cloned(), None), name, rate)
    }

    /// The limiter of the client at `ip` on `route` (`routes[].rate_limit_per_client`), by
    /// [`client_key`].
    pub fn get_client(&self, ip: std::net::IpAddr, route: &Arc<str>, rate: &Rate) -> Arc<Limiter> {
        self.get_key((None, Some(Arc::clone(route)), Some(client_key(ip))), "client", rate)
    }

    fn get_key(&self, key: CacheKey, name: &'static str, rate: &Rate) -> Arc<Limiter> {
        let now = self.now_ms();
        let shard_index = (self.hasher.hash_one(&key) as usize) % SHARDS;
        let mut shard = self.shards[shard_index].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let limiter = match shard.map.get(&key) {
            Some(l) if l.enforces(rate) => Arc::clone(l),
            held => {
                // The calls in flight of a replaced limiter go on counting.
                let held_in_flight = held.map(|old| Arc::clone(&old.in_flight));
                let replaced = held_in_flight.is_some();
                if !replaced && shard.map.len() >= shard.prune_at {
                    self.prune(&mut shard, now);
                }
                let mut fresh = Limiter::new(rate, name);
                if let Some(in_flight) = held_in_flight {
                    fresh.in_flight = in_flight;
                }
                let l = Arc::new(fresh);
                shard.map.insert(key, Arc::clone(&l));
                if !replaced {
                    self.gauge.fetch_add(1, Ordering::Relaxed);
                }
                l
            }
        };
        limiter.last_used_ms.store(now, Ordering::Relaxed);
        limiter
    }

    /// Drops limiters idle long enough to be full again (and not in use right now).
    fn prune(&self, shard: &mut Shard, now_ms: u64) {
        let before = shard.map.len();
        shard.map.retain(|_, l| {
            let idle_ms = now_ms.saturating_sub(l.last_used_ms.load(Ordering::Relaxed));
            Arc::strong_count(l) > 1 || idle_ms <= l.refill_secs() * 1000 || l.in_flight.load(Ordering::Acquire) > 0
        });
        self.gauge.fetch_sub((before - shard.map.len()) as u64, Ordering::Relaxed);
        shard.prune_at = (shard.map.len() * 2).max(MIN_PRUNE_AT);
    }

    /// Prunes every shard now (tests; in service, shards prune as they grow).
    pub fn prune_all(&self) {
        let now = self.now_ms();
        for s in &self.shards {
            self.prune(&mut s.lock().unwrap_or_else(std::sync::PoisonError::into_inner), now);
        }
    }

    /// Limiters held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The limits that apply to a call and their answers, most specific first.
#[derive(Debug)]
pub struct Checked {
    pub limits: Vec<(Arc<Limiter>, Decision)>,
}

impl Checked {
    pub fn allowed(&self) -> bool {
        self.limits.iter().all(|(_, d)| d.allowed)
    }
}

/// Checks the route limit (if the plan has one for `route`), then the consumer's limit, then
/// the route's shared limit (`routes[].rate_limit`; the only one for an anonymous call). A
/// call refused by one limit does not spend the budgets checked after it; it has spent one
/// unit of those checked before (GCRA cannot give it back). So a consumer over its own limit
/// does not eat into the budget the route's other callers share.
pub fn check(cache: &LimiterCache, identity: Option<&Identity>, route: &Route) -> Checked {
    check_with(cache, identity, route, None, None)
}

/// [`check`], with the consumer's limiter when the caller has it already (`admit` took it for
/// the calls in flight): not looked up twice.
/// `client`: the client's limit on the route, passed already ([`check_client`]).
fn check_with(
    cache: &LimiterCache,
    identity: Option<&Identity>,
    route: &Route,
    consumer: Option<Arc<Limiter>>,
    client: Option<(Arc<Limiter>, Decision)>,
) -> Checked {
    let mut limits = Vec::with_capacity(2);
    limits.extend(client);
    if let Some(identity) = identity {
        if let Some(rate) = identity.plan.routes.get(&route.id) {
            let l = cache.get(Some(&identity.consumer_id), Some(&route.id_key), rate);
            let d = l.check();
            limits.push((l, d));
            if !d.allowed {
                return Checked { limits };
            }
        }
        let l = consumer.unwrap_or_else(|| cache.get(Some(&identity.consumer_id), None, &identity.plan.limit));
        let d = l.check();
        limits.push((l, d));
        if !d.allowed {
            return Checked { limits };
        }
    }
    if let Some(rate) = &route.rate_limit {
        let l = cache.get(None, Some(&route.id_key), rate);
        let d = l.check();
        limits.push((l, d));
    }
    Checked { limits }
}

/// Adds `RateLimit-Policy` / `RateLimit` (IETF draft-ietf-httpapi-ratelimit-headers; one
/// list member per limit that applies) and the common `X-RateLimit-Limit/-Remaining/-Reset`
/// for the most constrained limit. (On every answer: written without `format!`.)
pub fn write_headers(headers: &mut http::HeaderMap, checked: &Checked) {
    use http::HeaderName;
    static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
    static STATE: HeaderName = HeaderName::from_static("ratelimit");
    static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    let Some((most, most_d)) =
        checked.limits.iter().min_by_key(|(_, d)| (d.allowed, d.remaining, std::cmp::Reverse(d.reset_secs)))
    else {
        return;
    };
    let policy = match &checked.limits[..] {
        [(only, _)] => only.policy_header.clone(),
        all => {
            let mut joined = Vec::with_capacity(40 * all.len());
            for (i, (limiter, _)) in all.iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(limiter.policy_header.as_bytes());
            }
            http::HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
                .unwrap_or_else(|_| http::HeaderValue::from_static(""))
        }
    };
    headers.insert(&POLICY, policy);
    let mut state = Vec::with_capacity(24 * checked.limits.len());
    let mut num = itoa::Buffer::new();
    for (limiter, d) in &checked.limits {
        if !state.is_empty() {
            state.extend_from_slice(b", ");
        }
        state.push(b'"');
        state.extend_from_slice(limiter.name.as_bytes());
        state.extend_from_slice(b"\";r=");
        state.extend_from_slice(num.format(d.remaining).as_bytes());
        state.extend_from_slice(b";t=");
        state.extend_from_slice(num.format(d.reset_secs).as_bytes());
    }
    if let Ok(v) = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(state)) {
        headers.insert(&STATE, v);
    }
    headers.insert(&LIMIT, most.limit_header.clone());
    headers.insert(&REMAINING, http::HeaderValue::from(most_d.remaining));
    headers.insert(&RESET, http::HeaderValue::from(most_d.reset_secs));
}

/// The route's limit for the client at `ip` (`routes[].rate_limit_per_client`), checked before
/// authentication: `Ok` with its answer for [`admit`], or the 429 (with its headers). `None`:
/// the route has no such limit.
pub fn check_client(
    gw: &Gateway,
    runtime: &Runtime,
    route: &Route,
    ip: std::net::IpAddr,
) -> Option<Result<(Arc<Limiter>, Decision), Response>> {
    let rate = route.client_rate_limit.as_ref()?;
    let l = runtime.limiters.get_client(ip, &route.id_key, rate);
    let d = l.check();
    if d.allowed {
        return Some(Ok((l, d)));
    }
    gw.metrics.rate_limit_refusals[2].fetch_add(1, Ordering::Relaxed);
    let mut refused = Problem::client_rate_limited(d.reset_secs).into_response();
    write_headers(refused.headers_mut(), &Checked { limits: vec![(l, d)] });
    Some(Err(refused))
}

/// Seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// A call's admission by the rate limits and the monthly quota.
#[derive(Debug)]
pub struct Admission {
    checked: Checked,
    quota: Option<crate::quota::Check>,
    /// The 429, when a limit or a hard quota refuses the call.
    pub refusal: Option<Response>,
    /// The call's place among its consumer's calls in flight (plan `max_in_flight`), to be
    /// held until its response has been sent.
    pub in_flight: Option<crate::upstream::InFlight>,
}

/// Checks the consumer's calls in flight (its plan's `max_in_flight`: a call refused there
/// spends no rate budget), the rate limits, then (within them) the monthly quota, which counts
/// the call when it lets it through. An anonymous call (a route with `auth = "none"`) meets
/// the route's shared rate limit only. `client`: the client's limit on the route, passed
/// before authentication ([`check_client`]), reported in the headers with the others.
pub fn admit(
    gw: &Gateway,
    runtime: &Runtime,
    identity: Option<&Identity>,
    route: &Route,
    client: Option<(Arc<Limiter>, Decision)>,
) -> Admission {
    let (in_flight, consumer) = match identity.and_then(|i| Some((i, i.plan.max_in_flight?))) {
        None => (None, None),
        Some((identity, max)) => {
            let consumer = runtime.limiters.get(Some(&identity.consumer_id), None, &identity.plan.limit);
            match crate::upstream::InFlight::take(&consumer.in_flight, max) {
                Ok(slot) => (Some(slot), Some(consumer)),
                Err(max) => {
                    gw.metrics.in_flight_refusals[1].fetch_add(1, Ordering::Relaxed);
                    let refusal = Some(Problem::concurrency_limited(max).into_response());
                    return Admission {
                        checked: Checked { limits: client.into_iter().collect() },
                        quota: None,
                        refusal,
                        in_flight: None,
                    };
                }
            }
        }
    };
    let checked = check_with(&runtime.limiters, identity, route, consumer, client);
    if let Some((l, d)) = checked.limits.iter().find(|(_, d)| !d.allowed) {
        let shared = l.name == "shared";
        gw.metrics.rate_limit_refusals[usize::from(shared)].fetch_add(1, Ordering::Relaxed);
        let problem =
            if shared { Problem::route_rate_limited(d.reset_secs) } else { Problem::rate_limited(d.reset_secs) };
        return Admission { checked, quota: None, refusal: Some(problem.into_response()), in_flight: None };
    }
    let Some(identity) = identity else {
        return Admission { checked, quota: None, refusal: None, in_flight };
    };
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let quota = gw.quotas.admit(&identity.consumer_id, now_s);
    let refusal = match quota {
        Some(q) if !q.allowed => Some(Problem::quota_exceeded(q.quota, q.resets_at, now_s).into_response()),
        _ => None,
    };
    Admission { checked, quota, refusal, in_flight }
}

impl Admission {
    /// Rate-limit headers (and quota headers) on the answer, whatever it is.
    pub fn write_headers(&self, headers: &mut http::HeaderMap) {
        write_headers(headers, &self.checked);
        if let Some(q) = &self.quota {
            crate::quota::write_headers(headers, q);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Plan;
    use std::num::NonZeroU32;

    fn rate(r: u32, b: u32) -> Rate {
        Rate { rate_per_second: NonZeroU32::new(r).unwrap(), burst: NonZeroU32::new(b).unwrap() }
    }

    fn route(id: &str) -> Route {
        Route::with_defaults(id, "/", &["http://127.0.0.1:1"]).unwrap()
    }

    #[test]
    fn burst_then_refuse_with_wait() {
        let l = Limiter::new(&rate(1, 3), "default");
        let remaining: Vec<u32> =
            (0..3).map(|_| l.check()).inspect(|d| assert!(d.allowed)).map(|d| d.remaining).collect();
        assert_eq!(remaining, vec![2, 1, 0]);
        let refused = l.check();
        assert_eq!(refused, Decision { allowed: false, remaining: 0, reset_secs: 1 });
        assert_eq!(l.policy(), (3, 3));
        let checked = Checked { limits: vec![(Arc::new(l), refused)] };
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &checked);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=3;w=3");
        assert_eq!(h["ratelimit"], "\"default\";r=0;t=1");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn route_limit_applies_on_its_route_only_and_both_show_in_headers() {
        let plan = Plan {
            name: "p".into(),
            limit: rate(1, 5),
            routes: [("slow".to_owned(), rate(1, 2))].into(),
            max_in_flight: None,
        };
        let id = Identity {
            consumer_id: Arc::from("acme"),
            credential_id: Arc::from("k"),
            plan: Arc::new(plan),
            allowed_ips: None,
            grants: None,
        };
        let cache = LimiterCache::default();
        let (slow, fast) = (route("slow"), route("fast"));
        let allowed: Vec<bool> = (0..3).map(|_| check(&cache, Some(&id), &slow).allowed()).collect();
        assert_eq!(allowed, vec![true, true, false]);
        // The refused route call did not spend the consumer's budget: 5 - 2 = 3 left.
        let on_fast: Vec<bool> = (0..4).map(|_| check(&cache, Some(&id), &fast).allowed()).collect();
        assert_eq!(on_fast, vec![true, true, true, false]);
        let c = check(&cache, Some(&id), &slow);
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &c);
        assert_eq!(h["ratelimit-policy"], "\"route\";q=2;w=2");
        assert_eq!(cache.len(), 2);
        // Both limits admit a first call: both are listed, the most constrained is the X- one.
        let cache = LimiterCache::default();
        let c = check(&cache, Some(&id), &slow);
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &c);
        assert_eq!(h["ratelimit-policy"], "\"route\";q=2;w=2, \"default\";q=5;w=5");
        assert_eq!(h["ratelimit"], "\"route\";r=1;t=1, \"default\";r=4;t=1");
        assert_eq!(h["x-ratelimit-limit"], "2");
        assert_eq!(h["x-ratelimit-remaining"], "1");
        assert_eq!(h["x-ratelimit-reset"], "1");
    }

    #[test]
    fn a_routes_shared_limit_counts_every_caller_after_their_own_limits() {
        let plan = |name: &str, b| {
            Arc::new(Plan { name: name.into(), limit: rate(1, b), routes: HashMap::new(), max_in_flight: None })
        };
        let id = |who: &str, plan: &Arc<Plan>| Identity {
            consumer_id: Arc::from(who),
            credential_id: Arc::from("k"),
            plan: Arc::clone(plan),
            allowed_ips: None,
            grants: None,
        };
        let mut shared = route("shared");
        shared.rate_limit = Some(rate(1, 5));
        let cache = LimiterCache::default();
        let (acme, globex) = (id("acme", &plan("small", 2)), id("globex", &plan("big", 100)));
        // acme's own burst of 2 runs out first; its refused calls leave the shared budget alone.
        let acme_calls: Vec<bool> = (0..4).map(|_| check(&cache, Some(&acme), &shared).allowed()).collect();
        assert_eq!(acme_calls, vec![true, true, false, false]);
        let c = check(&cache, Some(&globex), &shared);
        let mut h = http::HeaderMap::new();
        write_headers(&mut h, &c);
        assert_eq!(h["ratelimit-policy"], "\"default\";q=100;w=100, \"shared\";q=5;w=5");
        assert_eq!(h["ratelimit"], "\"default\";r=99;t=1, \"shared\";r=2;t=3");
        assert_eq!(
            (h["x-ratelimit-limit"].to_str().unwrap(), h["x-ratelimit-remaining"].to_str().unwrap()),
            ("5", "2")
        );
        // Anonymous callers (auth = "none") meet the shared limit only, and share it.
        let anonymous: Vec<bool> = (0..3).map(|_| check(&cache, None, &shared).allowed()).collect();
        assert_eq!(anonymous, vec![true, true, false]);
        let refused = check(&cache, Some(&globex), &shared);
        assert!(!refused.allowed());
        assert_eq!(refused.limits.last().unwrap().0.name, "shared");
        // One limiter per consumer, one for the route: none for the anonymous callers.
        assert_eq!(cache.len(), 3);
        // A route without a shared limit and an anonymous call: nothing applies.
        assert!(check(&cache, None, &route("open")).limits.is_empty());
    }

    #[test]
    fn a_reload_keeps_spent_budgets_unless_the_rate_changed() {
        let plan =
            |r, b| Arc::new(Plan { name: "p".into(), limit: rate(r, b), routes: HashMap::new(), max_in_flight: None });
        let id = |plan: &Arc<Plan>, who: &str| Identity {
            consumer_id: Arc::from(who),
            credential_id: Arc::from("k"),
            plan: Arc::clone(plan),
            allowed_ips: None,
            grants: None,
        };
        let (r, slow) = (route("r"), plan(1, 3));
        let gauge = Arc::new(AtomicU64::new(0));
        let old = LimiterCache::new(Arc::clone(&gauge));
        let spent: Vec<bool> = (0..4).map(|_| check(&old, Some(&id(&slow, "acme")), &r).allowed()).collect();
        assert_eq!(spent, vec![true, true, true, false]);
        assert!(check(&old, Some(&id(&slow, "globex")), &r).allowed());
        // Same plan after the reload: acme's budget is still spent, globex has 2 left.
        let new = old.carry_over();
        assert_eq!((new.len(), gauge.load(Ordering::Relaxed)), (2, 4), "both generations count");
        assert!(!check(&new, Some(&id(&slow, "acme")), &r).allowed());
        let globex: Vec<u32> =
            (0..2).map(|_| check(&new, Some(&id(&slow, "globex")), &r).limits[0].1.remaining).collect();
        assert_eq!(globex, vec![1, 0]);
        drop(old);
        assert_eq!(gauge.load(Ordering::Relaxed), 2);
        // The plan's rate changed: a fresh limiter at the new rate, counted once.
        let newer = new.carry_over();
        drop(new);
        let fast = plan(10, 20);
        let d = check(&newer, Some(&id(&fast, "acme")), &r);
        assert_eq!((d.allowed(), d.limits[0].1.remaining), (true, 19));
        assert_eq!((newer.len(), gauge.load(Ordering::Relaxed)), (2, 2));
    }

    #[test]
    fn a_consumers_calls_in_flight_outlive_pruning_and_a_rate_change() {
        use crate::upstream::InFlight;
        let consumer: Arc<str> = Arc::from("acme");
        let cache = LimiterCache::default();
        let l = cache.get(Some(&consumer), None, &rate(10, 1));
        let held: Vec<InFlight> = (0..2).map(|_| InFlight::take(&l.in_flight, 2).unwrap()).collect();
        assert_eq!(InFlight::take(&l.in_flight, 2).unwrap_err(), 2);
        drop(l);
        // Idle past its refill (100 ms) but with calls in flight: kept, and still counting.
        std::thread::sleep(Duration::from_millis(150));
        cache.prune_all();
        assert_eq!(cache.len(), 1);
        // The plan's rate changed: a new limiter, the same calls in flight.
        let l = cache.get(Some(&consumer), None, &rate(20, 5));
        assert_eq!(l.policy(), (5, 1));
        assert!(InFlight::take(&l.in_flight, 2).is_err());
        drop(held);
        assert!(InFlight::take(&l.in_flight, 2).is_ok());
    }

    #[test]
    fn clients_are_limited_by_address_ipv6_by_network_and_pruned_when_idle() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(client_key(ip("203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(client_key(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")), ip("2001:db8:1:2::"));
        let cache = LimiterCache::default();
        let (login, other): (Arc<str>, Arc<str>) = (Arc::from("login"), Arc::from("other"));
        let r = rate(1, 2);
        let pass = |ip: std::net::IpAddr, route: &Arc<str>| cache.get_client(ip, route, &r).check().allowed;
        assert!(pass(ip("203.0.113.7"), &login) && pass(ip("203.0.113.7"), &login));
        assert!(!pass(ip("203.0.113.7"), &login));
        // Another address, or the same one on another route: budgets of their own.
        assert!(pass(ip("203.0.113.8"), &login));
        assert!(pass(ip("203.0.113.7"), &other));
        // Addresses of one /64 share one budget; the next /64 has its own.
        assert!(pass(ip("2001:db8::1"), &login) && pass(ip("2001:db8::2"), &login));
        assert!(!pass(ip("2001:db8::ffff:1"), &login));
        assert!(pass(ip("2001:db8:0:1::1"), &login));
        let l = cache.get_client(ip("203.0.113.7"), &login, &r);
        assert_eq!(l.name, "client");
        // Nor are they the route's shared limiter.
        assert_eq!(cache.get(None, Some(&login), &r).name, "shared");
        drop(l);
        assert_eq!(cache.len(), 6);
        std::thread::sleep(Duration::from_millis(2100));
        cache.prune_all();
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn idle_limiters_are_pruned_and_memory_stays_bounded() {
        let plan = Arc::new(Plan { name: "p".into(), limit: rate(1, 2), routes: HashMap::new(), max_in_flight: None });
        let gauge = Arc::new(AtomicU64::new(0));
        let cache = LimiterCache::new(Arc::clone(&gauge));
        let r = route("r");
        for i in 0..5_000 {
            let id = Identity {
                consumer_id: Arc::from(format!("c{i}")),
                credential_id: Arc::from("k"),
                plan: Arc::clone(&plan),
                allowed_ips: None,
                grants: None,
            };
            assert!(check(&cache, Some(&id), &r).allowed());
        }
        // Refill takes 2 s for this plan; nothing is idle that long yet, so nothing may go.
        cache.prune_all();
        assert_eq!(cache.len(), 5_000);
        assert_eq!(gauge.load(Ordering::Relaxed), 5_000);
        std::thread::sleep(Duration::from_millis(2100));
        cache.prune_all();
        assert_eq!(cache.len(), 0);
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
        // A dropped generation (config reload) takes its limiters off the gauge.
        let id = Identity {
            consumer_id: Arc::from("x"),
            credential_id: Arc::from("k"),
            plan,
            allowed_ips: None,
            grants: None,
        };
        check(&cache, Some(&id), &r);
        assert_eq!(gauge.load(Ordering::Relaxed), 1);
        drop(cache);
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
    }
}
