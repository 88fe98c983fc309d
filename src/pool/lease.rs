//! The pool's side of `upstream::Lease`: tells the PoolManager when a session ends.

use ractor::ActorRef;
use tokio::time::Instant;

use super::messages::{LeaseOutcome, ManagerMsg, OutsideDial, Returned};
use crate::upstream::{Lease, LeaseEnd};

/// One outstanding session of a PoolManager. Ending it, by `finish`, `stale` or by being
/// dropped (a handler that panicked, a checkout reply nobody received), decrements the
/// manager's in-use count exactly once.
pub struct PoolLease {
    manager: Option<ActorRef<ManagerMsg>>,
    /// A spare was handed out (a hit once the client is served), rather than a miss.
    hit: bool,
    /// When the connection was dialed: a hit's spare, or a miss's own dial once it succeeded.
    born: Option<Instant>,
    /// When the checkout was answered: a session's duration counts from here.
    checked_out: Instant,
}

impl PoolLease {
    pub(crate) fn new(manager: ActorRef<ManagerMsg>, hit: bool, born: Option<Instant>) -> Self {
        PoolLease { manager: Some(manager), hit, born, checked_out: Instant::now() }
    }

    /// Whether a spare came with this lease.
    pub fn is_hit(&self) -> bool {
        self.hit
    }

    /// Reports the outcome of the caller's own dial after a `Miss`, and how long it took.
    pub fn report_dial(&mut self, dial: OutsideDial) {
        if dial.ok {
            self.born = Some(Instant::now());
        }
        if let Some(manager) = &self.manager {
            let _ = manager.cast(ManagerMsg::MissDialed(dial));
        }
    }

    /// The spare that came with this lease turned out unusable before the client's reply; the
    /// caller closed it and looks elsewhere. Counted apart from hits.
    pub fn stale(mut self) {
        self.end(None, LeaseOutcome::Stale);
    }

    fn end(&mut self, untouched: Option<tokio::net::TcpStream>, outcome: LeaseOutcome) {
        if let Some(manager) = self.manager.take() {
            let returned = match (untouched, self.born) {
                (Some(stream), Some(born)) => Some(Returned { stream, born }),
                _ => None,
            };
            // If the manager is gone (restarted), the message comes back and the stream in it is
            // closed; the replacement manager never counted this lease.
            let held = self.checked_out.elapsed();
            let _ = manager.cast(ManagerMsg::Release { returned, hit: self.hit, outcome, held });
        }
    }
}

impl Lease for PoolLease {
    fn finish(mut self: Box<Self>, end: LeaseEnd) {
        let outcome = if end.served { LeaseOutcome::Served } else { LeaseOutcome::NotServed };
        self.end(end.untouched, outcome);
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        self.end(None, LeaseOutcome::NotServed);
    }
}
