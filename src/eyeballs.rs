//! Happy Eyeballs (RFC 8305) for a name with several addresses, as curl, browsers, Go's
//! dialer and hyper-util dial: an address that silently drops connection attempts costs
//! [`ATTEMPT_DELAY`], not a whole connect timeout.
//!
//! The addresses alternate by family, the resolver's preferred one first ([`interleave`]).
//! The first attempt starts; each next one starts when the last has gone [`ATTEMPT_DELAY`]
//! without connecting, or at once when an attempt fails, and the earlier ones keep running.
//! The first to connect wins and the others are dropped (their sockets closed, so a
//! half-open attempt ends there). At most [`MAX_IN_FLIGHT`] attempts run at once: each is a
//! socket, and the one beside the session's own is taken from the descriptor budget (see
//! `descriptors`); when none is free the attempts go one after another, as each ends.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Timeout};

use crate::descriptors::{DescriptorBudget, Descriptors};
use crate::upstream::ConnectError;

/// How long an attempt may go unanswered before the next address is tried beside it (RFC
/// 8305's recommended Connection Attempt Delay).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Attempts in flight at once for one dial.
pub const MAX_IN_FLIGHT: usize = 2;

/// `addresses` with the families alternating, starting with the first address's family;
/// each family keeps its order (RFC 8305 section 4, a First Address Family Count of 1).
pub fn interleave(addresses: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addresses.first() else { return Vec::new() };
    let v6 = |addr: &&SocketAddr| addr.ip().to_canonical().is_ipv6();
    let preferred_v6 = v6(&first);
    let mut preferred = addresses.iter().filter(|addr| v6(addr) == preferred_v6);
    let mut other = addresses.iter().filter(|addr| v6(addr) != preferred_v6);
    let mut ordered = Vec::with_capacity(addresses.len());
    loop {
        match (preferred.next(), other.next()) {
            (None, None) => return ordered,
            (a, b) => ordered.extend(a.into_iter().chain(b)),
        }
    }
}

struct Attempt<F> {
    addr: SocketAddr,
    connecting: Pin<Box<Timeout<F>>>,
}

/// Races `connect` over `addresses` in their order, as described above, each attempt bounded
/// by `per_address`; the caller bounds the whole. `Err` carries the last failure (`None` only
/// when `addresses` is empty).
pub async fn race<T, F>(
    addresses: &[SocketAddr],
    per_address: Duration,
    descriptors: &DescriptorBudget,
    mut connect: impl FnMut(SocketAddr) -> F,
) -> Result<T, Option<ConnectError>>
where
    F: Future<Output = io::Result<T>>,
{
    let mut pending = addresses.iter().copied().peekable();
    let mut attempts: Vec<Attempt<F>> = Vec::with_capacity(MAX_IN_FLIGHT);
    // The descriptor of the second attempt in flight, held while there are two.
    let mut extra: Option<Descriptors> = None;
    let mut last_error = None;
    let delay = tokio::time::sleep(ATTEMPT_DELAY);
    tokio::pin!(delay);
    let mut start_next = true;
    // No descriptor was free for a second attempt: the next waits for this one to end.
    let mut starved = false;
    loop {
        if std::mem::take(&mut start_next) {
            if let Some(&addr) = pending.peek() {
                if !attempts.is_empty() && extra.is_none() {
                    extra = descriptors.try_take(1);
                }
                if attempts.is_empty() || extra.is_some() {
                    pending.next();
                    let connecting = Box::pin(tokio::time::timeout(per_address, connect(addr)));
                    attempts.push(Attempt { addr, connecting });
                    delay.as_mut().reset(Instant::now() + ATTEMPT_DELAY);
                    starved = false;
                } else {
                    starved = true;
                }
            }
        }
        if attempts.len() < 2 {
            extra = None;
        }
        if attempts.is_empty() {
            return Err(last_error);
        }
        let may_add = !starved && attempts.len() < MAX_IN_FLIGHT && pending.peek().is_some();
        let ended = std::future::poll_fn(|cx| {
            for (index, attempt) in attempts.iter_mut().enumerate() {
                if let Poll::Ready(outcome) = attempt.connecting.as_mut().poll(cx) {
                    return Poll::Ready(Some((index, outcome)));
                }
            }
            if may_add && delay.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        // The delay passed with no connection, or an attempt ended: either way the next
        // address may start now.
        start_next = true;
        let Some((index, outcome)) = ended else { continue };
        // Dropping the attempt closes its socket.
        let Attempt { addr, .. } = attempts.swap_remove(index);
        last_error = Some(match outcome {
            // The others are dropped on return, which closes them.
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(source)) => ConnectError::Io { addr, source },
            Err(_) => ConnectError::Timeout { addr, timeout: per_address },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    #[test]
    fn families_alternate_from_the_first_ones() {
        let list = |texts: &[&str]| texts.iter().map(|t| addr(t)).collect::<Vec<_>>();
        assert_eq!(
            interleave(&list(&["[::1]:1", "[::2]:1", "[::3]:1", "10.0.0.1:1", "10.0.0.2:1"])),
            list(&["[::1]:1", "10.0.0.1:1", "[::2]:1", "10.0.0.2:1", "[::3]:1"])
        );
        assert_eq!(
            interleave(&list(&["10.0.0.1:1", "[::1]:1", "[::2]:1"])),
            list(&["10.0.0.1:1", "[::1]:1", "[::2]:1"])
        );
        assert_eq!(
            interleave(&list(&["10.0.0.1:1", "10.0.0.2:1"])),
            list(&["10.0.0.1:1", "10.0.0.2:1"])
        );
        assert!(interleave(&[]).is_empty());
    }

    /// What a fake address does when dialed.
    #[derive(Clone, Copy)]
    enum Peer {
        /// Connects after this long.
        Answers(Duration),
        /// Refuses after this long.
        Refuses(Duration),
        /// Drops the SYNs: never answers.
        Silent,
    }

    /// Attempts as they happened: address, start, and end (`None` while running).
    type Log = Arc<Mutex<Vec<(SocketAddr, Duration, Option<Duration>)>>>;

    /// Marks its attempt ended when dropped: a dropped attempt is a closed socket.
    struct Ends(Log, usize, Instant);

    impl Drop for Ends {
        fn drop(&mut self) {
            let mut log = self.0.lock().expect("log");
            log[self.1].2.get_or_insert(self.2.elapsed());
        }
    }

    /// Runs a race over `peers` (in order) with `budget` spare descriptors; returns the
    /// winner (or the error), how long it took, and the log.
    async fn run(
        peers: &[(&str, Peer)],
        per_address: Duration,
        budget: usize,
    ) -> (Result<SocketAddr, Option<ConnectError>>, Duration, Log) {
        let table: HashMap<SocketAddr, Peer> = peers.iter().map(|(a, p)| (addr(a), *p)).collect();
        let order: Vec<SocketAddr> = peers.iter().map(|(a, _)| addr(a)).collect();
        let log: Log = Arc::default();
        let descriptors = DescriptorBudget::new("a test", budget);
        let started = Instant::now();
        let connect = |target: SocketAddr| {
            let peer = table[&target];
            let index = {
                let mut log = log.lock().expect("log");
                log.push((target, started.elapsed(), None));
                log.len() - 1
            };
            let ends = Ends(log.clone(), index, started);
            async move {
                let _ends = ends;
                match peer {
                    Peer::Answers(after) => {
                        tokio::time::sleep(after).await;
                        Ok(target)
                    }
                    Peer::Refuses(after) => {
                        tokio::time::sleep(after).await;
                        Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                    }
                    Peer::Silent => std::future::pending().await,
                }
            }
        };
        let outcome = race(&order, per_address, &descriptors, connect).await;
        assert_eq!(descriptors.available(), budget, "the spare descriptor is given back");
        (outcome, started.elapsed(), log)
    }

    const LONG: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_silent_first_address_costs_the_attempt_delay_and_is_closed() {
        let (won, took, log) =
            run(&[("10.0.0.1:80", Peer::Silent), ("10.0.0.2:80", Peer::Answers(5 * MS))], LONG, 1)
                .await;
        assert_eq!(won.ok(), Some(addr("10.0.0.2:80")));
        assert_eq!(took, ATTEMPT_DELAY + 5 * MS);
        let log = log.lock().expect("log").clone();
        assert_eq!(log[1].1, ATTEMPT_DELAY, "the second started after the delay");
        assert_eq!(log[0].2, Some(took), "the silent attempt was dropped when the other won");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_starts_the_next_at_once_and_an_early_one_keeps_running() {
        // The first refuses at 50 ms: the second starts then, not at 250 ms.
        let (won, took, _) = run(
            &[("10.0.0.1:80", Peer::Refuses(50 * MS)), ("10.0.0.2:80", Peer::Answers(10 * MS))],
            LONG,
            1,
        )
        .await;
        assert_eq!((won.ok(), took), (Some(addr("10.0.0.2:80")), 60 * MS));
        // A slow first address still wins when it connects before the second.
        let (won, took, log) = run(
            &[("10.0.0.1:80", Peer::Answers(300 * MS)), ("10.0.0.2:80", Peer::Silent)],
            LONG,
            1,
        )
        .await;
        assert_eq!((won.ok(), took), (Some(addr("10.0.0.1:80")), 300 * MS));
        assert_eq!(log.lock().expect("log")[1].2, Some(300 * MS), "the loser is closed");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_two_run_at_once_and_each_keeps_its_own_timeout() {
        let per_address = Duration::from_secs(2);
        let (won, took, log) = run(
            &[
                ("10.0.0.1:80", Peer::Silent),
                ("10.0.0.2:80", Peer::Silent),
                ("10.0.0.3:80", Peer::Answers(MS)),
            ],
            per_address,
            1,
        )
        .await;
        // The third waits for a place: the first's timeout at 2 s.
        assert_eq!(won.ok(), Some(addr("10.0.0.3:80")));
        assert_eq!(took, per_address + MS);
        let log = log.lock().expect("log").clone();
        let starts: Vec<Duration> = log.iter().map(|entry| entry.1).collect();
        assert_eq!(starts, [Duration::ZERO, ATTEMPT_DELAY, per_address]);
        assert_eq!(log[0].2, Some(per_address));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_spare_descriptor_the_attempts_go_one_after_another() {
        let per_address = Duration::from_secs(2);
        let (won, took, log) = run(
            &[("10.0.0.1:80", Peer::Silent), ("10.0.0.2:80", Peer::Answers(MS))],
            per_address,
            0,
        )
        .await;
        assert_eq!((won.ok(), took), (Some(addr("10.0.0.2:80")), per_address + MS));
        assert_eq!(log.lock().expect("log")[1].1, per_address);
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_fail_the_last_failure_is_reported() {
        let per_address = Duration::from_secs(2);
        let (lost, took, _) = run(
            &[
                ("10.0.0.1:80", Peer::Silent),
                ("[2001:db8::1]:80", Peer::Refuses(MS)),
                ("10.0.0.2:80", Peer::Refuses(400 * MS)),
            ],
            per_address,
            1,
        )
        .await;
        // The refusal at 250 ms + 1 ms starts the third; it refuses at 651 ms; the silent
        // first times out at 2 s, last.
        assert_eq!(took, per_address);
        match lost {
            Err(Some(ConnectError::Timeout { addr: failed, timeout })) => {
                assert_eq!((failed, timeout), (addr("10.0.0.1:80"), per_address))
            }
            other => panic!("expected the first's timeout, got {:?}", other.map(|_| ())),
        }
        let (lost, _, _) = run(&[("10.0.0.1:80", Peer::Refuses(MS))], per_address, 1).await;
        assert!(matches!(lost, Err(Some(ConnectError::Io { .. }))));
        let (none, _, _) = run(&[], per_address, 1).await;
        assert!(matches!(none, Err(None)));
    }
}
