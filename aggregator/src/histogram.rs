//! Latency histograms with fixed, mergeable buckets.
//!
//! Built with `hdrhistogram` at 2 significant digits: values below 256 µs have a bucket each;
//! above, a bucket is narrower than 1/128 of its values. A bucket is stored as its inclusive
//! upper bound (`highest_equivalent`) and a count. The boundaries do not depend on the data
//! (only on the precision), so histograms of any minutes, routes or consumers merge by adding
//! counts of equal bounds (SQL: `sumMap(latency_le_us, latency_count)`).
//!
//! A percentile is the nearest rank: the bound of the first bucket whose cumulative count
//! reaches `max(1, ceil(q × n))`. It is never below the exact nearest-rank percentile of the
//! raw latencies and less than 1/128 (0.79 %) above it; below 256 µs it is exact.

use hdrhistogram::Histogram;

/// Significant decimal digits of the buckets. Changing it changes the stored boundaries: old
/// rows would no longer merge with new ones.
pub const SIGNIFICANT_DIGITS: u8 = 2;

/// Upper bound of the relative error of a percentile (documented; checked by tests).
pub const MAX_RELATIVE_ERROR: f64 = 1.0 / 128.0;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        // Auto-resizing: the counts array grows with the largest value seen, so a histogram of
        // millisecond latencies stays small while a one-hour WebSocket still fits.
        #[allow(clippy::expect_used)] // constant, valid arguments
        let mut h = Histogram::new(SIGNIFICANT_DIGITS).expect("2 significant digits is a valid precision");
        h.auto(true);
        Self(h)
    }

    /// Records one latency.
    pub fn record(&mut self, us: u64) {
        self.record_n(us, 1);
    }

    /// Records `count` latencies of `us` (a stored bucket's bound lands in that same bucket).
    pub fn record_n(&mut self, us: u64, count: u64) {
        // Auto-resize cannot fail below u64::MAX / 2; clamp the impossible rest.
        let us = us.min(u64::MAX / 4);
        let _ = self.0.record_n(us, count);
    }

    /// Adds stored buckets (upper bounds and counts, as in `usage_minute`).
    pub fn add_buckets(&mut self, bounds: &[u64], counts: &[u64]) {
        for (&b, &c) in bounds.iter().zip(counts) {
            self.record_n(b, c);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The non-empty buckets, ascending: (inclusive upper bounds, counts).
    pub fn buckets(&self) -> (Vec<u64>, Vec<u64>) {
        let mut bounds = Vec::new();
        let mut counts = Vec::new();
        for v in self.0.iter_recorded() {
            bounds.push(self.0.highest_equivalent(v.value_iterated_to()));
            counts.push(v.count_at_value());
        }
        (bounds, counts)
    }

    /// Nearest-rank percentile, `q` in 0..=1; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.highest_equivalent(self.0.value_at_quantile(q)))
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// The exact nearest-rank percentile of `sorted` values (what the histogram approximates).
pub fn exact_quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rand::{Rng, SeedableRng};

    use super::*;

    fn lognormal_like(rng: &mut impl Rng, n: usize) -> Vec<u64> {
        // A mix of fast and slow calls over six decades: 1 µs .. ~60 s.
        (0..n).map(|_| 10f64.powf(rng.random_range(0.0..7.8)) as u64).collect()
    }

    #[test]
    fn percentiles_are_within_the_documented_error_of_exact_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [1, 2, 3, 10, 99, 100, 101, 1000, 20_000] {
            let mut values = lognormal_like(&mut rng, n);
            let mut h = Latencies::new();
            values.iter().for_each(|&v| h.record(v));
            values.sort_unstable();
            for q in [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                let exact = exact_quantile(&values, q).unwrap();
                let got = h.quantile(q).unwrap();
                assert!(got >= exact, "n={n} q={q}: {got} < exact {exact}");
                let bound = exact as f64 * (1.0 + MAX_RELATIVE_ERROR);
                assert!((got as f64) <= bound.max(exact as f64), "n={n} q={q}: {got} vs exact {exact}");
                if exact < 256 {
                    assert_eq!(got, exact, "exact below 256 µs");
                }
            }
        }
    }

    #[test]
    fn stored_buckets_merge_to_the_histogram_of_all_values() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let a = lognormal_like(&mut rng, 5000);
        let b = lognormal_like(&mut rng, 3000);
        let (mut ha, mut hb, mut all) = (Latencies::new(), Latencies::new(), Latencies::new());
        a.iter().for_each(|&v| ha.record(v));
        b.iter().for_each(|&v| hb.record(v));
        a.iter().chain(&b).for_each(|&v| all.record(v));
        let mut merged = Latencies::new();
        for h in [&ha, &hb] {
            let (bounds, counts) = h.buckets();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
            merged.add_buckets(&bounds, &counts);
        }
        assert_eq!(merged.buckets(), all.buckets());
        assert_eq!(merged.count(), 8000);
        for q in [0.5, 0.95, 0.99] {
            assert_eq!(merged.quantile(q), all.quantile(q));
        }
    }

    #[test]
    fn empty_and_extreme_values() {
        let mut h = Latencies::new();
        assert_eq!(h.quantile(0.5), None);
        h.record(0);
        h.record(u64::MAX);
        assert_eq!(h.count(), 2);
        assert_eq!(h.quantile(0.5), Some(0));
        assert!(h.quantile(1.0).unwrap() >= u64::MAX / 4);
    }
}
