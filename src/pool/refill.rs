//! How many spares a destination should have, and when a failing destination may be dialed
//! again. Kept apart from the PoolManager so the policy can be tested on its own, with the
//! clock passed in.
//!
//! # The adaptive target (Little's law)
//! A spare handed out is replaced by a background dial that takes the dial time `D`; meanwhile
//! checkouts keep arriving at rate `λ`. So about `λ·D` spares are always on their way, and the
//! idle stock must cover the checkouts that arrive during one dial: the destination needs
//! `λ·D` spares committed (idle plus dialing), plus headroom for the spread of arrivals. For
//! Poisson arrivals the count in one dial time has a standard deviation of `√(λ·D)`, so the
//! target is `⌈λ·D + 2·√(λ·D)⌉`, at least 1 (the replacement of the last spare handed out), at
//! most `max_idle_per_dest`. `λ` decays exponentially when checkouts stop, so the target
//! falls back to 1 within a few `RATE_WINDOW`s; surplus spares are then not replaced, and the
//! Janitor closes those idle longer than `SURPLUS_GRACE` (oldest first, as LIFO leaves them).
//!
//! # Reacting within a few dial times
//! A rate averaged over `RATE_WINDOW` (2 s) lags a step in demand by seconds: hundreds of round
//! trips at 10 ms. Little's law gives a second, instantaneous estimate from the sessions in use
//! now: `λ ≈ in_use / S`, with `S` the moving average of a session's duration (checkout to
//! release). When 30 clients arrive at once, `in_use` jumps at once, and so does the target:
//! the misses of that first round start the dials that serve the second. The demand used is the
//! larger of the two estimates, so the slow one carries the target through short lulls.
//!
//! `S` is the duration of sessions served by a spare, when there have been some: the target
//! supplies spares so that sessions become such sessions. Averaged over every session, the
//! misses of a step (a dial longer each) doubled `S` at 10 ms RTT just as the spares made the
//! next sessions hits; the rate estimate halved, the target with it, and a second wave of
//! misses came one round later (the committed step-demand run: 12 of 29 hits 50 ms after the
//! step). Sessions served by a spare last the same before and after a step.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Whether and how the pool dials spares in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefillMode {
    /// Size the refill from the observed checkout rate and dial time (see the module docs).
    #[default]
    Adaptive,
    /// The earlier static policy, kept as a baseline for comparisons: one background dial per
    /// checkout, up to `max_idle_per_dest`, and never shrink before `idle_timeout`.
    Replace,
    /// Never dial in the background: only untouched returns become spares. For harnesses that
    /// need a deterministic pool content.
    Off,
}

/// Time constant of the checkout-rate estimate: long enough to smooth out one burst, short
/// enough that the target follows a change in load within seconds.
pub const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Time constant of the slower rate that the GlobalBudget compares when deciding whether one
/// destination's spare may be evicted for another's: over a few checkouts the 2-s rate is too
/// noisy to rank destinations (evictions between equally busy ones), this one is not.
pub const ADMISSION_WINDOW: Duration = Duration::from_secs(30);
/// Weight of the newest dial in the dial-time average (1/5: a few dials to move it).
const DIAL_TIME_WEIGHT: f64 = 0.2;
/// Weight of the newest session in the session-duration average.
const SESSION_WEIGHT: f64 = 0.1;
/// Standard deviations of arrivals during one dial that the idle stock should cover.
const HEADROOM_SIGMAS: f64 = 2.0;
/// Background dials one event (a checkout, a finished dial) may start at once: the pool ramps
/// up quickly without opening a burst of connections to a destination in one instant.
pub const MAX_DIALS_PER_EVENT: usize = 4;
/// A spare beyond the target that has sat idle this long is closed by the Janitor. Well above
/// `RATE_WINDOW`, so a short lull does not close spares the next second needs again.
pub const SURPLUS_GRACE: Duration = Duration::from_secs(10);

/// The target and the measurements it comes from, as the stats show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RefillStats {
    /// Spares (idle plus dialing) this destination aims for now.
    pub refill_target: usize,
    /// Recent checkouts per second (exponentially decaying average over `RATE_WINDOW`).
    pub checkouts_per_sec: f64,
    /// Average recent dial time in milliseconds; `None` until a dial has been timed.
    pub dial_time_ms: Option<f64>,
    /// Average recent session duration (checkout to release) in milliseconds.
    pub session_ms: Option<f64>,
    /// The same over sessions a spare served: the `S` of the concurrency estimate when known.
    pub spare_session_ms: Option<f64>,
    /// `checkouts_per_sec × dial time`: spares in flight by Little's law, before headroom.
    pub demand_spares: f64,
}

/// The refill policy of one destination, fed by its PoolManager.
#[derive(Debug, Clone)]
pub struct RefillTarget {
    mode: RefillMode,
    max_idle_per_dest: usize,
    /// Checkouts per second as of `rate_at`, over `RATE_WINDOW` and over `ADMISSION_WINDOW`.
    rate: f64,
    slow_rate: f64,
    rate_at: Option<Instant>,
    dial_secs: Option<f64>,
    /// Moving average of a session's duration, from checkout to release.
    session_secs: Option<f64>,
    /// The same over sessions served by a spare (see the module docs).
    spare_session_secs: Option<f64>,
}

impl RefillTarget {
    pub fn new(mode: RefillMode, max_idle_per_dest: usize) -> Self {
        RefillTarget {
            mode,
            max_idle_per_dest,
            rate: 0.0,
            slow_rate: 0.0,
            rate_at: None,
            dial_secs: None,
            session_secs: None,
            spare_session_secs: None,
        }
    }

    /// A reloaded `max_idle_per_dest`; the measurements carry on.
    pub fn set_max_idle_per_dest(&mut self, max_idle_per_dest: usize) {
        self.max_idle_per_dest = max_idle_per_dest;
    }

    pub fn mode(&self) -> RefillMode {
        self.mode
    }

    /// Counts one checkout at `now` (each adds `1/RATE_WINDOW`, and the sum decays with
    /// `e^(-t/RATE_WINDOW)`, so at a steady rate it converges to that rate).
    pub fn observe_checkout(&mut self, now: Instant) {
        self.rate = self.rate_at(now) + 1.0 / RATE_WINDOW.as_secs_f64();
        self.slow_rate = self.admission_rate(now) + 1.0 / ADMISSION_WINDOW.as_secs_f64();
        self.rate_at = Some(now);
    }

    /// Checkouts per second over [`ADMISSION_WINDOW`], decayed to `now`.
    pub fn admission_rate(&self, now: Instant) -> f64 {
        match self.rate_at {
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                self.slow_rate * (-elapsed / ADMISSION_WINDOW.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }

    /// A successful dial to this destination took `took`.
    pub fn observe_dial(&mut self, took: Duration) {
        let took = took.as_secs_f64();
        self.dial_secs = Some(match self.dial_secs {
            Some(avg) => avg + DIAL_TIME_WEIGHT * (took - avg),
            None => took,
        });
    }

    /// A session ended `held` after its checkout; `through_spare` if a spare served it.
    pub fn observe_session(&mut self, held: Duration, through_spare: bool) {
        let held = held.as_secs_f64();
        let update = |average: Option<f64>| {
            Some(match average {
                Some(avg) => avg + SESSION_WEIGHT * (held - avg),
                None => held,
            })
        };
        self.session_secs = update(self.session_secs);
        if through_spare {
            self.spare_session_secs = update(self.spare_session_secs);
        }
    }

    /// The average dial time measured so far.
    pub fn dial_time(&self) -> Option<Duration> {
        self.dial_secs.map(Duration::from_secs_f64)
    }

    /// Checkouts per second, decayed to `now`.
    pub fn rate_at(&self, now: Instant) -> f64 {
        match self.rate_at {
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                self.rate * (-elapsed / RATE_WINDOW.as_secs_f64()).exp()
            }
            None => 0.0,
        }
    }

    /// Checkouts per second by Little's law on the sessions in use now (see the module docs);
    /// 0 until a session's duration has been measured. The session being checked out is not
    /// counted: alone, it says nothing about concurrency, and a lone client with pauses between
    /// short sessions would otherwise look like a busy one.
    fn concurrent_rate(&self, in_use: u64) -> f64 {
        match self.spare_session_secs.or(self.session_secs) {
            Some(held) if held > 0.0 => in_use.saturating_sub(1) as f64 / held,
            _ => 0.0,
        }
    }

    fn demand_spares(&self, now: Instant, in_use: u64) -> f64 {
        let rate = self.rate_at(now).max(self.concurrent_rate(in_use));
        rate * self.dial_secs.unwrap_or(0.0)
    }

    /// Spares (idle plus dialing) wanted at `now` with `in_use` sessions out.
    pub fn target(&self, now: Instant, in_use: u64) -> usize {
        match self.mode {
            RefillMode::Adaptive => {
                let demand = self.demand_spares(now, in_use);
                let wanted = (demand + HEADROOM_SIGMAS * demand.sqrt()).ceil();
                // `as` saturates on huge values; the limit caps it anyway.
                (wanted as usize).max(1).min(self.max_idle_per_dest)
            }
            RefillMode::Replace => self.max_idle_per_dest,
            RefillMode::Off => 0,
        }
    }

    /// How many background dials one event may start now.
    pub fn dials_per_event(&self) -> usize {
        match self.mode {
            RefillMode::Adaptive => MAX_DIALS_PER_EVENT,
            RefillMode::Replace => 1,
            RefillMode::Off => 0,
        }
    }

    /// Whether a finished dial may start the next ones (the adaptive policy fills up to its
    /// target; the static one dials only on checkouts).
    pub fn refills_after_dials(&self) -> bool {
        self.mode == RefillMode::Adaptive
    }

    /// Idle spares beyond this many may be closed as surplus (only the adaptive policy
    /// shrinks; the others keep spares until `idle_timeout`).
    pub fn keep_at_most(&self, now: Instant, in_use: u64) -> usize {
        match self.mode {
            RefillMode::Adaptive => self.target(now, in_use),
            RefillMode::Replace | RefillMode::Off => usize::MAX,
        }
    }

    pub fn stats(&self, now: Instant, in_use: u64) -> RefillStats {
        RefillStats {
            refill_target: self.target(now, in_use),
            checkouts_per_sec: self.rate_at(now),
            dial_time_ms: self.dial_secs.map(|s| s * 1000.0),
            session_ms: self.session_secs.map(|s| s * 1000.0),
            spare_session_ms: self.spare_session_secs.map(|s| s * 1000.0),
            demand_spares: self.demand_spares(now, in_use),
        }
    }
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
    fn refill_off_wants_nothing_and_static_wants_the_limit() {
        let now = Instant::now();
        assert_eq!(RefillTarget::new(RefillMode::Off, 4).target(now, 0), 0);
        assert_eq!(RefillTarget::new(RefillMode::Replace, 4).target(now, 0), 4);
        assert_eq!(RefillTarget::new(RefillMode::Replace, 4).keep_at_most(now, 0), usize::MAX);
    }

    /// Feeds `per_sec` evenly spaced checkouts for `seconds`, starting at `start`; returns the
    /// time of the last one.
    fn steady(target: &mut RefillTarget, start: Instant, per_sec: u32, seconds: u32) -> Instant {
        let gap = Duration::from_secs(1) / per_sec;
        let mut now = start;
        for _ in 0..per_sec * seconds {
            now += gap;
            target.observe_checkout(now);
        }
        now
    }

    #[test]
    fn a_quiet_destination_wants_one_spare() {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        // Nothing observed yet: the replacement of the first checkout only.
        assert_eq!(target.target(start, 0), 1);
        target.observe_checkout(start);
        target.observe_dial(Duration::from_millis(10));
        // One checkout over a 10 ms path needs far less than one spare in flight.
        assert_eq!(target.target(start, 0), 1);
        let stats = target.stats(start, 0);
        assert_eq!(stats.dial_time_ms, Some(10.0));
        assert!((stats.checkouts_per_sec - 0.5).abs() < 1e-9, "{stats:?}");
    }

    #[test]
    fn the_rate_converges_to_a_steady_rate() {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        let end = steady(&mut target, start, 1000, 20);
        let rate = target.rate_at(end);
        assert!((rate - 1000.0).abs() < 1000.0 * 0.01, "estimated {rate}/s for 1000/s");
    }

    #[test]
    fn the_target_follows_littles_law_with_headroom() {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 1000);
        for _ in 0..10 {
            target.observe_dial(Duration::from_millis(10));
        }
        let end = steady(&mut target, start, 1600, 20);
        // 1600/s x 10 ms = 16 spares in flight, plus 2 x sqrt(16) = 8 of headroom.
        let stats = target.stats(end, 0);
        assert!((stats.demand_spares - 16.0).abs() < 0.2, "{stats:?}");
        // (Just after a checkout the decaying rate sits a hair above the mean, so 24 or 25.)
        assert!((24..=25).contains(&stats.refill_target), "{stats:?}");
        // A slower path needs proportionally more: 50 ms -> 80 + 2 x sqrt(80) = 97.9 -> 98.
        for _ in 0..100 {
            target.observe_dial(Duration::from_millis(50));
        }
        assert_eq!(target.target(end, 0), 98);
    }

    #[test]
    fn the_target_never_exceeds_the_per_destination_limit() {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 4);
        target.observe_dial(Duration::from_millis(50));
        let end = steady(&mut target, start, 5000, 5);
        assert_eq!(target.target(end, 0), 4);
        assert_eq!(RefillTarget::new(RefillMode::Adaptive, 0).target(end, 0), 0);
    }

    #[test]
    fn the_target_falls_back_when_demand_stops() {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        target.observe_dial(Duration::from_millis(10));
        let end = steady(&mut target, start, 1600, 10);
        let busy = target.target(end, 0);
        assert!(busy > 20, "{busy}");
        // One window later the rate is down to 1/e, and the target with it (monotonically).
        let later = target.target(end + RATE_WINDOW, 0);
        assert!(later < busy && later > 1, "{busy} -> {later}");
        // Ten windows later the demand is gone: back to the single replacement spare.
        assert_eq!(target.target(end + RATE_WINDOW * 10, 0), 1);
        assert_eq!(target.keep_at_most(end + RATE_WINDOW * 10, 0), 1);
    }

    /// Dials and sessions of 10 ms, two clients in a closed loop, one session after another:
    /// 200 checkouts/s. Returns the target and the end of that steady demand.
    fn two_clients_of_10ms_sessions() -> (RefillTarget, Instant) {
        let start = Instant::now();
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        for _ in 0..10 {
            target.observe_dial(Duration::from_millis(10));
            target.observe_session(Duration::from_millis(10), true);
        }
        let end = steady(&mut target, start, 200, 10);
        (target, end)
    }

    #[test]
    fn a_step_in_concurrency_raises_the_target_at_once() {
        let (target, end) = two_clients_of_10ms_sessions();
        let calm = target.target(end, 2);
        assert!(calm <= 7, "{calm}");
        // 30 more arrive: before the 2-s rate has moved, 32 sessions are in use.
        let stepped = target.target(end, 32);
        // 31 other sessions / 10 ms = 3,100/s; x 10 ms = 31 in flight, + 2 sqrt(31) -> 43.
        assert_eq!(stepped, 43, "the target follows the sessions in use at once");
        // And it falls with them, but only as fast as the slow estimate allows.
        assert_eq!(target.target(end, 2), calm);
    }

    #[test]
    fn the_misses_of_a_step_do_not_lower_the_target_they_asked_for() {
        let (mut target, end) = two_clients_of_10ms_sessions();
        // 30 clients arrive and miss: each session dials, 20 ms instead of 10.
        for _ in 0..30 {
            target.observe_session(Duration::from_millis(20), false);
        }
        // The spares they started now serve 32 clients at 10 ms a session: still 43 wanted
        // (averaged over every session, S would be ~19.6 ms and the target 24).
        assert_eq!(target.target(end, 32), 43);
        let stats = target.stats(end, 32);
        assert!(stats.session_ms.is_some_and(|ms| ms > 19.0), "{stats:?}");
        assert!(stats.spare_session_ms.is_some_and(|ms| (ms - 10.0).abs() < 1e-6), "{stats:?}");
    }

    #[test]
    fn without_a_spare_served_session_every_session_gives_the_duration() {
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        target.observe_dial(Duration::from_millis(10));
        target.observe_session(Duration::from_millis(20), false);
        // 31 others / 20 ms = 1,550/s; x 10 ms = 15.5, + 2 sqrt(15.5) -> 24.
        assert_eq!(target.target(Instant::now(), 32), 24);
    }

    #[test]
    fn dial_time_is_a_moving_average() {
        let mut target = RefillTarget::new(RefillMode::Adaptive, 64);
        target.observe_dial(Duration::from_millis(10));
        target.observe_dial(Duration::from_millis(60));
        // 10 + 0.2 x (60 - 10) = 20 ms.
        let ms = target.stats(Instant::now(), 0).dial_time_ms.unwrap_or_default();
        assert!((ms - 20.0).abs() < 1e-6, "{ms}");
    }
}
