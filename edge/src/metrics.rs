//! Prometheus metrics of the edge. Labels are bounded: route ids come from the config and
//! status is a class (1xx..5xx). Per-consumer usage belongs in ClickHouse, not here.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metering::spool::SpoolStats;

/// Label used for requests that matched no route.
pub const NO_ROUTE: &str = "(none)";

#[derive(Debug, Default)]
pub struct Metrics {
    route_ids: Vec<String>,
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    /// Per route (last entry: no route) and status class 1xx..5xx.
    requests: Vec<[AtomicU64; 5]>,
    pub events_enqueued: AtomicU64,
    /// Dropped because the edge's event queue was full (spool drops are in the spool stats).
    pub events_dropped: AtomicU64,
    pub events_produced: AtomicU64,
    pub events_delivery_failed: AtomicU64,
    pub events_replayed: AtomicU64,
    pub events_queued_now: AtomicU64,
    pub spool_segments_replayed: AtomicU64,
    /// 1 when the last metadata request to Kafka succeeded.
    pub kafka_reachable: std::sync::atomic::AtomicBool,
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
    pub config_reload_failures: AtomicU64,
    pub spool: std::sync::OnceLock<Arc<SpoolStats>>,
}

impl Metrics {
    pub fn new<'a>(route_ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut ids: Vec<String> = route_ids.into_iter().map(str::to_owned).collect();
        ids.push(NO_ROUTE.to_owned());
        let index = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
        let requests = ids.iter().map(|_| Default::default()).collect();
        Self { route_ids: ids, index, requests, ..Default::default() }
    }

    pub fn record_request(&self, route: Option<&str>, status: u16) {
        let i = route.and_then(|r| self.index.get(r).copied()).unwrap_or(self.route_ids.len() - 1);
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        if let Some(row) = self.requests.get(i) {
            row[class].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests counted for a route (or [`NO_ROUTE`]) and status class (1..=5).
    pub fn requests(&self, route: &str, class: usize) -> u64 {
        self.index
            .get(route)
            .and_then(|&i| self.requests.get(i))
            .and_then(|row| row.get(class.wrapping_sub(1)))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str("# HELP tollgate_edge_requests_total Requests answered, by route and status class.\n");
        out.push_str("# TYPE tollgate_edge_requests_total counter\n");
        for (id, row) in self.route_ids.iter().zip(&self.requests) {
            for (c, count) in row.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tollgate_edge_requests_total{{route=\"{id}\",status_class=\"{}xx\"}} {}",
                    c + 1,
                    count.load(Ordering::Relaxed)
                );
            }
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let spool = self.spool.get();
        let spool_load = |f: fn(&SpoolStats) -> &AtomicU64| spool.map_or(0, |s| load(f(s)));
        let dropped = load(&self.events_dropped) + spool_load(|s| &s.dropped);
        let counters = [
            (
                "tollgate_edge_events_enqueued_total",
                "Events handed to the producer queue.",
                load(&self.events_enqueued),
            ),
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
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_edge_kafka_reachable 1 when Kafka answered the last metadata request.\n# TYPE tollgate_edge_kafka_reachable gauge\ntollgate_edge_kafka_reachable {}",
            u8::from(self.kafka_reachable.load(Ordering::Relaxed))
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
    use super::*;

    #[test]
    fn counts_by_route_and_class() {
        let m = Metrics::new(["echo"]);
        m.record_request(Some("echo"), 200);
        m.record_request(Some("echo"), 429);
        m.record_request(None, 404);
        m.record_request(Some("unknown"), 502);
        assert_eq!(m.requests("echo", 2), 1);
        assert_eq!(m.requests("echo", 4), 1);
        assert_eq!(m.requests(NO_ROUTE, 4), 1);
        assert_eq!(m.requests(NO_ROUTE, 5), 1);
        let text = m.render();
        assert!(text.contains("tollgate_edge_requests_total{route=\"echo\",status_class=\"2xx\"} 1"), "{text}");
    }
}
