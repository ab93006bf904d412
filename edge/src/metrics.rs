//! Prometheus metrics of the edge. Labels are bounded: route ids come from the config and
//! status is a class (1xx..5xx). Per-consumer usage belongs in ClickHouse, not here.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metering::spool::SpoolStats;

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

/// Upper bounds of the request-duration histogram's buckets, in microseconds (exposed in
/// seconds, as Prometheus wants): 0.5 ms to 10 s, then `+Inf`.
pub const DURATION_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

thread_local! {
    /// The counter shard of this thread (see [`Metrics::set_worker`]); 0 for other threads.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One route's counts on one shard, on cache lines of its own: two workers counting requests
/// never write the same line (a line bouncing between cores costs more than the count).
#[derive(Debug, Default)]
#[repr(align(128))]
struct RouteStats {
    /// By status class 1xx..5xx.
    by_class: [AtomicU64; 5],
    /// Durations by bucket, not cumulative: bucket i counts durations in
    /// (`DURATION_BUCKETS_US[i-1]`, `DURATION_BUCKETS_US[i]`]; the last one is `+Inf`.
    duration_buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    duration_sum_us: AtomicU64,
}

/// The counters one worker thread writes on every request.
#[derive(Debug, Default)]
struct Shard {
    events_enqueued: Padded,
    /// Per route; the last entry: no route.
    routes: Box<[RouteStats]>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

#[derive(Debug, Default)]
pub struct Metrics {
    route_ids: Vec<String>,
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Shard 0 for threads that are not workers, then one per worker; summed when rendered.
    shards: Box<[Shard]>,
    /// Dropped because the edge's event queue was full (spool drops are in the spool stats).
    pub events_dropped: AtomicU64,
    pub events_produced: AtomicU64,
    pub events_delivery_failed: AtomicU64,
    pub events_replayed: AtomicU64,
    pub events_queued_now: AtomicU64,
    pub spool_segments_replayed: AtomicU64,
    /// A [`KafkaState`]: what the producer's last metadata request said.
    kafka: std::sync::atomic::AtomicU8,
    pub config_reloads: AtomicU64,
    /// Rate limiters held now (gauge).
    pub limiters: Arc<AtomicU64>,
    /// JWT verification counters (JWKS fetches, cache hits).
    pub jwt: Arc<crate::auth::jwt::JwtStats>,
    /// Quota states (also the table the request path reads).
    pub quota: Arc<crate::quota::QuotaTable>,
    /// Upgraded connections (WebSockets) spliced now, or closed with their event not yet
    /// emitted (microseconds).
    pub tunnels_open: AtomicU64,
    /// Requests sent again to another target after a connect failure.
    pub upstream_retries: AtomicU64,
    /// Upstream targets taken out of service by passive health checks.
    pub upstream_ejections: AtomicU64,
    /// Calls refused because their route (`routes[].max_in_flight`, 503), their consumer
    /// (`plans.<name>.max_in_flight`, 429) or every target of their route
    /// (`upstreams[].max_in_flight`, 503) had that many calls in flight.
    pub in_flight_refusals: [AtomicU64; 3],
    /// Calls refused by a rate limit: [the consumer's plan (its own or on the route), the
    /// route's shared `rate_limit`].
    pub rate_limit_refusals: [AtomicU64; 3],
    /// Calls that waited in their route's queue for a place (`routes[].queue_timeout_ms`):
    /// [got one, timed out].
    pub queued_calls: [AtomicU64; 3],
    pub config_reload_failures: AtomicU64,
    /// Access log lines written, and lost (too many waiting, or the file failing).
    pub access_log_lines: AtomicU64,
    pub access_log_dropped: AtomicU64,
    /// TLS handshakes on the traffic port that failed or did not finish in time.
    pub tls_handshake_failures: AtomicU64,
    /// Connections closed because they did not start with a valid PROXY protocol header in
    /// time (`edge.proxy_protocol`).
    pub proxy_protocol_refused: AtomicU64,
    /// PROXY headers whose address was ignored: their peer is not one of
    /// `edge.proxy_protocol_from`.
    pub proxy_protocol_untrusted: AtomicU64,
    /// Requests on `edge.http_redirect_listen` sent to HTTPS.
    pub https_redirects: AtomicU64,
    /// Connections accepted on `edge.http_redirect_listen`.
    pub redirect_connections_accepted: AtomicU64,
    /// Connections on `edge.http_redirect_listen` closed because no request head came in
    /// time (`header_read_timeout_ms`).
    pub redirect_connections_timed_out: AtomicU64,
    /// CORS preflights the edge answered: [allowed (204), refused (403)].
    pub cors_preflights: [AtomicU64; 2],
    /// Connections accepted on the traffic port (plain and TLS).
    pub connections_accepted: AtomicU64,
    /// Connections on the traffic port open now, TLS handshakes included (gauge).
    pub connections_open: AtomicU64,
    /// Active health checks of upstream targets: [passed, failed].
    pub health_checks: [AtomicU64; 2],
    /// `edge.max_connections` (gauge).
    pub connection_limit: AtomicU64,
    /// Times a worker found `edge.max_connections` connections open and stopped accepting
    /// until one closed.
    pub connection_limit_waits: AtomicU64,
    /// Connections on the traffic port the edge closed because a request did not come in
    /// time, by [`ConnTimeout`].
    pub connections_timed_out: [AtomicU64; 3],
    /// True once shutdown began: `/readyz` answers 503 while in-flight requests drain.
    pub draining: std::sync::atomic::AtomicBool,
    /// True once the shutdown grace ran out: a call dropped from then on was cut by the edge
    /// (outcome `edge_shutdown`), not by its client (`client_aborted`).
    pub grace_over: std::sync::atomic::AtomicBool,
    pub spool: std::sync::OnceLock<Arc<SpoolStats>>,
}

/// Why the edge closed a connection whose request did not come in time
/// (`tollgate_edge_connections_timed_out_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnTimeout {
    /// Nothing that tells HTTP/1 from HTTP/2 within `header_read_timeout_ms` of connecting
    /// (silent, or a stalled HTTP/2 preface: `silent::FirstBytes`).
    FirstBytes,
    /// The first request's head was started but not finished in time (slow headers).
    RequestHead,
    /// After at least one answer, the next request's head did not finish in time: an idle
    /// keep-alive connection (or a client that turned slow).
    Idle,
}

impl ConnTimeout {
    pub const ALL: [ConnTimeout; 3] = [Self::FirstBytes, Self::RequestHead, Self::Idle];

    pub fn label(self) -> &'static str {
        match self {
            Self::FirstBytes => "first_bytes",
            Self::RequestHead => "request_head",
            Self::Idle => "idle",
        }
    }
}

/// What the producer's last metadata request said of Kafka and the event topic
/// (`tollgate_edge_kafka_reachable`, `tollgate_edge_kafka_topic_missing`, `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KafkaState {
    /// Not asked yet (or metering off): events go to librdkafka.
    Unknown = 0,
    Usable = 1,
    Unreachable = 2,
    /// The brokers answer but do not have `kafka.topic`.
    TopicMissing = 3,
}

impl KafkaState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Usable,
            2 => Self::Unreachable,
            3 => Self::TopicMissing,
            _ => Self::Unknown,
        }
    }

    /// New events skip librdkafka and go straight to the spool: there they survive a
    /// `kill -9`, while in librdkafka's queue they would wait out `kafka.message_timeout_ms`.
    pub fn spool_directly(self) -> bool {
        matches!(self, Self::Unreachable | Self::TopicMissing)
    }
}

impl Metrics {
    /// Metrics for `route_ids`, counted by `workers` worker threads (each calling
    /// [`Metrics::set_worker`]) and any other thread.
    pub fn new<'a>(route_ids: impl IntoIterator<Item = &'a str>, workers: usize) -> Self {
        let mut ids: Vec<String> = route_ids.into_iter().map(str::to_owned).collect();
        ids.push(NO_ROUTE.to_owned());
        let index = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
        let shards = (0..=workers)
            .map(|_| Shard { routes: ids.iter().map(|_| RouteStats::default()).collect(), ..Default::default() })
            .collect();
        Self { route_ids: ids, index, shards, ..Default::default() }
    }

    /// What the producer's last metadata request said of Kafka and the event topic.
    pub fn kafka_state(&self) -> KafkaState {
        KafkaState::from_u8(self.kafka.load(Ordering::Relaxed))
    }

    /// Records the answer of a metadata request; returns the state before it.
    pub fn set_kafka_state(&self, state: KafkaState) -> KafkaState {
        KafkaState::from_u8(self.kafka.swap(state as u8, Ordering::Relaxed))
    }

    /// Makes the calling thread count on worker `i`'s shard (`i` < the `workers` given to
    /// [`Metrics::new`]).
    pub fn set_worker(i: usize) {
        SHARD.set(i + 1);
    }

    fn shard(&self) -> Option<&Shard> {
        self.shards.get(SHARD.get()).or_else(|| self.shards.first())
    }

    /// This thread's counters for `route` (unknown or none: [`NO_ROUTE`]).
    fn route_stats(&self, route: Option<&str>) -> Option<&RouteStats> {
        let i = route.and_then(|r| self.index.get(r).copied()).unwrap_or(self.route_ids.len().saturating_sub(1));
        self.shard()?.routes.get(i)
    }

    /// A completed call (its response body ended, its tunnel closed, or its client went
    /// away): its final status and its duration, from its request's arrival.
    pub fn record_call(&self, route: Option<&str>, status: u16, micros: u64) {
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        let bucket = DURATION_BUCKETS_US.partition_point(|&bound| bound < micros);
        if let Some(stats) = self.route_stats(route) {
            stats.by_class[class].fetch_add(1, Ordering::Relaxed);
            stats.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            stats.duration_sum_us.fetch_add(micros, Ordering::Relaxed);
        }
    }

    pub fn event_enqueued(&self) {
        if let Some(shard) = self.shard() {
            shard.events_enqueued.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `f` of one route's counters, summed over the shards.
    fn sum(&self, route: usize, f: impl Fn(&RouteStats) -> &AtomicU64) -> u64 {
        self.shards.iter().filter_map(|s| s.routes.get(route)).map(|r| f(r).load(Ordering::Relaxed)).sum()
    }

    /// Requests counted for a route (or [`NO_ROUTE`]) and status class (1..=5).
    pub fn requests(&self, route: &str, class: usize) -> u64 {
        let Some(&i) = self.index.get(route) else { return 0 };
        if !(1..=5).contains(&class) {
            return 0;
        }
        self.sum(i, |r| &r.by_class[class - 1])
    }

    /// A route's duration histogram: cumulative counts per bucket of [`DURATION_BUCKETS_US`]
    /// then `+Inf`, and the sum in microseconds.
    pub fn durations(&self, route: &str) -> (Vec<u64>, u64) {
        let Some(&i) = self.index.get(route) else { return (vec![0; DURATION_BUCKETS_US.len() + 1], 0) };
        let mut total = 0;
        let cumulative = (0..=DURATION_BUCKETS_US.len())
            .map(|b| {
                total += self.sum(i, |r| &r.duration_buckets[b]);
                total
            })
            .collect();
        (cumulative, self.sum(i, |r| &r.duration_sum_us))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP tollgate_edge_requests_total Calls completed, by route and final status class (499: the client went away).\n");
        out.push_str("# TYPE tollgate_edge_requests_total counter\n");
        for (i, id) in self.route_ids.iter().enumerate() {
            for c in 0..5 {
                let _ = writeln!(
                    out,
                    "tollgate_edge_requests_total{{route=\"{id}\",status_class=\"{}xx\"}} {}",
                    c + 1,
                    self.sum(i, |r| &r.by_class[c])
                );
            }
        }
        out.push_str(
            "# HELP tollgate_edge_request_duration_seconds Time from a request's arrival to the end of its response body, by route.\n",
        );
        out.push_str("# TYPE tollgate_edge_request_duration_seconds histogram\n");
        for id in &self.route_ids {
            let (cumulative, sum_us) = self.durations(id);
            let name = "tollgate_edge_request_duration_seconds";
            for (bound, count) in DURATION_BUCKETS_US.iter().zip(&cumulative) {
                let _ = writeln!(out, "{name}_bucket{{route=\"{id}\",le=\"{}\"}} {count}", *bound as f64 / 1e6);
            }
            let count = cumulative.last().copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{route=\"{id}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{route=\"{id}\"}} {:.6}", sum_us as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{{route=\"{id}\"}} {count}");
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let enqueued: u64 = self.shards.iter().map(|s| load(&s.events_enqueued.0)).sum();
        let spool = self.spool.get();
        let spool_load = |f: fn(&SpoolStats) -> &AtomicU64| spool.map_or(0, |s| load(f(s)));
        let dropped = load(&self.events_dropped) + spool_load(|s| &s.dropped);
        let counters = [
            ("tollgate_edge_events_enqueued_total", "Events handed to the producer queue.", enqueued),
            (
                "tollgate_edge_events_dropped_total",
                "Events lost: edge queue full, spool full or failing, or unencodable. Must stay 0.",
                dropped,
            ),
            (
                "tollgate_edge_events_produced_total",
                "Events acknowledged by Kafka (acks=all).",
                load(&self.events_produced),
            ),
            (
                "tollgate_edge_events_delivery_failed_total",
                "Deliveries Kafka did not acknowledge in time; each was spooled.",
                load(&self.events_delivery_failed),
            ),
            ("tollgate_edge_events_spooled_total", "Events written to the on-disk spool.", spool_load(|s| &s.spooled)),
            (
                "tollgate_edge_events_replayed_total",
                "Spooled events acknowledged by Kafka on replay.",
                load(&self.events_replayed),
            ),
            (
                "tollgate_edge_spool_corrupt_total",
                "Spool records lost to a torn segment tail.",
                spool_load(|s| &s.corrupt),
            ),
            ("tollgate_edge_config_reloads_total", "Config reloads applied.", load(&self.config_reloads)),
            ("tollgate_edge_jwks_fetches_total", "JWKS fetches (refreshes and unknown kids).", load(&self.jwt.fetches)),
            (
                "tollgate_edge_jwks_fetch_failures_total",
                "JWKS fetches that failed or timed out (the previous keys stay).",
                load(&self.jwt.fetch_failures),
            ),
            (
                "tollgate_edge_jwt_cache_hits_total",
                "JWTs accepted from the verified-token cache.",
                load(&self.jwt.cache_hits),
            ),
            (
                "tollgate_edge_upstream_retries_total",
                "Requests retried on another target after a connect failure.",
                load(&self.upstream_retries),
            ),
            (
                "tollgate_edge_upstream_ejections_total",
                "Upstream targets ejected by passive health checks.",
                load(&self.upstream_ejections),
            ),
            (
                "tollgate_edge_config_reload_failures_total",
                "Config reloads rejected (the running config stayed).",
                load(&self.config_reload_failures),
            ),
            ("tollgate_edge_access_log_lines_total", "Lines written to edge.access_log.", load(&self.access_log_lines)),
            (
                "tollgate_edge_access_log_dropped_total",
                "Access log lines lost: more than 8 MiB waiting for the disk, or the file could not be opened or written (logged).",
                load(&self.access_log_dropped),
            ),
            (
                "tollgate_edge_tls_handshake_failures_total",
                "TLS handshakes on the traffic port that failed or did not finish within header_read_timeout_ms.",
                load(&self.tls_handshake_failures),
            ),
            (
                "tollgate_edge_proxy_protocol_refused_total",
                "Connections closed because they did not start with a valid PROXY protocol header within header_read_timeout_ms (edge.proxy_protocol).",
                load(&self.proxy_protocol_refused),
            ),
            (
                "tollgate_edge_proxy_protocol_untrusted_total",
                "PROXY protocol headers whose client address was ignored because the connection came from a peer not in edge.proxy_protocol_from.",
                load(&self.proxy_protocol_untrusted),
            ),
            (
                "tollgate_edge_connections_accepted_total",
                "Connections accepted on the traffic port (plain and TLS).",
                load(&self.connections_accepted),
            ),
            (
                "tollgate_edge_connection_limit_waits_total",
                "Times a worker found edge.max_connections connections open and stopped accepting until one closed (new connections waited in the listen backlog meanwhile).",
                load(&self.connection_limit_waits),
            ),
            (
                "tollgate_edge_https_redirects_total",
                "Requests on edge.http_redirect_listen answered 308 to HTTPS.",
                load(&self.https_redirects),
            ),
            (
                "tollgate_edge_redirect_connections_accepted_total",
                "Connections accepted on edge.http_redirect_listen.",
                load(&self.redirect_connections_accepted),
            ),
            (
                "tollgate_edge_redirect_connections_timed_out_total",
                "Connections on edge.http_redirect_listen closed because no request head came within header_read_timeout_ms.",
                load(&self.redirect_connections_timed_out),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        // Counters with a label of a few values: (name, help, label, its values, their counts).
        type Labelled<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [AtomicU64]);
        let by_label: [Labelled<'_>; 5] = [
            (
                "tollgate_edge_cors_preflights_total",
                "CORS preflights the edge answered itself (routes[].cors; not metered as calls), by result: allowed (204) or refused (403, origin not listed).",
                "result",
                &["allowed", "refused"],
                &self.cors_preflights,
            ),
            (
                "tollgate_edge_health_checks_total",
                "Active health checks of upstream targets (routes[].health_check), by result: passed (2xx/3xx in time) or failed.",
                "result",
                &["passed", "failed"],
                &self.health_checks,
            ),
            (
                "tollgate_edge_in_flight_refusals_total",
                "Calls refused because that many were in flight already, by limit: route (routes[].max_in_flight, 503), plan (plans.<name>.max_in_flight, per consumer, 429) or target (every target in service at its routes[].upstreams[].max_in_flight, 503).",
                "limit",
                &["route", "plan", "target"],
                &self.in_flight_refusals,
            ),
            (
                "tollgate_edge_rate_limit_refusals_total",
                "Calls refused (429) by a rate limit, by limit: plan (the consumer's plan, its own or on the route), route (routes[].rate_limit, shared by all the route's callers) or client (routes[].rate_limit_per_client, each client address's).",
                "limit",
                &["plan", "route", "client"],
                &self.rate_limit_refusals,
            ),
            (
                "tollgate_edge_queued_calls_total",
                "Calls that found their route or every target at max_in_flight and waited (routes[].queue_timeout_ms), by result: admitted (a place came free), timed_out (503) or queue_full (503 at once: routes[].max_queued calls were waiting).",
                "result",
                &["admitted", "timed_out", "queue_full"],
                &self.queued_calls,
            ),
        ];
        for (name, help, label, values, counts) in by_label {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (value, count) in values.iter().zip(counts) {
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {}", load(count));
            }
        }
        let name = "tollgate_edge_connections_timed_out_total";
        let _ = writeln!(
            out,
            "# HELP {name} Connections on the traffic port closed because a request did not come within header_read_timeout_ms: reason first_bytes (silent after connecting), request_head (slow first request head), idle (keep-alive connection with no next request).\n# TYPE {name} counter"
        );
        for reason in ConnTimeout::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                load(&self.connections_timed_out[reason as usize])
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_connections_open Connections on the traffic port open now (TLS handshakes included).\n# TYPE tollgate_edge_connections_open gauge\ntollgate_edge_connections_open {}",
            load(&self.connections_open)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_connection_limit Client connections the traffic port takes at once (edge.max_connections).\n# TYPE tollgate_edge_connection_limit gauge\ntollgate_edge_connection_limit {}",
            load(&self.connection_limit)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_kafka_reachable 1 when Kafka answered the last metadata request.\n# TYPE tollgate_edge_kafka_reachable gauge\ntollgate_edge_kafka_reachable {}",
            u8::from(matches!(self.kafka_state(), KafkaState::Usable | KafkaState::TopicMissing))
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_kafka_topic_missing 1 when Kafka answered that the event topic (kafka.topic) does not exist; events are spooled until it does.\n# TYPE tollgate_edge_kafka_topic_missing gauge\ntollgate_edge_kafka_topic_missing {}",
            u8::from(self.kafka_state() == KafkaState::TopicMissing)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_limiters Rate limiters held (consumers and consumer-route pairs active recently).\n# TYPE tollgate_edge_limiters gauge\ntollgate_edge_limiters {}",
            self.limiters.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_quota_states_applied_total Quota states read from quota-state.\n# TYPE tollgate_edge_quota_states_applied_total counter\ntollgate_edge_quota_states_applied_total {}\n\
             # HELP tollgate_edge_quota_rejected_total Calls refused because a hard monthly quota was used up.\n# TYPE tollgate_edge_quota_rejected_total counter\ntollgate_edge_quota_rejected_total {}\n\
             # HELP tollgate_edge_quota_consumers Consumers with a quota state.\n# TYPE tollgate_edge_quota_consumers gauge\ntollgate_edge_quota_consumers {}\n\
             # HELP tollgate_edge_quota_loaded 1 once quota-state was read to its end at start.\n# TYPE tollgate_edge_quota_loaded gauge\ntollgate_edge_quota_loaded {}\n\
             # HELP tollgate_edge_quota_covered_until_seconds Latest end of the usage counted in an applied quota state (Unix seconds).\n# TYPE tollgate_edge_quota_covered_until_seconds gauge\ntollgate_edge_quota_covered_until_seconds {}",
            self.quota.states_applied.load(Ordering::Relaxed),
            self.quota.rejected.load(Ordering::Relaxed),
            self.quota.len(),
            u8::from(self.quota.loaded.load(Ordering::Relaxed)),
            self.quota.covered_until.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_tunnels_open Upgraded connections (WebSockets) open now.\n# TYPE tollgate_edge_tunnels_open gauge\ntollgate_edge_tunnels_open {}",
            self.tunnels_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_spool_bytes Bytes in the on-disk spool.\n# TYPE tollgate_edge_spool_bytes gauge\ntollgate_edge_spool_bytes {}",
            spool_load(|s| &s.bytes)
        );
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_events_queued Events waiting in the producer queue.\n# TYPE tollgate_edge_events_queued gauge\ntollgate_edge_events_queued {}",
            self.events_queued_now.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counts_by_route_and_class() {
        let m = Metrics::new(["echo"], 2);
        m.record_call(Some("echo"), 200, 1_000);
        m.record_call(Some("echo"), 429, 1_000);
        m.record_call(None, 404, 1_000);
        m.record_call(Some("unknown"), 502, 1_000);
        assert_eq!(m.requests("echo", 2), 1);
        assert_eq!(m.requests("echo", 4), 1);
        assert_eq!(m.requests(NO_ROUTE, 4), 1);
        assert_eq!(m.requests(NO_ROUTE, 5), 1);
        let text = m.render();
        assert!(text.contains("tollgate_edge_requests_total{route=\"echo\",status_class=\"2xx\"} 1"), "{text}");
    }

    #[test]
    fn durations_are_a_cumulative_histogram_summed_over_workers() {
        let m = Arc::new(Metrics::new(["echo"], 2));
        // Worker 0 and worker 1 (other threads) and a non-worker thread (this one).
        let record = |worker: Option<usize>, micros: &'static [u64]| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                if let Some(w) = worker {
                    Metrics::set_worker(w);
                }
                for &us in micros {
                    m.record_call(Some("echo"), 200, us);
                    m.event_enqueued();
                }
            })
            .join()
            .unwrap();
        };
        record(Some(0), &[400, 500, 501]);
        record(Some(1), &[9_000, 20_000_000]);
        record(None, &[1_000]);
        m.record_call(None, 404, 3_000);
        let (cumulative, sum_us) = m.durations("echo");
        // le 0.0005: 400, 500; le 0.001: + 501, 1000; le 0.01: + 9000; +Inf: + 20 s.
        assert_eq!(&cumulative[..5], &[2, 4, 4, 4, 5]);
        assert_eq!(cumulative[DURATION_BUCKETS_US.len() - 1], 5);
        assert_eq!(cumulative[DURATION_BUCKETS_US.len()], 6);
        assert_eq!(sum_us, 400 + 500 + 501 + 9_000 + 20_000_000 + 1_000);
        assert_eq!(m.requests("echo", 2), 6);
        let text = m.render();
        for line in [
            "tollgate_edge_request_duration_seconds_bucket{route=\"echo\",le=\"0.0005\"} 2",
            "tollgate_edge_request_duration_seconds_bucket{route=\"echo\",le=\"0.01\"} 5",
            "tollgate_edge_request_duration_seconds_bucket{route=\"echo\",le=\"10\"} 5",
            "tollgate_edge_request_duration_seconds_bucket{route=\"echo\",le=\"+Inf\"} 6",
            "tollgate_edge_request_duration_seconds_sum{route=\"echo\"} 20.011401",
            "tollgate_edge_request_duration_seconds_count{route=\"echo\"} 6",
            "tollgate_edge_request_duration_seconds_count{route=\"(none)\"} 1",
            "tollgate_edge_requests_total{route=\"echo\",status_class=\"2xx\"} 6",
            "tollgate_edge_events_enqueued_total 6",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
