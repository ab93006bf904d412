//! A route's upstream targets: round-robin choice and passive health.
//!
//! Passive health (nginx's `max_fails`/`fail_timeout`): a target that fails `max_fails` times
//! in a row (connect error, broken connection, or no response head within the route's
//! timeout; an HTTP 5xx is an answer, not a failure) is ejected for `fail_timeout`. After that
//! one request is let through as a probe: success brings the target back, failure ejects it
//! again. When every target is ejected the edge still tries one (fail open) rather than
//! refusing all traffic on the strength of its own bookkeeping.
//!
//! A reload keeps each target's health (same route id, same `scheme://host:port`): an ejected
//! target stays out, and failures counted so far still count.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Uri;

use crate::config::Route;
use crate::queue::{NoPlace, Queue};

/// One target's health.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's epoch until which the target is ejected; 0: in service;
    /// `u64::MAX`: until a health check passes.
    ejected_until_ms: AtomicU64,
    /// Active health checks passed and failed in a row.
    checks_passed: AtomicU32,
    checks_failed: AtomicU32,
}

impl Health {
    /// A copy of `self` (a reload), for a pool with or without active checks.
    fn carried(&self, checked: bool, fail_timeout_from_now: u64) -> Self {
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        // Out until a check passes, but checks are off now: probed after `fail_timeout`.
        let until = if until == u64::MAX && !checked { fail_timeout_from_now } else { until };
        Self {
            consecutive_failures: AtomicU32::new(self.consecutive_failures.load(Ordering::Relaxed)),
            ejected_until_ms: AtomicU64::new(until),
            checks_passed: AtomicU32::new(self.checks_passed.load(Ordering::Relaxed)),
            checks_failed: AtomicU32::new(self.checks_failed.load(Ordering::Relaxed)),
        }
    }
}

/// The targets of one route.
#[derive(Debug)]
pub struct Pool {
    pub targets: Vec<Uri>,
    /// Each target's `Host` header (its authority).
    pub hosts: Vec<Option<http::HeaderValue>>,
    /// Each target's connection-pool key: `scheme://authority`.
    pub keys: Vec<Arc<str>>,
    health: Vec<Health>,
    /// Each target's weight (0: never picked).
    weights: Vec<u32>,
    /// Targets of weight above 0 (counted once, not per request).
    serving: usize,
    /// One cycle of weighted round robin (target indexes), `None` when the weights are all
    /// equal (plain round robin).
    schedule: Option<Box<[u32]>>,
    next: AtomicU64,
    /// Active health checks (`routes[].health_check`): an ejected target comes back only
    /// when a check passes, never through a client's request.
    pub health_check: Option<crate::config::HealthCheck>,
    /// Calls of the route in flight (shared with the pools of earlier and later configs, so a
    /// reload does not open room for more), and their limit (`routes[].max_in_flight`).
    in_flight: Arc<AtomicU32>,
    max_in_flight: Option<u32>,
    /// Each target's calls in flight (carried across reloads by target) and limit
    /// (`upstreams[].max_in_flight`).
    target_in_flight: Vec<Arc<AtomicU32>>,
    target_max_in_flight: Vec<Option<u32>>,
    /// Calls wait this long for a place instead of being refused at once
    /// (`routes[].queue_timeout_ms`).
    queue_timeout: Option<Duration>,
    /// The longest line in each queue (`routes[].max_queued`).
    max_queued: Option<u32>,
    /// Calls waiting for a place of the route's, and for one of any target's; shared with the
    /// pools of earlier and later configs, like the counts.
    route_queue: Arc<Queue>,
    target_queue: Arc<Queue>,
    /// The targets speak HTTP/2 (`routes[].upstream_protocol = "h2"`): h2c with prior knowledge
    /// over `http://`, ALPN `h2` over `https://`.
    pub h2: bool,
    epoch: Instant,
    max_fails: u32,
    fail_timeout: Duration,
    connect_timeout: Duration,
}

impl Pool {
    /// The pool of `route`; on reload `previous` is the route's pool in the config replaced,
    /// whose targets keep their health.
    pub fn new(route: &Route, previous: Option<&Pool>) -> Self {
        let mut pool = Self::fresh(route);
        if let Some(previous) = previous {
            pool.epoch = previous.epoch;
            pool.in_flight = Arc::clone(&previous.in_flight);
            let from_now = pool.now_ms().saturating_add(pool.fail_timeout_ms());
            for (i, key) in pool.keys.iter().enumerate() {
                if let Some(j) = previous.keys.iter().position(|k| k == key) {
                    pool.health[i] = previous.health[j].carried(pool.health_check.is_some(), from_now);
                    pool.target_in_flight[i] = Arc::clone(&previous.target_in_flight[j]);
                }
            }
            // Calls of the old config give their places back to this one's waiters.
            pool.route_queue = Arc::clone(&previous.route_queue);
            pool.target_queue = Arc::clone(&previous.target_queue);
        }
        pool
    }

    fn fresh(route: &Route) -> Self {
        Self {
            targets: route.upstreams.clone(),
            hosts: route
                .upstreams
                .iter()
                .map(|u| u.authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()))
                .collect(),
            keys: route.target_keys.clone(),
            health: route.upstreams.iter().map(|_| Health::default()).collect(),
            weights: route.weights.clone(),
            serving: route.weights.iter().filter(|&&w| w > 0).count(),
            schedule: schedule(&route.weights),
            next: AtomicU64::new(0),
            health_check: route.health_check.clone(),
            in_flight: Arc::default(),
            max_in_flight: route.max_in_flight,
            target_in_flight: route.upstreams.iter().map(|_| Arc::default()).collect(),
            target_max_in_flight: route.target_max_in_flight.clone(),
            queue_timeout: route.queue_timeout,
            max_queued: route.max_queued,
            route_queue: Arc::default(),
            target_queue: Arc::default(),
            h2: route.upstream_h2,
            epoch: Instant::now(),
            max_fails: route.max_fails,
            fail_timeout: route.fail_timeout,
            connect_timeout: route.connect_timeout,
        }
    }

    /// A place among the route's `max_in_flight` calls, held until the call's response has
    /// been sent (`Ok(None)`: the route has no limit); `Err(limit)`: the route is at it, or
    /// calls are queued for a place (a newcomer goes behind them; also when a reload took the
    /// route's `queue_timeout_ms` away while they wait: the queue outlives the config).
    pub fn admit(&self) -> Result<Option<InFlight>, u32> {
        let Some(max) = self.max_in_flight else { return Ok(None) };
        if !self.route_queue.is_empty() {
            return Err(max);
        }
        self.route_place(max)
    }

    fn route_place(&self, max: u32) -> Result<Option<InFlight>, u32> {
        InFlight::take_counted(&self.in_flight, max, Some(&self.route_queue)).map(Some)
    }

    /// How long a call may wait for a place (`routes[].queue_timeout_ms`); `None`: no queue.
    pub fn queue_timeout(&self) -> Option<Duration> {
        self.queue_timeout
    }

    /// A place among the route's calls in flight, waited for in the route's queue until
    /// `deadline`; see [`Queue`] (`routes[].max_queued` calls wait at most).
    pub async fn queue_for_route(&self, deadline: tokio::time::Instant) -> Result<Option<InFlight>, NoPlace> {
        let Some(max) = self.max_in_flight else { return Ok(None) };
        self.route_queue.wait(deadline, self.max_queued, || self.route_place(max).ok()).await
    }

    /// A first target and its place, when every target in service was at its
    /// `max_in_flight`: waited for in the targets' queue until `deadline`.
    pub async fn queue_for_target(&self, deadline: tokio::time::Instant) -> Result<(usize, Option<InFlight>), NoPlace> {
        let take = || match self.choose(&[]) {
            Pick::Target(i, slot) => Some((i, slot)),
            Pick::Busy | Pick::Exhausted => None,
        };
        self.target_queue.wait(deadline, self.max_queued, take).await
    }

    /// Calls waiting now for a place of the route's, and for one of its targets'.
    pub fn queued(&self) -> (u32, u32) {
        (self.route_queue.len(), self.target_queue.len())
    }

    /// Targets that take calls (weight above 0): the most attempts a call can make.
    pub fn serving(&self) -> usize {
        self.serving
    }

    /// Sends `req` to target `i` (see [`Clients::send`], [`Clients::send_h2`]: the request's URI
    /// is absolute for HTTP/2 targets).
    pub async fn send(
        &self,
        clients: &Clients,
        i: usize,
        req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, SendError> {
        if self.h2 {
            clients.send_h2(&self.keys[i], &self.targets[i], self.connect_timeout, req).await
        } else {
            clients.send(&self.keys[i], &self.targets[i], self.connect_timeout, req).await
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// `choose` (below), except that a call's first pick is [`Pick::Busy`] while calls are
    /// queued for a target (a newcomer goes behind them).
    pub fn pick(&self, tried: &[usize]) -> Pick {
        if tried.is_empty() && !self.target_queue.is_empty() {
            return Pick::Busy;
        }
        self.choose(tried)
    }

    /// The next target in (weighted) round-robin order that is in service (or due a probe)
    /// and below its `max_in_flight`, skipping `tried` and targets of weight 0, with its place
    /// among the target's calls in flight; when none is, another target by index (every
    /// target ejected: one is tried anyway). [`Pick::Busy`] when a target in service was passed
    /// over only for its limit, [`Pick::Exhausted`] when every target was tried.
    fn choose(&self, tried: &[usize]) -> Pick {
        let n = self.targets.len();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let start = match &self.schedule {
            Some(cycle) => cycle[(turn % cycle.len() as u64) as usize] as usize,
            None => (turn % n as u64) as usize,
        };
        let now = self.now_ms();
        let (mut fallback, mut busy) = (None, false);
        for i in (0..n).map(|k| (start + k) % n).filter(|&i| self.weights[i] > 0 && !tried.contains(&i)) {
            let h = &self.health[i];
            let until = h.ejected_until_ms.load(Ordering::Acquire);
            // Ejection over: the first request to claim the probe (by pushing the deadline
            // out again) goes; others keep avoiding the target until the probe succeeds. With
            // active health checks the checks decide instead.
            let due = until <= now && self.health_check.is_none();
            if until == 0 || due {
                let Ok(slot) = self.target_slot(i) else {
                    busy = true;
                    continue;
                };
                if until == 0
                    || h.ejected_until_ms
                        .compare_exchange(until, now + self.fail_timeout_ms(), Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    return Pick::Target(i, slot);
                }
            }
            fallback = fallback.or(Some(i));
        }
        // A target in service is busy: better refused (503, retried shortly) than sent to a
        // target known to fail.
        if busy {
            return Pick::Busy;
        }
        match fallback.map(|i| (i, self.target_slot(i))) {
            Some((i, Ok(slot))) => Pick::Target(i, slot),
            Some((_, Err(()))) => Pick::Busy,
            None => Pick::Exhausted,
        }
    }

    /// A place among target `i`'s calls in flight (`Ok(None)`: it has no limit); `Err` when
    /// it is at its limit.
    fn target_slot(&self, i: usize) -> Result<Option<InFlight>, ()> {
        match self.target_max_in_flight[i] {
            None => Ok(None),
            Some(max) => {
                InFlight::take_counted(&self.target_in_flight[i], max, Some(&self.target_queue)).map(Some).map_err(drop)
            }
        }
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
                // Checks passed before this do not count towards its return.
                h.checks_passed.store(0, Ordering::Relaxed);
                tracing::warn!(target = %self.targets[i], fails, fail_timeout_ms = self.fail_timeout_ms(), "upstream target ejected");
                return true;
            }
        }
        false
    }

    /// An active health check of target `i` passed: after `passes` in a row an ejected target
    /// is back in service.
    pub fn check_passed(&self, i: usize) {
        let h = &self.health[i];
        h.checks_failed.store(0, Ordering::Relaxed);
        let passed = h.checks_passed.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if passed >= self.health_check.as_ref().map_or(1, |c| c.passes) {
            self.success(i);
        }
    }

    /// An active health check of target `i` failed: after `fails` in a row the target is out of
    /// service until checks pass again (returns true when this took it out).
    pub fn check_failed(&self, i: usize) -> bool {
        let h = &self.health[i];
        h.checks_passed.store(0, Ordering::Relaxed);
        let failed = h.checks_failed.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if failed < self.health_check.as_ref().map_or(1, |c| c.fails) {
            return false;
        }
        let was = h.ejected_until_ms.swap(u64::MAX, Ordering::AcqRel);
        if was == 0 {
            tracing::warn!(target = %self.targets[i], failed, "upstream target failed its health checks: out of service");
        }
        was == 0
    }

    /// Whether target `i` is in service (not ejected, by passive health or a failed check).
    pub fn in_service(&self, i: usize) -> bool {
        self.health[i].ejected_until_ms.load(Ordering::Acquire) == 0
    }

    /// Whether target `i` is ejected right now.
    #[cfg(test)]
    fn is_ejected(&self, i: usize) -> bool {
        let until = self.health[i].ejected_until_ms.load(Ordering::Acquire);
        until != 0 && until > self.now_ms()
    }
}

/// What [`Pool::pick`] found.
#[derive(Debug)]
pub enum Pick {
    /// This target, with its place among its calls in flight when it has a limit (held
    /// until the response has been sent).
    Target(usize, Option<InFlight>),
    /// Every target in service that was not tried has its `max_in_flight` calls in flight.
    Busy,
    /// Every target was tried.
    Exhausted,
}

impl Pick {
    /// The target picked, if one was.
    pub fn target(&self) -> Option<usize> {
        match self {
            Pick::Target(i, _) => Some(*i),
            Pick::Busy | Pick::Exhausted => None,
        }
    }
}

/// One of a route's calls in flight ([`Pool::admit`]); dropping it makes room for another
/// (and wakes the head of the calls queued for one, `routes[].queue_timeout_ms`).
#[derive(Debug)]
pub struct InFlight {
    count: Arc<AtomicU32>,
    queue: Option<Arc<Queue>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Given back before the queue is looked at, `SeqCst`: see [`Queue`].
        self.count.fetch_sub(1, Ordering::SeqCst);
        if let Some(queue) = &self.queue {
            queue.released();
        }
    }
}

impl InFlight {
    /// A place among `count`'s calls, if fewer than `max` hold one (`Err(max)` otherwise).
    pub fn take(count: &Arc<AtomicU32>, max: u32) -> Result<Self, u32> {
        Self::take_counted(count, max, None)
    }

    /// [`InFlight::take`], waking `queue`'s head when the place is given back.
    fn take_counted(count: &Arc<AtomicU32>, max: u32, queue: Option<&Arc<Queue>>) -> Result<Self, u32> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .map(|_| Self { count: Arc::clone(count), queue: queue.cloned() })
            .map_err(|_| max)
    }

    /// `body`, holding this place until its last frame (or until it is dropped: the client
    /// went away).
    pub fn hold(self, body: axum::body::Body) -> axum::body::Body {
        Self::hold_all(body, [Some(self), None])
    }

    /// `body`, holding these places (a call's route's and target's) until its last frame, in
    /// one wrapper; `body` itself when there are none.
    pub fn hold_all(body: axum::body::Body, slots: [Option<InFlight>; 2]) -> axum::body::Body {
        if slots.iter().all(Option::is_none) {
            return body;
        }
        axum::body::Body::new(Holding { body, slots })
    }
}

/// A response body holding its call's places among the calls in flight.
struct Holding {
    body: axum::body::Body,
    slots: [Option<InFlight>; 2],
}

impl http_body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            self.slots = [None, None];
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// One cycle of smooth weighted round robin (nginx's): at each turn every target gains its
/// weight, the one with the most (the first on a tie) is picked and loses the sum of the
/// weights. A target of weight w gets w turns of the cycle, spread out rather than bunched (5,
/// 1, 1: a a b a c a a). The weights are divided by their greatest common divisor first. `None`
/// when they are all equal: plain round robin.
fn schedule(weights: &[u32]) -> Option<Box<[u32]>> {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    if weights.windows(2).all(|w| w[0] == w[1]) {
        return None;
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / g)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let mut best = 0;
        for (i, c) in current.iter().enumerate() {
            if *c > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(u32::try_from(best).unwrap_or(0));
    }
    Some(cycle.into_boxed_slice())
}

/// Upstream connections: HTTP/1.1 keep-alive connections pooled per worker thread and
/// target, so a request and the task driving its upstream connection stay on the worker's
/// runtime. A connection goes back to its thread's pool when its response body has been read
/// to the end; one whose response was abandoned (client gone, timeout) is closed. Idle
/// connections are closed after [`IDLE_TIMEOUT`]; at most [`MAX_IDLE_PER_TARGET`] are kept per
/// target. Kept across reloads (the pools are keyed by the target's scheme and authority),
/// except https connections when a reload changes the TLS settings ([`Clients::set_tls`]).
#[derive(Debug)]
pub struct Clients {
    tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    /// Bumped by each [`Clients::set_tls`]: threads drop their https connections and their
    /// connectors when they see a new value.
    generation: AtomicU64,
}

/// Idle upstream connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per target and worker thread.
pub const MAX_IDLE_PER_TARGET: usize = 256;
/// HTTP/2 upstream connections are PINGed this often, and closed when a PING is not answered
/// within [`H2_PING_TIMEOUT`].
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

pub type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Sender = hyper::client::conn::http1::SendRequest<axum::body::Body>;
type H2Sender = hyper::client::conn::http2::SendRequest<axum::body::Body>;
type H2Slot = Arc<tokio::sync::Mutex<H2State>>;

/// A thread's HTTP/2 connection to a target.
#[derive(Default)]
struct H2State {
    /// The connection, and when a request last took it.
    conn: Option<(H2Sender, Instant)>,
    /// The last failed attempt to connect: when it ended, and why. Requests that were waiting
    /// for it fail with it instead of each trying again in turn.
    failed: Option<(Instant, String)>,
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: the request did not reach the upstream.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed while the request was sent or its response awaited.
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An upstream connection: its request side, and the task that drives it. The task is aborted
/// when the connection is dropped — an abandoned request (timeout, client gone), a broken
/// body, an idle connection let go — so a connection stuck on an upstream that stopped reading
/// is closed with its request, not left to wait (with the client's request body it holds).
struct Conn {
    sender: Sender,
    task: Option<tokio::task::AbortHandle>,
}

impl Conn {
    /// Lets the task run on after the connection is dropped (an upgrade takes its socket).
    fn let_run(mut self) {
        self.task = None;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// One worker thread's connectors (by connect timeout) and idle connections (by target),
/// made with the TLS settings of `generation`.
#[derive(Default)]
struct Local {
    generation: u64,
    /// By connect timeout and protocol (HTTP/2: ALPN `h2` only).
    connectors: Vec<((Duration, bool), Connector)>,
    idle: HashMap<Arc<str>, Vec<Idle>, foldhash::fast::RandomState>,
    /// One HTTP/2 connection per target, shared by the thread's requests (multiplexed); the
    /// lock is held while it is made, so a burst of requests opens one, not one each.
    h2: HashMap<Arc<str>, H2Slot, foldhash::fast::RandomState>,
}

impl Local {
    /// Forgets what was made with older TLS settings: the connectors, and the idle https
    /// connections (closed as they drop), so no request goes out on a connection whose server
    /// certificate the new CA list would refuse, or with the client certificate replaced.
    fn sync(&mut self, generation: u64) {
        if self.generation != generation {
            self.generation = generation;
            self.connectors.clear();
            self.idle.retain(|key, _| !key.starts_with("https:"));
            self.h2.retain(|key, _| !key.starts_with("https:"));
        }
    }
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> = std::cell::RefCell::new(Local::default());
}

impl Clients {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self { tls: std::sync::RwLock::new(tls), generation: AtomicU64::new(0) }
    }

    /// New TLS settings (a reload changed `edge.tls_ca_file` or the upstream client
    /// certificate): new connections use them, and each thread closes its idle https
    /// connections at its next upstream request. Connections busy with a request finish it and
    /// are then closed instead of pooled.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        *self.tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Sends `req` (origin-form URI, `Host` set) to `target` (keyed `key`): on an idle pooled
    /// connection if there is one, else on a new one. A request that a pooled connection
    /// could not take (it was closing) goes to the next one or a new one: it was not sent.
    pub async fn send(
        &self,
        key: &Arc<str>,
        target: &Uri,
        connect_timeout: Duration,
        mut req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, SendError> {
        let generation = self.generation.load(Ordering::Acquire);
        while let Some(mut conn) = checkout(key, generation) {
            if conn.sender.ready().await.is_err() {
                continue;
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok(returning(resp, conn, key, generation)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        // (Boxed: connecting is rare on pooled connections, and its future would otherwise
        // enlarge every request's.)
        let mut conn = Box::pin(self.connect(target, connect_timeout)).await?;
        let resp = conn.sender.send_request(req).await?;
        Ok(returning(resp, conn, key, generation))
    }

    /// Sends `req` (absolute URI) to an HTTP/2 `target` (keyed `key`) on the thread's
    /// connection to it, made on first use and again when it has closed. A request the
    /// connection could not take (it was closing) goes on a new one: it was not sent.
    pub async fn send_h2(
        &self,
        key: &Arc<str>,
        target: &Uri,
        connect_timeout: Duration,
        mut req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, SendError> {
        let generation = self.generation.load(Ordering::Acquire);
        let slot = LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            l.sync(generation);
            Arc::clone(l.h2.entry(Arc::clone(key)).or_default())
        });
        let arrived = Instant::now();
        for attempt in 0..2 {
            let mut sender = {
                let mut held = slot.lock().await;
                if let Some((at, why)) = &held.failed
                    && *at >= arrived
                {
                    return Err(SendError::Connect(why.clone()));
                }
                match held.conn.as_mut().filter(|(s, _)| attempt == 0 && !s.is_closed()) {
                    Some((s, used)) => {
                        *used = Instant::now();
                        s.clone()
                    }
                    None => match Box::pin(self.connect_h2(target, connect_timeout)).await {
                        Ok(s) => {
                            *held = H2State { conn: Some((s.clone(), Instant::now())), failed: None };
                            s
                        }
                        Err(e) => {
                            let why = match &e {
                                SendError::Connect(why) => why.clone(),
                                other => other.to_string(),
                            };
                            held.failed = Some((Instant::now(), why));
                            return Err(e);
                        }
                    },
                }
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(axum::body::Body::new)),
                // Not sent (the connection was closing): once more on a new one.
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        Err(SendError::Connect("the new HTTP/2 connection closed before the request could be sent".into()))
    }

    /// This thread's connector for `connect_timeout` and the protocol.
    fn local_connector(&self, connect_timeout: Duration, h2: bool) -> Connector {
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if let Some((_, c)) = l.connectors.iter().find(|(k, _)| *k == (connect_timeout, h2)) {
                return c.clone();
            }
            let tls = self.tls.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let c = if h2 { connector_h2(connect_timeout, &tls) } else { connector(connect_timeout, &tls) };
            l.connectors.push(((connect_timeout, h2), c.clone()));
            c
        })
    }

    async fn connect_h2(&self, target: &Uri, connect_timeout: Duration) -> Result<H2Sender, SendError> {
        use tower::ServiceExt;
        let connector = self.local_connector(connect_timeout, true);
        let io = connector.oneshot(target.clone()).await.map_err(|e| SendError::Connect(e.to_string()))?;
        // No request has gone out yet: a failed handshake is a failure to connect. PINGs find
        // a connection whose upstream vanished without closing it (it is then made again)
        // rather than leaving every request on it to time out.
        let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect(&self, target: &Uri, connect_timeout: Duration) -> Result<Conn, SendError> {
        use tower::ServiceExt;
        let connector = self.local_connector(connect_timeout, false);
        let io = connector.oneshot(target.clone()).await.map_err(|e| SendError::Connect(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new().handshake(io).await?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn { sender, task: Some(task.abort_handle()) })
    }

    /// Closes this thread's connections idle longer than [`IDLE_TIMEOUT`] (or closed by the
    /// upstream). Each worker runs this every few seconds.
    pub fn sweep_local() {
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            l.idle.retain(|_, conns| {
                conns.retain(|c| c.since.elapsed() < IDLE_TIMEOUT && !c.conn.sender.is_closed());
                !conns.is_empty()
            });
            // An HTTP/2 connection no request took for IDLE_TIMEOUT is let go: it closes once
            // the streams still open on it (a long download) are done.
            l.h2.retain(|_, slot| {
                slot.try_lock().map_or(true, |s| {
                    s.conn.as_ref().is_some_and(|(s, used)| !s.is_closed() && used.elapsed() < IDLE_TIMEOUT)
                })
            });
        });
    }

    /// Idle connections this thread holds for `key` (tests).
    pub fn idle_local(key: &str) -> usize {
        LOCAL.with(|l| l.borrow().idle.get(key).map_or(0, Vec::len))
    }
}

/// The HTTP(S) connector (TCP_NODELAY, connect timeout, rustls per [`crate::tls`]) for
/// upstream connections and the edge's own requests.
pub fn connector(connect_timeout: Duration, tls: &Arc<rustls::ClientConfig>) -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp(connect_timeout))
}

fn tcp(connect_timeout: Duration) -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.enforce_http(false);
    http
}

/// [`connector`] offering only `h2` in TLS (ALPN); plain TCP for `http://` (h2c, prior
/// knowledge).
pub fn connector_h2(connect_timeout: Duration, tls: &Arc<rustls::ClientConfig>) -> Connector {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(rustls::ClientConfig::clone(tls))
        .https_or_http()
        .enable_http2()
        .wrap_connector(tcp(connect_timeout))
}

/// The newest idle connection for `key` that is still open (and made with the TLS settings of
/// `generation`).
fn checkout(key: &str, generation: u64) -> Option<Conn> {
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        l.sync(generation);
        let conns = l.idle.get_mut(key)?;
        while let Some(c) = conns.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT && !c.conn.sender.is_closed() {
                return Some(c.conn);
            }
        }
        None
    })
}

/// Pools a connection made with the TLS settings of `generation`, unless they are outdated.
fn checkin(key: &Arc<str>, conn: Conn, generation: u64) {
    if conn.sender.is_closed() {
        return;
    }
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if l.generation != generation && key.starts_with("https:") {
            return;
        }
        let conns = l.idle.entry(Arc::clone(key)).or_default();
        if conns.len() < MAX_IDLE_PER_TARGET {
            conns.push(Idle { conn, since: Instant::now() });
        }
    });
}

/// The response with a body that returns the connection to the pool once read to the end.
/// A `101 Switching Protocols` keeps nothing: the connection becomes the upgrade's.
fn returning(
    resp: http::Response<hyper::body::Incoming>,
    conn: Conn,
    key: &Arc<str>,
    generation: u64,
) -> http::Response<axum::body::Body> {
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        conn.let_run();
        return resp.map(axum::body::Body::new);
    }
    let key = Arc::clone(key);
    resp.map(|inner| axum::body::Body::new(ReturningBody { inner, conn: Some((conn, key, generation)) }))
}

/// An upstream response body that gives its connection back when it ends.
struct ReturningBody {
    inner: hyper::body::Incoming,
    conn: Option<(Conn, Arc<str>, u64)>,
}

impl http_body::Body for ReturningBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.release(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            // A broken body: the connection is not reused.
            std::task::Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl ReturningBody {
    fn release(&mut self) {
        if let Some((conn, key, generation)) = self.conn.take() {
            checkin(&key, conn, generation);
        }
    }
}

impl Drop for ReturningBody {
    fn drop(&mut self) {
        // Bodies that are empty (HEAD, 204, 304, `Content-Length: 0`) may never be polled.
        if http_body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }
}

/// Pools by route id.
pub type Pools = HashMap<String, Arc<Pool>, foldhash::fast::RandomState>;

/// Active health checks (`routes[].health_check`), for whatever config is current: every
/// target of such a route is asked `GET <scheme>://<authority><path>` every `interval`; a
/// 2xx or 3xx answer within `timeout` passes, anything else fails. `fails` failures in a row
/// take the target out of service, `passes` passes in a row bring it back. Each check runs in
/// its own task, so a slow target does not delay the others'. A reload checks the new routes'
/// targets at once (each keeps its health and its counts of checks in a row).
pub async fn run_health_checks(gw: Arc<crate::Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked: Option<Arc<crate::Runtime>> = None;
    // When each target of each pool (of the runtime checked) is due next.
    let mut due: HashMap<(usize, usize), Instant> = HashMap::new();
    loop {
        tick.tick().await;
        let runtime = gw.runtime();
        if !checked.as_ref().is_some_and(|c| Arc::ptr_eq(c, &runtime)) {
            due.clear();
            checked = Some(Arc::clone(&runtime));
        }
        let now = Instant::now();
        for pool in runtime.pools.values() {
            let Some(check) = &pool.health_check else { continue };
            for i in 0..pool.targets.len() {
                let next = due.entry((Arc::as_ptr(pool) as usize, i)).or_insert(now);
                if *next > now {
                    continue;
                }
                *next = now + check.interval;
                let url = format!("{}{}", pool.keys[i], check.path);
                let (pool, client, gw) = (Arc::clone(pool), runtime.client.clone(), Arc::clone(&gw));
                let timeout = check.timeout;
                tokio::spawn(async move {
                    let passed = check_once(&client, &gw.clients, &pool, i, &url, timeout).await;
                    let metrics = &gw.metrics;
                    metrics.health_checks[usize::from(!passed)].fetch_add(1, Ordering::Relaxed);
                    if passed {
                        pool.check_passed(i);
                    } else if pool.check_failed(i) {
                        metrics.upstream_ejections.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
}

/// One health check of target `i`: a 2xx or 3xx answer within `timeout` (its body is not
/// read). HTTP/1.1 targets are asked with `client` (the JWKS client: the edge's TLS settings),
/// HTTP/2 ones over the edge's own connection to them.
async fn check_once(
    client: &crate::proxy::HttpClient,
    clients: &Clients,
    pool: &Pool,
    i: usize,
    url: &str,
    timeout: Duration,
) -> bool {
    let version = if pool.h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 };
    let Ok(req) = http::Request::get(url)
        .version(version)
        .header(http::header::USER_AGENT, "tollgate-edge-health-check")
        .body(axum::body::Body::empty())
    else {
        return false;
    };
    let asked = tokio::time::timeout(timeout, async {
        if pool.h2 {
            pool.send(clients, i, req).await.map(|r| r.status()).map_err(|e| e.to_string())
        } else {
            client.request(req).await.map(|r| r.status()).map_err(|e| e.to_string())
        }
    });
    match asked.await {
        Ok(Ok(status)) => status.is_success() || status.is_redirection(),
        Ok(Err(error)) => {
            tracing::debug!(%url, %error, "health check failed");
            false
        }
        Err(_) => false,
    }
}

/// `tollgate_edge_upstream_target_up{route, target}` for every target of the current config,
/// in Prometheus text (appended to `out`).
pub fn render_targets(pools: &Pools, out: &mut String) {
    use std::fmt::Write;
    let name = "tollgate_edge_upstream_target_up";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while the route's target is in service, 0 while it is ejected (failed requests, or a failed health check).\n# TYPE {name} gauge"
    );
    let mut routes: Vec<_> = pools.iter().collect();
    routes.sort_by(|a, b| a.0.cmp(b.0));
    let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    for (route, pool) in &routes {
        for (i, key) in pool.keys.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{route=\"{}\",target=\"{}\"}} {}",
                label(route),
                label(key),
                u8::from(pool.in_service(i))
            );
        }
    }
    let name = "tollgate_edge_route_in_flight";
    let _ = writeln!(
        out,
        "# HELP {name} Calls in flight to the upstream of each route with a `max_in_flight` limit.\n# TYPE {name} gauge"
    );
    for (route, pool) in routes.iter().filter(|(_, p)| p.max_in_flight.is_some()) {
        let _ = writeln!(out, "{name}{{route=\"{}\"}} {}", label(route), pool.in_flight.load(Ordering::Relaxed));
    }
    let name = "tollgate_edge_upstream_target_in_flight";
    let _ = writeln!(
        out,
        "# HELP {name} Calls in flight to each target with a `max_in_flight` limit (routes[].upstreams[]).\n# TYPE {name} gauge"
    );
    for (route, pool) in &routes {
        for (i, key) in pool.keys.iter().enumerate().filter(|(i, _)| pool.target_max_in_flight[*i].is_some()) {
            let n = pool.target_in_flight[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{route=\"{}\",target=\"{}\"}} {n}", label(route), label(key));
        }
    }
    let name = "tollgate_edge_queue_length";
    let _ = writeln!(
        out,
        "# HELP {name} Calls waiting for a place (`place`: the route's `max_in_flight`, or its targets') on each route with a `queue_timeout_ms`.\n# TYPE {name} gauge"
    );
    for (route, pool) in routes.iter().filter(|(_, p)| p.queue_timeout.is_some()) {
        let (on_route, on_target) = pool.queued();
        let _ = writeln!(out, "{name}{{route=\"{}\",place=\"route\"}} {on_route}", label(route));
        let _ = writeln!(out, "{name}{{route=\"{}\",place=\"target\"}} {on_target}", label(route));
    }
}

/// Every route's pool, by route id; on reload `previous` holds the pools whose targets' health
/// carries over (by route id and target).
pub fn pools(routes: &[Arc<Route>], previous: Option<&Pools>) -> Pools {
    routes
        .iter()
        .map(|r| (r.id.clone(), Arc::new(Pool::new(r, previous.and_then(|p| p.get(&r.id)).map(Arc::as_ref)))))
        .collect()
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
        let pool = Pool::new(&route(3, 2, Duration::from_millis(300)), None);
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pool.pick(&[0, 1]).target(), Some(2));
        assert_eq!(pool.pick(&[0, 1, 2]).target(), None);

        // Two failures in a row eject target 1; a success in between resets the count.
        assert!(!pool.failure(1));
        pool.success(1);
        assert!(!pool.failure(1));
        assert!(pool.failure(1));
        assert!(pool.is_ejected(1));
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");

        // After fail_timeout exactly one request probes it.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let picks: Vec<usize> = (0..9).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");
        pool.success(1);
        assert!(!pool.is_ejected(1));

        // All ejected: still one target is tried.
        for i in 0..3 {
            pool.failure(i);
            pool.failure(i);
        }
        assert!(pool.pick(&[]).target().is_some());
    }

    #[tokio::test]
    async fn with_active_checks_no_client_request_probes_an_ejected_target() {
        let mut r = route(2, 1, Duration::from_millis(100));
        r.health_check = Some(check(1, 1));
        let pool = Pool::new(&r, None);
        // A passive ejection: after fail_timeout the target is still left alone.
        assert!(pool.failure(1));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert!(picks.iter().all(|&i| i == 0), "{picks:?}");
        // A passing check brings it back; a failing one takes the other out.
        pool.success(1);
        assert!(pool.check_failed(0));
        assert!(!pool.check_failed(0), "already out");
        let picks: Vec<usize> = (0..6).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert!(picks.iter().all(|&i| i == 1), "{picks:?}");
    }

    fn check(fails: u32, passes: u32) -> crate::config::HealthCheck {
        crate::config::HealthCheck {
            path: "/health".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            fails,
            passes,
        }
    }

    #[test]
    fn checks_take_a_target_out_after_fails_in_a_row_and_back_after_passes_in_a_row() {
        let mut r = route(2, 1, Duration::from_secs(60));
        r.health_check = Some(check(3, 2));
        let pool = Pool::new(&r, None);
        // Two failures, a pass, two failures: never three in a row.
        assert!(!pool.check_failed(1));
        assert!(!pool.check_failed(1));
        pool.check_passed(1);
        assert!(!pool.check_failed(1));
        assert!(!pool.check_failed(1));
        assert!(pool.in_service(1));
        assert!(pool.check_failed(1), "the third in a row");
        assert!(!pool.in_service(1));
        // One pass is not enough; a failure starts the count over; two in a row bring it back.
        pool.check_passed(1);
        assert!(!pool.check_failed(1));
        pool.check_passed(1);
        assert!(!pool.in_service(1));
        pool.check_passed(1);
        assert!(pool.in_service(1));
        // Passes made before a passive ejection do not count towards the return.
        pool.check_passed(0);
        pool.check_passed(0);
        assert!(pool.failure(0));
        pool.check_passed(0);
        assert!(!pool.in_service(0));
        pool.check_passed(0);
        assert!(pool.in_service(0));
    }

    #[tokio::test]
    async fn a_reload_keeps_each_targets_health() {
        let old = Pool::new(&route(3, 2, Duration::from_millis(200)), None);
        assert!(!old.failure(0));
        old.failure(1);
        assert!(old.failure(1));
        // Target 2 is replaced by another; 0 and 1 stay (1 ejected, 0 one failure from it).
        let mut r = Route::with_defaults(
            "r",
            "/",
            &["http://127.0.0.1:1000", "http://127.0.0.1:1001", "http://127.0.0.1:2000"],
        )
        .unwrap();
        (r.max_fails, r.fail_timeout) = (2, Duration::from_millis(200));
        let new = Pool::new(&r, Some(&old));
        assert!(new.is_ejected(1));
        assert!(new.in_service(2), "a new target starts in service");
        assert!(new.failure(0), "the failure before the reload still counts");
        let picks: Vec<usize> = (0..4).map(|_| new.pick(&[]).target().unwrap()).collect();
        assert!(picks.iter().all(|&i| i == 2), "{picks:?}");
        // Ejected on the old pool's clock: probed once its fail_timeout is over.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let picks: Vec<usize> = (0..6).map(|_| new.pick(&[]).target().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");

        // Out by a failed check, then checks are removed: probed after fail_timeout, not never.
        let mut checked = route(2, 2, Duration::from_millis(100));
        checked.health_check = Some(check(1, 1));
        let old = Pool::new(&checked, None);
        assert!(old.check_failed(0));
        let kept = Pool::new(&checked, Some(&old));
        assert!(!kept.in_service(0), "still out until a check passes");
        let unchecked = Pool::new(&route(2, 2, Duration::from_millis(100)), Some(&old));
        assert!(unchecked.is_ejected(0));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let picks: Vec<usize> = (0..4).map(|_| unchecked.pick(&[]).target().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 1, "{picks:?}");
    }

    #[test]
    fn max_in_flight_admits_up_to_the_limit_across_a_reload() {
        let mut r = route(2, 1, Duration::from_secs(1));
        assert!(Pool::new(&r, None).admit().unwrap().is_none(), "no limit: nothing to hold");
        r.max_in_flight = Some(2);
        let old = Pool::new(&r, None);
        let (a, _b) = (old.admit().unwrap(), old.admit().unwrap());
        assert_eq!(old.admit().unwrap_err(), 2);
        // The new config's pool counts the old one's calls.
        let new = Pool::new(&r, Some(&old));
        assert_eq!(new.admit().unwrap_err(), 2);
        drop(a);
        let c = new.admit().unwrap();
        assert!(c.is_some());
        assert_eq!(new.admit().unwrap_err(), 2);
    }

    #[test]
    fn a_target_at_its_max_in_flight_is_passed_over_until_a_call_ends() {
        let mut r = route(3, 1, Duration::from_secs(60));
        r.target_max_in_flight = vec![Some(1), Some(1), None];
        let pool = Pool::new(&r, None);
        let take = |tried: &[usize]| match pool.pick(tried) {
            Pick::Target(i, slot) => (i, slot),
            other => panic!("{other:?}"),
        };
        let (a, slot_a) = take(&[]);
        let (b, slot_b) = take(&[]);
        assert_eq!((a, b, slot_a.is_some(), slot_b.is_some()), (0, 1, true, true));
        // Targets 0 and 1 are full: the unlimited target 2 takes every call.
        let rest: Vec<usize> = (0..4).map(|_| take(&[]).0).collect();
        assert_eq!(rest, [2, 2, 2, 2]);
        // With target 2 tried (a retry), only busy targets are left.
        assert!(matches!(pool.pick(&[2]), Pick::Busy));
        assert!(matches!(pool.pick(&[0, 1, 2]), Pick::Exhausted));
        drop(slot_a);
        assert_eq!(pool.pick(&[2]).target(), Some(0));
        // A reload keeps the count: target 1's call is still in flight.
        let new = Pool::new(&r, Some(&pool));
        assert!(matches!(new.pick(&[0, 2]), Pick::Busy));
        drop(slot_b);
        assert_eq!(new.pick(&[0, 2]).target(), Some(1));
    }

    #[tokio::test]
    async fn a_queued_call_gets_the_place_given_back_or_gives_up_at_its_deadline() {
        let mut r = route(1, 1, Duration::from_secs(60));
        r.max_in_flight = Some(1);
        r.queue_timeout = Some(Duration::from_secs(5));
        let pool = Arc::new(Pool::new(&r, None));
        let held = pool.admit().unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let start = Instant::now();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let got = pool.queue_for_route(deadline).await;
                (got.map(|s| s.is_some()), start.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        let (got, waited) = waiter.await.unwrap();
        assert_eq!(got, Ok(true));
        assert!(waited >= Duration::from_millis(90) && waited < Duration::from_secs(2), "{waited:?}");
        // Nobody gives the place back: refused at the deadline, not before.
        let _held = pool.admit().unwrap().unwrap();
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(150);
        assert_eq!(pool.queue_for_route(deadline).await.unwrap_err(), NoPlace::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(140), "{:?}", start.elapsed());
        // A place given back by the previous config's call wakes this config's waiters.
        let new = Arc::new(Pool::new(&r, Some(&pool)));
        let waiter = {
            let new = Arc::clone(&new);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                new.queue_for_route(deadline).await.map(|s| s.is_some())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(new.queued(), (1, 0));
        drop(_held);
        assert_eq!(tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap(), Ok(true));
        assert_eq!(new.queued(), (0, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_body_holds_the_routes_and_the_targets_place_to_its_end() {
        use http_body_util::BodyExt;
        let mut r = route(1, 1, Duration::from_secs(60));
        r.max_in_flight = Some(1);
        r.target_max_in_flight = vec![Some(1)];
        let pool = Pool::new(&r, None);
        let route_place = pool.admit().unwrap();
        let Pick::Target(0, target_place) = pool.pick(&[]) else { panic!("the target") };
        let body = InFlight::hold_all(axum::body::Body::from("answer"), [route_place, target_place]);
        assert_eq!((pool.in_flight.load(Ordering::SeqCst), pool.target_in_flight[0].load(Ordering::SeqCst)), (1, 1));
        assert!(pool.admit().is_err() && matches!(pool.pick(&[]), Pick::Busy));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "answer");
        assert_eq!((pool.in_flight.load(Ordering::SeqCst), pool.target_in_flight[0].load(Ordering::SeqCst)), (0, 0));
        // No place to hold: the body is not wrapped.
        let plain = InFlight::hold_all(axum::body::Body::from("x"), [None, None]);
        assert_eq!(http_body::Body::size_hint(&plain).exact(), Some(1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn while_calls_are_queued_a_newcomer_does_not_take_the_place_given_back() {
        let mut r = route(2, 1, Duration::from_secs(60));
        r.max_in_flight = Some(1);
        r.target_max_in_flight = vec![Some(1), Some(1)];
        r.queue_timeout = Some(Duration::from_secs(5));
        let pool = Arc::new(Pool::new(&r, None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        // The route's place: held, one call queued; given back, a newcomer is still refused
        // (it goes behind the queued call), and the queued call gets the place.
        let held = pool.admit().unwrap();
        let waiter = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.queue_for_route(deadline).await.map(|slot| slot.is_some()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(pool.queued(), (1, 0));
        drop(held);
        assert_eq!(pool.admit().unwrap_err(), 1, "a newcomer is refused while a call is queued");
        assert_eq!(waiter.await.unwrap(), Ok(true));
        assert!(pool.admit().is_ok(), "no call queued: the newcomer's turn");
        // The same for the targets' places (a retry, which has a target already, is not a
        // newcomer).
        let (Pick::Target(0, a), Pick::Target(1, b)) = (pool.pick(&[]), pool.pick(&[])) else { panic!("two targets") };
        let waiter = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.queue_for_target(deadline).await.map(|(i, slot)| (i, slot.is_some())) }
        });
        tokio::task::yield_now().await;
        assert_eq!(pool.queued(), (0, 1));
        drop(b);
        assert!(matches!(pool.pick(&[]), Pick::Busy));
        assert_eq!(waiter.await.unwrap(), Ok((1, true)));
        drop(a);
        assert_eq!(pool.pick(&[]).target(), Some(0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reload_that_takes_the_queue_away_does_not_let_newcomers_pass_its_waiters() {
        let mut r = route(1, 1, Duration::from_secs(60));
        r.max_in_flight = Some(1);
        r.target_max_in_flight = vec![Some(1)];
        r.queue_timeout = Some(Duration::from_secs(5));
        let old = Arc::new(Pool::new(&r, None));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let held = old.admit().unwrap();
        let waiter = tokio::spawn({
            let old = Arc::clone(&old);
            async move { old.queue_for_route(deadline).await.map(|slot| slot.is_some()) }
        });
        tokio::task::yield_now().await;
        // The new config has no queue: its calls are refused at once while the old one's
        // waiter is still in line, which gets the place given back.
        r.queue_timeout = None;
        let new = Pool::new(&r, Some(&old));
        drop(held);
        assert_eq!(new.admit().unwrap_err(), 1);
        assert_eq!(waiter.await.unwrap(), Ok(true));
        // The same for a target's place.
        let Pick::Target(0, target) = new.pick(&[]) else { panic!("the target") };
        let waiter = tokio::spawn({
            let old = Arc::clone(&old);
            async move { old.queue_for_target(deadline).await.map(|(i, slot)| (i, slot.is_some())) }
        });
        tokio::task::yield_now().await;
        drop(target);
        assert!(matches!(new.pick(&[]), Pick::Busy));
        assert_eq!(waiter.await.unwrap(), Ok((0, true)));
    }

    #[test]
    fn a_busy_target_in_service_is_not_traded_for_an_ejected_one() {
        let mut r = route(2, 1, Duration::from_secs(60));
        r.target_max_in_flight = vec![Some(1), None];
        let pool = Pool::new(&r, None);
        assert!(pool.failure(1), "target 1 ejected");
        let Pick::Target(0, held) = pool.pick(&[]) else { panic!("target 0 first") };
        // Target 0 is busy, target 1 ejected: refused, not sent to the failing target.
        assert!(matches!(pool.pick(&[]), Pick::Busy));
        drop(held);
        // Every target ejected and none busy: one is still tried (fail open), with a place.
        assert!(pool.failure(0));
        let Pick::Target(_, _slot) = pool.pick(&[]) else { panic!("fail open") };
    }

    #[test]
    fn weighted_round_robin_spreads_each_targets_turns_over_the_cycle() {
        assert_eq!(schedule(&[1, 1, 1]), None);
        assert_eq!(schedule(&[5, 5]), None);
        assert_eq!(schedule(&[5, 1, 1]).as_deref(), Some(&[0, 0, 1, 0, 2, 0, 0][..]));
        // Divided by the common divisor: 30:10 is 3:1.
        assert_eq!(schedule(&[30, 10]).as_deref(), Some(&[0, 0, 1, 0][..]));
        // A drained target gets no turn.
        assert_eq!(schedule(&[2, 0, 1]).as_deref(), Some(&[0, 2, 0][..]));
        // Any weights: each target's share of a cycle is its weight over the sum.
        let weights = [7, 3, 0, 11, 1];
        let cycle = schedule(&weights).unwrap();
        assert_eq!(cycle.len(), 22);
        for (i, w) in weights.iter().enumerate() {
            assert_eq!(cycle.iter().filter(|&&t| t as usize == i).count(), *w as usize, "target {i}");
        }
    }

    #[test]
    fn picks_follow_the_weights_and_skip_drained_and_ejected_targets() {
        let mut r = route(3, 1, Duration::from_secs(60));
        r.weights = vec![3, 0, 1];
        let pool = Pool::new(&r, None);
        let picks: Vec<usize> = (0..8).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 2, 0, 0, 0, 2, 0]);
        // A retry goes to another target in service, never to the drained one.
        assert_eq!(pool.serving(), 2);
        assert_eq!(pool.pick(&[0]).target(), Some(2));
        assert_eq!(pool.pick(&[0, 2]).target(), None);
        // The heavy target ejected: its turns go to the next target in service.
        assert!(pool.failure(0));
        let picks: Vec<usize> = (0..8).map(|_| pool.pick(&[]).target().unwrap()).collect();
        assert!(picks.iter().all(|&i| i == 2), "{picks:?}");
    }

    /// A target whose connects hang (its listen backlog is full, so SYNs go unanswered): the
    /// requests that queued for the thread's one HTTP/2 connection while a connect was tried
    /// fail with it, rather than each trying again in turn (N times the connect timeout).
    #[tokio::test(flavor = "current_thread")]
    async fn requests_waiting_on_a_failed_http2_connect_fail_with_it() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the backlog (never accepted): later connects get no answer.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
            {
                fillers.push(s);
            }
        }
        let clients = Arc::new(Clients::new(crate::tls::client_config(&[]).unwrap()));
        let target: Uri = format!("http://{addr}").parse().unwrap();
        let key: Arc<str> = Arc::from(format!("http://{addr}"));
        let started = Instant::now();
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let (clients, target, key) = (Arc::clone(&clients), target.clone(), Arc::clone(&key));
                tokio::spawn(async move {
                    let req = http::Request::get(format!("http://{addr}/x")).body(axum::body::Body::empty()).unwrap();
                    clients.send_h2(&key, &target, Duration::from_millis(300), req).await
                })
            })
            .collect();
        for call in calls {
            assert!(matches!(call.await.unwrap(), Err(SendError::Connect(_))));
        }
        // One connect timeout (300 ms) for all five, not five in a row (1.5 s).
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        drop(fillers);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_is_reused_once_its_body_is_read_and_never_after_an_abandoned_one() {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(tollgate_demo::upstream::EchoStats::default());
        tokio::spawn(tollgate_demo::upstream::serve(listener, Arc::clone(&stats)));
        let clients = Clients::new(crate::tls::client_config(&[]).unwrap());
        let target: Uri = format!("http://{addr}").parse().unwrap();
        let key: Arc<str> = Arc::from(format!("http://{addr}"));
        let get = |bytes: usize| {
            http::Request::get(format!("/x?bytes={bytes}"))
                .header(http::header::HOST, addr.to_string())
                .body(axum::body::Body::empty())
                .unwrap()
        };
        for _ in 0..5 {
            let resp = clients.send(&key, &target, Duration::from_secs(1), get(64)).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().len(), 64);
            assert_eq!(Clients::idle_local(&key), 1);
        }
        assert_eq!(stats.connections.load(Ordering::Relaxed), 1, "five calls, one connection");
        // A response dropped before its body ended: its connection is not given back.
        let resp = clients.send(&key, &target, Duration::from_secs(1), get(1 << 20)).await.unwrap();
        assert_eq!(Clients::idle_local(&key), 0);
        drop(resp);
        assert_eq!(Clients::idle_local(&key), 0);
        let resp = clients.send(&key, &target, Duration::from_secs(1), get(10)).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().len(), 10);
        assert_eq!(stats.connections.load(Ordering::Relaxed), 2);
        assert_eq!(Clients::idle_local(&key), 1);
        // Nothing listening: a connect error (retry-safe), not a request error.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (t, k): (Uri, Arc<str>) =
            (format!("http://{closed}").parse().unwrap(), Arc::from(format!("http://{closed}")));
        let err = clients.send(&k, &t, Duration::from_secs(1), get(1)).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }
}
