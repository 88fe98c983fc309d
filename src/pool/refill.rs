//! How many spares a destination should have, and when a failing destination may be dialed
//! again. Kept apart from the PoolManager so a later policy (adaptive to checkout rate x dial
//! time) replaces only this file.

use std::time::Duration;

use tokio::time::Instant;

/// Whether the pool dials spares in the background at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefillMode {
    /// Replace each spare when it is handed out, and dial one after each miss.
    #[default]
    Replace,
    /// Never dial in the background: only untouched returns become spares. For harnesses that
    /// need a deterministic pool content.
    Off,
}

/// The number of spares (idle plus dialing) a destination aims for.
#[derive(Debug, Clone)]
pub struct RefillTarget {
    mode: RefillMode,
    max_idle_per_dest: usize,
}

impl RefillTarget {
    pub fn new(mode: RefillMode, max_idle_per_dest: usize) -> Self {
        RefillTarget { mode, max_idle_per_dest }
    }

    /// Spares wanted now. Static for now: up to the per-destination limit, one background
    /// dial per checkout (see `PoolManager`), so the pool grows to the concurrency it sees.
    pub fn target(&self) -> usize {
        match self.mode {
            RefillMode::Replace => self.max_idle_per_dest,
            RefillMode::Off => 0,
        }
    }

    /// Hook for an adaptive policy: how long a successful background dial took.
    pub fn observe_dial(&mut self, _took: Duration) {}
}

/// Exponential backoff for background dials to a failing destination, so a dead upstream is
/// not redialed in a tight loop. Client misses still dial directly (their own attempt).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    consecutive_failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, consecutive_failures: 0, not_before: None }
    }

    pub fn allows(&self, now: Instant) -> bool {
        self.not_before.is_none_or_before(now)
    }

    pub fn is_active(&self, now: Instant) -> bool {
        !self.allows(now)
    }

    pub fn failed(&mut self, now: Instant) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let exponent = self.consecutive_failures.saturating_sub(1).min(16);
        let delay = self.base.saturating_mul(1 << exponent).min(self.max);
        self.not_before = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        self.consecutive_failures = 0;
        self.not_before = None;
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

trait NotBefore {
    fn is_none_or_before(&self, now: Instant) -> bool;
}

impl NotBefore for Option<Instant> {
    fn is_none_or_before(&self, now: Instant) -> bool {
        self.map_or(true, |t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let now = Instant::now();
        assert!(b.allows(now));
        assert_eq!(b.failed(now), Duration::from_millis(100));
        assert!(!b.allows(now));
        assert!(b.allows(now + Duration::from_millis(100)));
        assert_eq!(b.failed(now), Duration::from_millis(200));
        assert_eq!(b.failed(now), Duration::from_millis(350));
        assert_eq!(b.failed(now), Duration::from_millis(350));
        b.succeeded();
        assert!(b.allows(now));
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn refill_off_wants_nothing() {
        assert_eq!(RefillTarget::new(RefillMode::Off, 4).target(), 0);
        assert_eq!(RefillTarget::new(RefillMode::Replace, 4).target(), 4);
    }
}
