//! The per-address limit on failed logins.
//!
//! An attempt is counted *before* its password is checked: a slot is taken for it, and the
//! limit compares failures plus attempts in flight. Checking first and recording after let 40
//! concurrent wrong passwords through with a limit of 5 (each one checked before any failed).
//!
//! The tracker costs O(1) amortised per attempt whatever the number of addresses: windows are
//! kept in the order they started, and each call expires from the front only what has run out
//! (a `retain` over the whole map cost 0.54 ms per failure at 60,000 addresses). It holds at
//! most `capacity` sources; beyond that the oldest window is forgotten first. IPv6 sources are
//! counted per /64 (what one host or small site is given), so cycling addresses within it does
//! not reset the count.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Sources tracked at most (a few MiB at worst).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The key a source is counted under: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
            v4 => Source(v4),
        }
    }
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    in_flight: u32,
    /// Matches the entry's latest place in `order`; older places are skipped.
    generation: u64,
}

#[derive(Debug, Default)]
struct Tracker {
    by_source: HashMap<Source, Entry>,
    /// Sources in the order their windows started (with the generation they started under).
    order: VecDeque<(Source, u64)>,
    next_generation: u64,
    /// Entries looked at by the last call's expiry (for tests of the cost).
    examined: usize,
}

/// Failed logins per source in fixed windows.
#[derive(Debug)]
pub struct LoginLimit {
    limit: u32,
    window: Duration,
    capacity: usize,
    tracker: Mutex<Tracker>,
}

/// One login attempt holding its place against the limit. [`Attempt::succeeded`] gives the
/// place back; [`Attempt::failed`], or dropping it unfinished (a client that hung up or timed
/// out mid-check), turns it into a failure.
pub struct Attempt {
    limit: Arc<LoginLimit>,
    source: Source,
    generation: u64,
    done: bool,
}

impl LoginLimit {
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Arc<Self> {
        Arc::new(LoginLimit {
            limit,
            window,
            capacity: capacity.max(1),
            tracker: Mutex::new(Tracker::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Tracker> {
        // Every update below leaves the tracker consistent, so a poisoned lock is still usable.
        self.tracker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a place for an attempt from `client`, or `None` if failures and attempts in
    /// flight already reach the limit (the address is refused without a check).
    pub fn begin(self: &Arc<Self>, client: IpAddr, now: Instant) -> Option<Attempt> {
        let source = Source::of(client);
        let mut tracker = self.lock();
        self.expire(&mut tracker, now);
        if let Some(entry) = tracker.by_source.get_mut(&source) {
            if entry.failures.saturating_add(entry.in_flight) >= self.limit {
                return None;
            }
            entry.in_flight += 1;
            let generation = entry.generation;
            return Some(Attempt { limit: self.clone(), source, generation, done: false });
        }
        if tracker.by_source.len() >= self.capacity {
            self.forget_oldest(&mut tracker);
        }
        let generation = tracker.next_generation;
        tracker.next_generation += 1;
        tracker
            .by_source
            .insert(source, Entry { window_start: now, failures: 0, in_flight: 1, generation });
        tracker.order.push_back((source, generation));
        Some(Attempt { limit: self.clone(), source, generation, done: false })
    }

    /// Whether `client` would be refused now (for logs and tests).
    pub fn is_limited(&self, client: IpAddr, now: Instant) -> bool {
        let mut tracker = self.lock();
        self.expire(&mut tracker, now);
        tracker
            .by_source
            .get(&Source::of(client))
            .is_some_and(|e| e.failures.saturating_add(e.in_flight) >= self.limit)
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().by_source.len()
    }

    /// How many queued windows the last call's expiry looked at.
    pub fn last_examined(&self) -> usize {
        self.lock().examined
    }

    fn end(&self, source: Source, generation: u64, failed: bool) {
        let mut tracker = self.lock();
        let Some(entry) = tracker.by_source.get_mut(&source) else { return };
        entry.in_flight = entry.in_flight.saturating_sub(1);
        // A window restarted meanwhile counts the failure in the new window all the same.
        let _ = generation;
        if failed {
            entry.failures = entry.failures.saturating_add(1);
        } else if entry.failures == 0 && entry.in_flight == 0 {
            // Nothing to remember about a source whose logins succeed.
            tracker.by_source.remove(&source);
        }
    }

    /// Ends the windows that ran out, oldest first, stopping at the first one still running.
    fn expire(&self, tracker: &mut Tracker, now: Instant) {
        tracker.examined = 0;
        while let Some(&(source, generation)) = tracker.order.front() {
            tracker.examined += 1;
            let window = self.window;
            let state = match tracker.by_source.get_mut(&source) {
                Some(entry) if entry.generation == generation => {
                    if now.saturating_duration_since(entry.window_start) < window {
                        break;
                    }
                    if entry.in_flight > 0 {
                        // Attempts still being checked keep the source; its window starts over.
                        let next = tracker.next_generation;
                        entry.window_start = now;
                        entry.failures = 0;
                        entry.generation = next;
                        Some(next)
                    } else {
                        tracker.by_source.remove(&source);
                        None
                    }
                }
                // Forgotten already, or queued again under a newer generation.
                _ => None,
            };
            tracker.order.pop_front();
            if let Some(next) = state {
                tracker.next_generation += 1;
                tracker.order.push_back((source, next));
            }
        }
    }

    fn forget_oldest(&self, tracker: &mut Tracker) {
        while let Some((source, generation)) = tracker.order.pop_front() {
            if tracker.by_source.get(&source).is_some_and(|e| e.generation == generation) {
                tracker.by_source.remove(&source);
                return;
            }
        }
    }
}

impl Attempt {
    pub fn succeeded(mut self) {
        self.done = true;
        self.limit.end(self.source, self.generation, false);
    }

    pub fn failed(mut self) {
        self.done = true;
        self.limit.end(self.source, self.generation, true);
    }

    /// Ends an attempt that got no verdict (shed before its check, or a request without
    /// credentials): its place is given back and nothing is counted against the source.
    pub fn withdrawn(mut self) {
        self.done = true;
        self.limit.end(self.source, self.generation, false);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.limit.end(self.source, self.generation, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn attempts_in_flight_count_against_the_limit() {
        let limit = LoginLimit::new(5, Duration::from_secs(60), DEFAULT_CAPACITY);
        let now = Instant::now();
        // 41 attempts at once: only 5 get a place to be checked.
        let attempts: Vec<Attempt> = (0..41).filter_map(|_| limit.begin(CLIENT, now)).collect();
        assert_eq!(attempts.len(), 5);
        for attempt in attempts {
            attempt.failed();
        }
        assert!(limit.is_limited(CLIENT, now));
        assert!(limit.begin(CLIENT, now).is_none());
    }

    #[test]
    fn a_success_frees_its_place_and_leaves_nothing_behind() {
        let limit = LoginLimit::new(2, Duration::from_secs(60), DEFAULT_CAPACITY);
        let now = Instant::now();
        for _ in 0..10 {
            limit.begin(CLIENT, now).expect("place").succeeded();
        }
        assert_eq!(limit.tracked(), 0);
    }

    #[test]
    fn an_abandoned_attempt_is_a_failure() {
        let limit = LoginLimit::new(1, Duration::from_secs(60), DEFAULT_CAPACITY);
        let now = Instant::now();
        drop(limit.begin(CLIENT, now));
        assert!(limit.is_limited(CLIENT, now));
    }

    #[test]
    fn the_window_expires_and_starts_over() {
        let limit = LoginLimit::new(2, Duration::from_secs(60), DEFAULT_CAPACITY);
        let start = Instant::now();
        limit.begin(CLIENT, start).expect("place").failed();
        limit.begin(CLIENT, start).expect("place").failed();
        assert!(limit.is_limited(CLIENT, start + Duration::from_secs(59)));
        assert!(!limit.is_limited(CLIENT, start + Duration::from_secs(60)));
        assert_eq!(limit.tracked(), 0, "an expired source is forgotten");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let limit = LoginLimit::new(2, Duration::from_secs(60), DEFAULT_CAPACITY);
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        limit.begin(a, now).expect("place").failed();
        limit.begin(b, now).expect("place").failed();
        assert!(limit.is_limited(a, now));
        assert!(!limit.is_limited(elsewhere, now));
        // An IPv4-mapped address is its IPv4 address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        limit.begin(CLIENT, now).expect("place").failed();
        limit.begin(mapped, now).expect("place").failed();
        assert!(limit.is_limited(CLIENT, now));
    }

    #[test]
    fn the_cost_per_attempt_does_not_grow_with_the_sources_tracked() {
        let limit = LoginLimit::new(5, Duration::from_secs(60), DEFAULT_CAPACITY);
        let start = Instant::now();
        for i in 0..60_000u32 {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let now = start + Duration::from_micros(u64::from(i));
            limit.begin(source, now).expect("place").failed();
            assert!(limit.last_examined() <= 2, "attempt {i} looked at {}", limit.last_examined());
        }
        assert_eq!(limit.tracked(), 60_000);
        // A minute later, each call expires what ran out, a little at a time.
        let later = start + Duration::from_secs(60) + Duration::from_micros(10);
        limit.begin(CLIENT, later).expect("place").failed();
        assert!(limit.last_examined() <= 12, "{}", limit.last_examined());
    }

    #[test]
    fn the_map_is_bounded() {
        let limit = LoginLimit::new(5, Duration::from_secs(60), 1_000);
        let now = Instant::now();
        for i in 0..5_000u32 {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            limit.begin(source, now).expect("place").failed();
            assert!(limit.tracked() <= 1_000);
        }
    }
}
