//! Latency histograms with fixed buckets: cheap enough to record on every request, mergeable
//! across shards, and exported as Prometheus histograms by the admin listener.

/// Upper bounds of the buckets, in microseconds (the last bucket, +Inf, has none).
pub const BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Observations per bucket (not cumulative) and their sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub counts: [u64; BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        let at = BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BOUNDS_US.len());
        self.counts[at] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let mut l = Latency::default();
        for us in [0, 100, 101, 999_999, 1_000_001, 5_000_000] {
            l.record(us);
        }
        assert_eq!(l.counts[0], 2);
        assert_eq!(l.counts[1], 1);
        assert_eq!(l.counts[BOUNDS_US.len() - 1], 1);
        assert_eq!(l.counts[BOUNDS_US.len()], 2);
        assert_eq!(l.count(), 6);
        assert_eq!(l.sum_us, 100 + 101 + 999_999 + 1_000_001 + 5_000_000);
    }
}
