//! At most one log line per interval for a condition that can repeat at the rate clients
//! choose (a full `max_connections`, accept errors, denied datagrams), with a count of what was
//! held back, so a flood of events never becomes a flood of log lines.

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
    pub fn new(interval: Duration) -> Self {
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
