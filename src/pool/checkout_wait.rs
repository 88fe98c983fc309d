//! How long a client waits for the pool's answer to a checkout: the time the pool itself adds
//! to a session's path (a message to the destination's PoolManager and its reply), before the
//! spare is used or the client's own dial starts. The pool promises never to cost more than it
//! saves; this is the cost side, measured on every checkout, so an operator can see it.
//!
//! Lock-free fixed buckets (two atomic adds per checkout); the stats endpoint turns a snapshot
//! into a Prometheus histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the buckets, in microseconds. A round trip to an idle manager takes a few
/// microseconds; hundreds mean a queue in front of the manager or a starved runtime, and
/// milliseconds are a session's whole budget on a LAN.
pub const BOUNDS_US: [u64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 10_000, 100_000, 1_000_000];

/// Checkout waits since start, shared by every clone of the pool's handle.
#[derive(Debug, Default)]
pub struct CheckoutWaits {
    /// Per bucket of [`BOUNDS_US`], plus one for longer waits (not cumulative).
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl CheckoutWaits {
    pub fn record(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.iter().position(|&bound| us <= bound).unwrap_or(BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CheckoutWaitStats {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_US.len());
        for (bound, count) in BOUNDS_US.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let count = cumulative + self.buckets[BOUNDS_US.len()].load(Ordering::Relaxed);
        CheckoutWaitStats { count, sum_us: self.sum_us.load(Ordering::Relaxed), buckets }
    }
}

/// A snapshot of [`CheckoutWaits`], as `/api/pool/stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckoutWaitStats {
    /// Checkouts answered (or given up on) since start.
    pub count: u64,
    pub sum_us: u64,
    /// `(upper bound in µs, checkouts that waited at most that long)`, cumulative as in
    /// Prometheus; the checkouts beyond the last bound are `count` minus the last figure.
    pub buckets: Vec<(u64, u64)>,
}

impl CheckoutWaitStats {
    /// The smallest bucket bound that at least `quantile` of the checkouts stayed within;
    /// `None` before any checkout, or when the quantile lies beyond the last bound.
    pub fn quantile_bound_us(&self, quantile: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let wanted = (quantile * self.count as f64).ceil() as u64;
        self.buckets.iter().find(|(_, within)| *within >= wanted).map(|(bound, _)| *bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wait_lands_in_the_first_bucket_that_holds_it() {
        let waits = CheckoutWaits::default();
        waits.record(Duration::from_micros(3));
        waits.record(Duration::from_micros(5));
        waits.record(Duration::from_micros(6));
        waits.record(Duration::from_micros(700));
        waits.record(Duration::from_secs(5));
        let stats = waits.snapshot();
        assert_eq!(stats.count, 5);
        assert_eq!(stats.sum_us, 3 + 5 + 6 + 700 + 5_000_000);
        assert_eq!(stats.buckets[0], (5, 2), "3 and 5 µs are within 5 µs");
        assert_eq!(stats.buckets[1], (10, 3));
        assert_eq!(stats.buckets[6], (500, 3));
        assert_eq!(stats.buckets[7], (1_000, 4));
        assert_eq!(stats.buckets.last(), Some(&(1_000_000, 4)), "5 s is beyond every bound");
    }

    #[test]
    fn quantiles_are_read_off_the_cumulative_buckets() {
        let waits = CheckoutWaits::default();
        assert_eq!(waits.snapshot().quantile_bound_us(0.5), None);
        for _ in 0..98 {
            waits.record(Duration::from_micros(8));
        }
        waits.record(Duration::from_micros(300));
        waits.record(Duration::from_secs(3));
        let stats = waits.snapshot();
        assert_eq!(stats.quantile_bound_us(0.5), Some(10));
        assert_eq!(stats.quantile_bound_us(0.99), Some(500));
        assert_eq!(stats.quantile_bound_us(1.0), None, "the longest is beyond the last bound");
    }
}
