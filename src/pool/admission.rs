//! Which destinations get a PoolManager at all.
//!
//! A spare pays only for a destination asked for again soon. Most names a proxy sees are asked
//! for once (a page's third-party hosts, a crawler, a typo), and giving each a manager cost a
//! background dial (a second connection and lookup for a destination nobody asks for again)
//! and per-destination state an attacker could grow without bound (45,000 names: 474 MiB).
//! So a destination is admitted on its **second** checkout within `window` (a doorkeeper, as in
//! TinyLFU): the first is dialed directly and only remembered, as a 64-bit keyed hash in a
//! bounded FIFO. Admitted destinations are capped at `max_destinations`; past that the
//! Directory forgets one of the least recently active (see `directory`).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::time::Instant;

use crate::socks::TargetAddr;

/// Whether a destination must be seen twice before it gets a manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Every destination gets a manager on its first checkout (harnesses, and the baseline).
    Always,
    /// A destination gets a manager on its second checkout within `window`.
    SecondSighting { window: Duration },
}

/// First sightings, remembered for `window`, at most `capacity` of them.
#[derive(Debug)]
pub struct Doorkeeper {
    window: Duration,
    capacity: usize,
    hasher: RandomState,
    seen: HashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
}

impl Doorkeeper {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Doorkeeper {
            window,
            capacity: capacity.max(1),
            // Keyed per process, so nobody can choose names that collide.
            hasher: RandomState::new(),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// True if `target` was seen within the window (it is admitted, and forgotten here);
    /// otherwise records this sighting and answers false.
    pub fn admit(&mut self, target: &TargetAddr, now: Instant) -> bool {
        self.expire(now);
        let key = self.hasher.hash_one(target);
        if self.seen.remove(&key).is_some() {
            return true;
        }
        if self.seen.len() >= self.capacity {
            if let Some((oldest, _)) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(key, now);
        self.order.push_back((key, now));
        false
    }

    /// A reloaded window (it follows `idle_timeout_secs`); sightings already held keep their
    /// time and expire by the new window.
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// Sightings remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets the sightings older than the window. Also done by every `admit`; the Directory
    /// calls it on each sweep too, so sightings do not outlive a burst that stopped.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            // Only if this queue entry is the sighting's own (not an older, re-added one).
            if self.seen.get(&key) == Some(&at) {
                self.seen.remove(&key);
            }
        }
        // Admitted keys leave stale queue entries behind; keep the queue near the map's size.
        if self.order.len() > 2 * self.capacity {
            let seen = &self.seen;
            self.order.retain(|(key, at)| seen.get(key) == Some(at));
        }
        if crate::memory::oversized(self.seen.len(), self.seen.capacity()) {
            self.seen.shrink_to_fit();
        }
        if crate::memory::oversized(self.order.len(), self.order.capacity()) {
            self.order.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(n: u16) -> TargetAddr {
        TargetAddr::Domain(format!("host{n}.example"), 443)
    }

    #[test]
    fn the_second_sighting_within_the_window_is_admitted() {
        let mut door = Doorkeeper::new(Duration::from_secs(90), 100);
        let now = Instant::now();
        assert!(!door.admit(&target(1), now));
        assert!(door.admit(&target(1), now + Duration::from_secs(89)));
        // Admitted and forgotten: a manager now stands for it.
        assert!(door.is_empty());
        assert!(!door.admit(&target(2), now));
        assert!(!door.admit(&target(2), now + Duration::from_secs(90)), "too late: first again");
    }

    #[test]
    fn expired_sightings_give_their_room_back() {
        let mut door = Doorkeeper::new(Duration::from_secs(90), 10_000);
        let now = Instant::now();
        for n in 0..10_000u32 {
            door.admit(&TargetAddr::Domain(format!("n{n}.example"), 80), now);
        }
        assert!(door.seen.capacity() >= 10_000);
        door.expire(now + Duration::from_secs(90));
        assert!(door.is_empty());
        assert!(door.seen.capacity() < 10_000 && door.order.capacity() < 10_000);
    }

    #[test]
    fn memory_is_bounded_whatever_the_names() {
        let mut door = Doorkeeper::new(Duration::from_secs(90), 1_000);
        let now = Instant::now();
        for n in 0..50_000u32 {
            let name = TargetAddr::Domain(format!("n{n}.example"), 80);
            assert!(!door.admit(&name, now));
            assert!(door.len() <= 1_000);
        }
    }
}
