//! The places for argon2 checks, given by priority rather than in arrival order, and a bounded
//! line of logins waiting for one.
//!
//! A check holds its argon2 memory for tens of milliseconds, so only a few run at once and the
//! others wait. In arrival order, strangers from many addresses (each under the per-address
//! failure limit) would make every login wait behind all of them. Waiting logins are served:
//! 1. from *known* sources first: a source (an IPv4 address, an IPv6 /64, as the failure
//!    limit counts them) that logged in successfully before; the [`KNOWN_SOURCES`] most
//!    recently successful are remembered;
//! 2. then the attempt whose source had fewer attempts waiting or being checked when it came;
//! 3. then in arrival order.
//!
//! The line is bounded: at most [`MAX_WAITING_STRANGERS`] logins from other sources and
//! [`MAX_WAITING_KNOWN`] from known ones wait. A newcomer to a full line takes the place of the
//! last one waiting in its class if it ranks before it, and is shed otherwise; a shed login is
//! answered as a failure at once. Shedding reads the source and the line only, never the user
//! name, so it tells nothing about which users exist.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::login_limit::Source;
use crate::throttle::Throttle;

/// Logins from sources not known to succeed that may wait for a place: with 2 places and
/// checks of ~40 ms, the last one waits about 1.3 s, well within the handshake timeout.
pub const MAX_WAITING_STRANGERS: usize = 64;
/// Logins from known sources that may wait for a place.
pub const MAX_WAITING_KNOWN: usize = 256;
/// Sources that logged in successfully, remembered at most (the least recent forgotten first).
pub const KNOWN_SOURCES: usize = 4096;
/// At most one log line about shed logins per this long.
const SHED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where a waiting login stands; the smallest is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    stranger: bool,
    /// Attempts of the same source waiting or being checked when this one came.
    ahead_from_source: u32,
    arrival: u64,
}

impl Rank {
    /// Before every stranger's rank.
    const FIRST_STRANGER: Rank = Rank { stranger: true, ahead_from_source: 0, arrival: 0 };
}

#[derive(Debug)]
enum Verdict {
    Granted,
    Shed,
}

#[derive(Debug)]
struct Waiter {
    source: Source,
    verdict: oneshot::Sender<Verdict>,
}

#[derive(Debug)]
struct State {
    free: usize,
    waiting: BTreeMap<Rank, Waiter>,
    strangers_waiting: usize,
    /// Attempts waiting or holding a place, per source (no entry at zero).
    in_flight: HashMap<Source, u32>,
    known: KnownSources,
    next_arrival: u64,
    shed_log: Throttle,
}

/// The argon2 places and the line for them, shared by the authenticators a reload builds.
#[derive(Debug)]
pub struct VerifyQueue {
    state: Mutex<State>,
}

/// A login turned away because the line is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed;

/// One place for an argon2 check, given back when dropped.
#[derive(Debug)]
pub struct Place {
    queue: Arc<VerifyQueue>,
    source: Source,
}

impl VerifyQueue {
    pub fn new(places: usize) -> Arc<Self> {
        Self::with_known_capacity(places, KNOWN_SOURCES)
    }

    pub fn with_known_capacity(places: usize, known_sources: usize) -> Arc<Self> {
        Arc::new(VerifyQueue {
            state: Mutex::new(State {
                free: places.max(1),
                waiting: BTreeMap::new(),
                strangers_waiting: 0,
                in_flight: HashMap::new(),
                known: KnownSources::new(known_sources),
                next_arrival: 0,
                shed_log: Throttle::new(SHED_LOG_INTERVAL),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for a check of a login from `client`: at once if one is free, else after the
    /// logins ranked before it, or [`Shed`] if the line has no room for it. Dropping the
    /// future leaves the line (a client that hung up or timed out).
    pub async fn acquire(self: &Arc<Self>, client: IpAddr) -> Result<Place, Shed> {
        let source = Source::of(client);
        let (rank, verdict) = {
            let mut state = self.lock();
            let ahead_from_source = state.in_flight.get(&source).copied().unwrap_or(0);
            if state.free > 0 {
                state.free -= 1;
                state.join(source);
                return Ok(Place { queue: self.clone(), source });
            }
            let rank = Rank {
                stranger: !state.known.contains(source),
                ahead_from_source,
                arrival: state.next_arrival,
            };
            state.next_arrival += 1;
            if !state.make_room_for(rank) {
                return Err(Shed);
            }
            let (sender, verdict) = oneshot::channel();
            state.waiting.insert(rank, Waiter { source, verdict: sender });
            if rank.stranger {
                state.strangers_waiting += 1;
            }
            state.join(source);
            (rank, verdict)
        };
        let mut waiting = Waiting { queue: self.clone(), rank, source, verdict, finished: false };
        waiting.outcome().await
    }

    /// `client` logged in: its source goes first from now on.
    pub fn remember(&self, client: IpAddr) {
        self.lock().known.remember(Source::of(client));
    }

    /// Records a shed login; `Some(held_back)` when it should be logged (see [`Throttle`]).
    pub fn shed_report(&self) -> Option<u64> {
        self.lock().shed_log.allow(tokio::time::Instant::now())
    }

    /// Logins waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

impl State {
    fn join(&mut self, source: Source) {
        *self.in_flight.entry(source).or_default() += 1;
    }

    fn leave(&mut self, source: Source) {
        if let Some(count) = self.in_flight.get_mut(&source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_flight.remove(&source);
            }
        }
    }

    fn take_waiting(&mut self, rank: Rank) -> Option<Waiter> {
        let waiter = self.waiting.remove(&rank)?;
        if rank.stranger {
            self.strangers_waiting -= 1;
        }
        Some(waiter)
    }

    /// Whether a login ranked `rank` may wait, shedding the last of its class to make room
    /// if it ranks before that one.
    fn make_room_for(&mut self, rank: Rank) -> bool {
        let (count, bound) = if rank.stranger {
            (self.strangers_waiting, MAX_WAITING_STRANGERS)
        } else {
            (self.waiting.len() - self.strangers_waiting, MAX_WAITING_KNOWN)
        };
        if count < bound {
            return true;
        }
        let last = if rank.stranger {
            self.waiting.keys().next_back()
        } else {
            self.waiting.range(..Rank::FIRST_STRANGER).next_back().map(|(rank, _)| rank)
        };
        // Arrival order alone never displaces anyone: only fewer attempts of one's own source.
        match last.copied() {
            Some(last) if rank.ahead_from_source < last.ahead_from_source => {
                if let Some(waiter) = self.take_waiting(last) {
                    // Its receiver lives until its `Waiting` has taken this lock to leave.
                    let _ = waiter.verdict.send(Verdict::Shed);
                    self.leave(waiter.source);
                }
                true
            }
            _ => false,
        }
    }

    /// A place was given back by `source`: to the first in line, else it is free.
    fn release(&mut self, source: Source) {
        self.leave(source);
        while let Some((rank, waiter)) = self.waiting.pop_first() {
            if rank.stranger {
                self.strangers_waiting -= 1;
            }
            if waiter.verdict.send(Verdict::Granted).is_ok() {
                return;
            }
            // Not reached (a waiter leaves the line before its receiver goes), but harmless.
            self.leave(waiter.source);
        }
        self.free += 1;
    }
}

/// A login in the line. Dropped before its verdict, it leaves the line; dropped after a place
/// was granted to it but before taking it, it gives the place on.
struct Waiting {
    queue: Arc<VerifyQueue>,
    rank: Rank,
    source: Source,
    verdict: oneshot::Receiver<Verdict>,
    finished: bool,
}

impl Waiting {
    async fn outcome(&mut self) -> Result<Place, Shed> {
        let verdict = (&mut self.verdict).await;
        self.finished = true;
        match verdict {
            Ok(Verdict::Granted) => Ok(Place { queue: self.queue.clone(), source: self.source }),
            Ok(Verdict::Shed) | Err(_) => Err(Shed),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.queue.lock();
        if state.take_waiting(self.rank).is_some() {
            state.leave(self.source);
        } else if let Ok(Verdict::Granted) = self.verdict.try_recv() {
            // Verdicts are sent under the lock held here, so one given is already readable.
            state.release(self.source);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queue.lock().release(self.source);
    }
}

/// Sources that logged in successfully, the least recently successful forgotten first.
#[derive(Debug)]
struct KnownSources {
    capacity: usize,
    /// The stamp of each source's latest success.
    latest: HashMap<Source, u64>,
    /// Successes in order; a place whose stamp is no longer its source's latest is stale.
    order: VecDeque<(Source, u64)>,
    next_stamp: u64,
}

impl KnownSources {
    fn new(capacity: usize) -> Self {
        KnownSources {
            capacity: capacity.max(1),
            latest: HashMap::new(),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    fn contains(&self, source: Source) -> bool {
        self.latest.contains_key(&source)
    }

    fn remember(&mut self, source: Source) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.latest.insert(source, stamp);
        self.order.push_back((source, stamp));
        while self.latest.len() > self.capacity {
            let Some((oldest, stamp)) = self.order.pop_front() else { break };
            if self.latest.get(&oldest) == Some(&stamp) {
                self.latest.remove(&oldest);
            }
        }
        // Stale places of sources that succeeded again are dropped in one pass once they could
        // outnumber the live ones: O(1) amortised, and `order` stays within twice the capacity.
        if self.order.len() >= 2 * self.capacity {
            let latest = &self.latest;
            self.order.retain(|(source, stamp)| latest.get(source) == Some(stamp));
        }
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.latest.len(), self.order.len())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::Ipv4Addr;
    use std::pin::Pin;
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;

    /// The tests poll by hand and look at the result, so nothing needs waking.
    struct NoWake;

    impl Wake for NoWake {
        fn wake(self: Arc<Self>) {}
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    type Pending = Pin<Box<dyn Future<Output = Result<Place, Shed>> + Send>>;

    /// Starts an acquire and polls it once, so it has joined the line (or been answered).
    fn start(queue: &Arc<VerifyQueue>, client: IpAddr) -> Pending {
        let queue = queue.clone();
        let mut pending: Pending = Box::pin(async move { queue.acquire(client).await });
        let waker = Waker::from(Arc::new(NoWake));
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(result) = pending.as_mut().poll(&mut cx) {
            return Box::pin(async move { result });
        }
        pending
    }

    fn poll(pending: &mut Pending) -> Option<Result<Place, Shed>> {
        let waker = Waker::from(Arc::new(NoWake));
        let mut cx = Context::from_waker(&waker);
        match pending.as_mut().poll(&mut cx) {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_known_source_is_served_before_strangers_that_came_earlier() {
        let queue = VerifyQueue::new(1);
        queue.remember(ip(1));
        let running = poll(&mut start(&queue, ip(100))).expect("free place").expect("place");
        let mut strangers: Vec<Pending> = (0..10).map(|i| start(&queue, ip(200 + i))).collect();
        let mut known = start(&queue, ip(1));
        assert_eq!(queue.waiting(), 11);
        drop(running);
        let place = poll(&mut known).expect("the known source is next").expect("place");
        assert!(strangers.iter_mut().all(|s| poll(s).is_none()), "no stranger got a place");
        drop(place);
        assert!(poll(&mut strangers[0]).expect("then the first stranger").is_ok());
    }

    #[test]
    fn among_strangers_fewer_attempts_from_the_source_go_first() {
        let queue = VerifyQueue::new(1);
        let running = poll(&mut start(&queue, ip(1))).expect("free place").expect("place");
        // Source 1 already has one attempt being checked: its second ranks behind source 2's first.
        let mut second_of_one = start(&queue, ip(1));
        let mut first_of_two = start(&queue, ip(2));
        drop(running);
        assert!(poll(&mut second_of_one).is_none());
        assert!(poll(&mut first_of_two).expect("source 2 first").is_ok());
    }

    #[test]
    fn a_full_line_sheds_newcomers_or_its_last_if_the_newcomer_ranks_before_it() {
        let queue = VerifyQueue::new(1);
        let _running = poll(&mut start(&queue, ip(0))).expect("free place").expect("place");
        // Source 0 has one attempt running: its waiting ones rank behind other sources' first.
        let mut line: Vec<Pending> =
            (0..MAX_WAITING_STRANGERS).map(|_| start(&queue, ip(0))).collect();
        assert_eq!(queue.waiting(), MAX_WAITING_STRANGERS);
        // A first attempt from a new source displaces the last of source 0's.
        let _newcomer = start(&queue, ip(1));
        assert_eq!(queue.waiting(), MAX_WAITING_STRANGERS);
        let last = line.last_mut().expect("last");
        assert_eq!(poll(last).expect("shed").err(), Some(Shed));
        // Another attempt from source 0 ranks behind everyone: shed at once.
        assert_eq!(poll(&mut start(&queue, ip(0))).expect("answered").err(), Some(Shed));
        // A known source still has room.
        queue.remember(ip(9));
        let mut known = start(&queue, ip(9));
        assert!(poll(&mut known).is_none(), "the known source waits");
        assert_eq!(queue.waiting(), MAX_WAITING_STRANGERS + 1);
    }

    #[test]
    fn leaving_the_line_or_an_untaken_place_gives_everything_back() {
        let queue = VerifyQueue::new(1);
        let running = poll(&mut start(&queue, ip(1))).expect("free place").expect("place");
        let gone = start(&queue, ip(2));
        let granted_but_dropped = start(&queue, ip(3));
        let mut last = start(&queue, ip(4));
        drop(gone);
        assert_eq!(queue.waiting(), 2);
        drop(running);
        // ip(3) was granted the place; dropped before taking it, the place goes on.
        drop(granted_but_dropped);
        let place = poll(&mut last).expect("the place came on").expect("place");
        drop(place);
        let state = queue.lock();
        assert_eq!((state.free, state.waiting.len(), state.in_flight.len()), (1, 0, 0));
    }

    #[test]
    fn known_sources_are_bounded_and_the_least_recent_is_forgotten() {
        let mut known = KnownSources::new(100);
        for round in 0..50 {
            for n in 0..100 {
                // Source 0 succeeds again and again; the others once per round.
                known.remember(Source::of(ip(0)));
                known.remember(Source::of(ip(1 + (round * 100 + n) % 1000)));
            }
            let (live, places) = known.len();
            assert!(live <= 100 && places < 200, "{live} sources, {places} places");
        }
        assert!(known.contains(Source::of(ip(0))));
        assert!(!known.contains(Source::of(ip(1))), "the least recent was forgotten");
        // An IPv6 /64 is one source.
        known.remember(Source::of("2001:db8::1".parse().expect("ip")));
        assert!(known.contains(Source::of("2001:db8::ffff:2".parse().expect("ip"))));
    }
}
