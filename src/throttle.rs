//! At most one log line per interval for a condition that can repeat at the rate clients
//! choose (a full `max_connections`, accept errors, denied datagrams), with a count of what was
//! held back, so a flood of events never becomes a flood of log lines.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Lets one report through per `interval`.
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Throttle { interval, last: None, suppressed: 0 }
    }

    /// Records one occurrence at `now`. `Some(held_back)` when it should be reported (with how
    /// many occurrences since the last report were not), `None` when it should stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Occurrences held back since the last report, taken (for an "it is over" line).
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// A [`Throttle`] every session shares, for a log line any client can cause at the rate it
/// chooses (a `static` per kind of line).
#[derive(Debug)]
pub struct SharedThrottle(Mutex<Throttle>);

impl SharedThrottle {
    pub const fn new(interval: Duration) -> Self {
        SharedThrottle(Mutex::new(Throttle::new(interval)))
    }

    /// As [`Throttle::allow`], now.
    pub fn allow(&self) -> Option<u64> {
        let mut throttle = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        throttle.allow(Instant::now())
    }
}

/// How often a line any client can cause is logged at most.
pub const CLIENT_LINE_INTERVAL: Duration = Duration::from_secs(10);

/// Logs with `tracing`'s `$level!` at most once per [`CLIENT_LINE_INTERVAL`] for this call
/// site, adding `not_logged` (the occurrences held back since the last line).
#[macro_export]
macro_rules! throttled {
    ($level:ident, $($arg:tt)+) => {{
        static GATE: $crate::throttle::SharedThrottle =
            $crate::throttle::SharedThrottle::new($crate::throttle::CLIENT_LINE_INTERVAL);
        if let Some(not_logged) = GATE.allow() {
            tracing::$level!(not_logged, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_report_per_interval_with_the_count_held_back() {
        let mut throttle = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.allow(start), Some(0));
        for i in 1..=99 {
            assert_eq!(throttle.allow(start + Duration::from_millis(i * 50)), None);
        }
        assert_eq!(throttle.allow(start + Duration::from_secs(10)), Some(99));
        assert_eq!(throttle.allow(start + Duration::from_secs(11)), None);
        assert_eq!(throttle.take_suppressed(), 1);
    }
}
