//! What a destination's server does to idle connections, learned from its spares.
//!
//! Many servers drop a connection that stays idle before its login: MariaDB after
//! `connect_timeout` (10 s by default), sshd after `LoginGraceTime`, SMTP and FTP servers with a
//! `421` line. A spare is exactly such a connection. When a spare's server closes it while it
//! waits, its age (from its dial) is a measure of that server's idle limit; the PoolManager
//! feeds those ages here. From them:
//! - spares are retired at [`RETIRE_FRACTION`] of the limit, before the server would close them
//!   (a spare handed out a moment before the server closes it fails the client's first read);
//! - no spare is dialed at all when the time a spare waits for its client there (measured at
//!   hand-out, or at least the gap between checkouts) is longer than that retirement age: every
//!   such spare would die unused and cost the server an aborted connection.
//!
//! The estimate is forgotten after [`MEMORY`] without a new close, so one server restart does
//! not mark a destination forever. Kept apart from the manager so it can be tested with the
//! clock passed in.

use std::time::Duration;

use tokio::time::Instant;

/// Spares are retired at this share of the learned limit (a margin for the server's timer
/// granularity and for the time between a checkout and the client's first byte).
pub const RETIRE_FRACTION: f64 = 0.75;
/// A learned limit with no new close for this long is forgotten.
pub const MEMORY: Duration = Duration::from_secs(600);
/// Closes needed before the limit is trusted: one close may be a restart, not a policy.
pub const MIN_CLOSES: u32 = 2;
/// Weight of the newest close in the limit's moving average.
const LIMIT_WEIGHT: f64 = 0.5;
/// Weight of the newest hand-out in the wait's moving average.
const WAIT_WEIGHT: f64 = 0.2;
/// Weight of the newest gap between checkouts in its moving average.
const GAP_WEIGHT: f64 = 0.3;

#[derive(Debug, Clone, Default)]
pub struct ServerIdleLimit {
    limit_secs: Option<f64>,
    closes: u32,
    observed_at: Option<Instant>,
    wait_secs: Option<f64>,
    /// Moving average of the time between checkouts, and the last one.
    gap_secs: Option<f64>,
    last_checkout: Option<Instant>,
}

impl ServerIdleLimit {
    /// A spare was closed by its server while idle, `age` after its dial.
    pub fn observe_close(&mut self, age: Duration, now: Instant) {
        let age = age.as_secs_f64();
        let remembered =
            self.observed_at.is_some_and(|at| now.saturating_duration_since(at) < MEMORY);
        let (limit, closes) = match (self.limit_secs, remembered) {
            (Some(limit), true) => (limit + LIMIT_WEIGHT * (age - limit), self.closes + 1),
            _ => (age, 1),
        };
        self.limit_secs = Some(limit);
        self.closes = closes;
        self.observed_at = Some(now);
    }

    /// A checkout at `now`: the gaps between checkouts bound how long a spare waits.
    pub fn observe_checkout(&mut self, now: Instant) {
        if let Some(last) = self.last_checkout {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            self.gap_secs = Some(match self.gap_secs {
                Some(avg) => avg + GAP_WEIGHT * (gap - avg),
                None => gap,
            });
        }
        self.last_checkout = Some(now);
    }

    /// A spare was handed out `waited` after its dial.
    pub fn observe_hand_out(&mut self, waited: Duration) {
        let waited = waited.as_secs_f64();
        self.wait_secs = Some(match self.wait_secs {
            Some(avg) => avg + WAIT_WEIGHT * (waited - avg),
            None => waited,
        });
    }

    /// The server's idle limit as learned, once [`MIN_CLOSES`] closes were seen, the last
    /// recently enough.
    pub fn limit(&self, now: Instant) -> Option<Duration> {
        let observed_at = self.observed_at?;
        if now.saturating_duration_since(observed_at) >= MEMORY || self.closes < MIN_CLOSES {
            return None;
        }
        self.limit_secs.map(Duration::from_secs_f64)
    }

    /// Age at which a spare is closed before its server would.
    pub fn retire_age(&self, now: Instant) -> Option<Duration> {
        self.limit(now).map(|limit| limit.mul_f64(RETIRE_FRACTION))
    }

    /// How long a spare can be expected to wait for its client here: the measured wait at
    /// hand-out, but never less than the gap between checkouts (measured, or else from
    /// `checkouts_per_sec`).
    pub fn expected_wait(&self, checkouts_per_sec: f64) -> Duration {
        let gap = match self.gap_secs {
            Some(gap) => gap,
            None if checkouts_per_sec > 0.0 => 1.0 / checkouts_per_sec,
            None => f64::INFINITY,
        };
        let wait = self.wait_secs.unwrap_or(0.0).max(gap);
        Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX)
    }

    /// False when spares here would die before their client comes (see the module docs).
    pub fn spares_pay(&self, checkouts_per_sec: f64, now: Instant) -> bool {
        match self.retire_age(now) {
            Some(retire) => self.expected_wait(checkouts_per_sec) < retire,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_learned_means_spares_pay() {
        let limit = ServerIdleLimit::default();
        let now = Instant::now();
        assert_eq!(limit.retire_age(now), None);
        assert!(limit.spares_pay(0.0, now));
    }

    #[test]
    fn a_server_that_drops_idle_connections_after_10s_gets_spares_retired_at_7_5s() {
        let mut limit = ServerIdleLimit::default();
        let now = Instant::now();
        limit.observe_close(Duration::from_secs(10), now);
        limit.observe_close(Duration::from_millis(10_200), now);
        let retire = limit.retire_age(now).expect("learned");
        assert!((retire.as_secs_f64() - 0.75 * 10.1).abs() < 1e-6, "{retire:?}");
        // Busy (20 checkouts/s, spares handed out 50 ms after their dial): spares pay.
        limit.observe_hand_out(Duration::from_millis(50));
        assert!(limit.spares_pay(20.0, now));
        // One client every 12 s: every spare would die waiting.
        assert!(!limit.spares_pay(1.0 / 12.0, now));
        // Nobody at all: none either.
        assert!(!limit.spares_pay(0.0, now));
    }

    #[test]
    fn measured_gaps_between_checkouts_decide_not_the_jumpy_rate() {
        let mut limit = ServerIdleLimit::default();
        let start = Instant::now();
        limit.observe_close(Duration::from_secs(2), start);
        limit.observe_close(Duration::from_secs(2), start);
        // A client every 3 s: a spare would wait longer than its 1.5 s of life, whatever the
        // rate estimate says right after a checkout.
        for i in 0..5 {
            limit.observe_checkout(start + Duration::from_secs(3 * i));
        }
        assert!(!limit.spares_pay(10.0, start));
        // Clients every 100 ms again: spares pay.
        let busy = start + Duration::from_secs(12);
        for i in 0..20 {
            limit.observe_checkout(busy + Duration::from_millis(100 * i));
        }
        assert!(limit.spares_pay(10.0, busy));
    }

    #[test]
    fn a_long_measured_wait_stops_spares_even_at_a_high_rate() {
        let mut limit = ServerIdleLimit::default();
        let now = Instant::now();
        limit.observe_close(Duration::from_secs(2), now);
        limit.observe_close(Duration::from_secs(2), now);
        for _ in 0..20 {
            limit.observe_hand_out(Duration::from_secs(3));
        }
        assert!(!limit.spares_pay(100.0, now));
    }

    #[test]
    fn one_close_is_not_a_policy() {
        let mut limit = ServerIdleLimit::default();
        let now = Instant::now();
        limit.observe_close(Duration::ZERO, now);
        assert_eq!(limit.limit(now), None, "a restart closes everything once");
        limit.observe_close(Duration::from_millis(2), now);
        assert!(limit.limit(now).is_some());
    }

    #[test]
    fn the_limit_is_forgotten_after_a_while_without_closes() {
        let mut limit = ServerIdleLimit::default();
        let now = Instant::now();
        limit.observe_close(Duration::from_secs(2), now);
        limit.observe_close(Duration::from_secs(2), now);
        assert!(limit.limit(now + MEMORY - Duration::from_secs(1)).is_some());
        assert_eq!(limit.limit(now + MEMORY), None);
        assert!(limit.spares_pay(0.01, now + MEMORY));
        // And starts over: one close after the gap is again not enough.
        limit.observe_close(Duration::from_secs(2), now + MEMORY);
        assert_eq!(limit.limit(now + MEMORY), None);
    }
}
