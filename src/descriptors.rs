//! The descriptors a session may hold beyond the two its admission counts on.
//!
//! The open-file limit is sized as two descriptors per session (client and upstream), the
//! spares, a reserve for the listeners and the stats endpoint, and one more per session for
//! what some kinds of session hold on top: a name lookup's sockets, a UDP association's
//! outbound sockets, a BIND's listener. That last share is this budget. Whatever holds more
//! than two takes the difference from it first; when it is empty a lookup waits for its turn
//! and an association or a BIND is refused, so no mix of sessions can take the descriptors
//! that plain CONNECTs and `/health` need below `max_connections`.
//!
//! The share is split in two budgets of their own, so neither kind can starve the other:
//! half for names (a lookup's sockets, which wait, and a CONNECT's second attempt in flight
//! to a name's next address, which is skipped when none is free: see `eyeballs`), half for
//! UDP associations and BINDs (refused when it is spent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::throttle::Throttle;

/// Extra descriptors a name lookup holds while it waits for its answer: the resolver opens a
/// socket per query in flight, and a lookup to a name server that never answers was measured
/// holding six (A and AAAA, each over UDP and TCP, with a retry).
pub const LOOKUP: u32 = 6;
/// Extra descriptors of a UDP association: an outbound socket per address family (the relay
/// socket and the control connection are the two every session has).
pub const UDP_ASSOCIATION: u32 = 2;
/// Extra descriptors of a BIND: its listener, beside the control connection and the peer.
pub const BIND: u32 = 1;

/// How often "the descriptor budget is spent" is logged at most.
const EXHAUSTED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The extra descriptors left for the sessions that need more than two.
#[derive(Debug)]
pub struct DescriptorBudget {
    /// What it is for, in its "spent" log line.
    purpose: &'static str,
    semaphore: Arc<Semaphore>,
    size: usize,
    exhausted: Mutex<Throttle>,
}

/// The two budgets the extra descriptors are split into.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub lookups: Arc<DescriptorBudget>,
    pub sessions: Arc<DescriptorBudget>,
}

impl Budgets {
    /// Splits `extra` descriptors: half for names, the rest for associations and BINDs.
    pub fn split(extra: usize) -> Self {
        let lookups = extra / 2;
        Budgets {
            lookups: DescriptorBudget::new(
                "name lookups (they wait) and second connect attempts (skipped)",
                lookups,
            ),
            sessions: DescriptorBudget::new(
                "UDP associations and BINDs (new ones get 0x01)",
                extra - lookups,
            ),
        }
    }
}

/// Extra descriptors held until dropped.
#[derive(Debug)]
pub struct Descriptors {
    _permit: OwnedSemaphorePermit,
}

impl DescriptorBudget {
    pub fn new(purpose: &'static str, size: usize) -> Arc<Self> {
        let size = size.min(Semaphore::MAX_PERMITS);
        Arc::new(DescriptorBudget {
            purpose,
            semaphore: Arc::new(Semaphore::new(size)),
            size,
            exhausted: Mutex::new(Throttle::new(EXHAUSTED_LOG_INTERVAL)),
        })
    }

    /// A budget that never runs out (harnesses that do not model the limit).
    pub fn unlimited() -> Arc<Self> {
        Self::new("anything (unlimited)", Semaphore::MAX_PERMITS)
    }

    /// `count` descriptors if they are free now.
    pub fn try_take(&self, count: u32) -> Option<Descriptors> {
        match self.semaphore.clone().try_acquire_many_owned(count) {
            Ok(permit) => Some(Descriptors { _permit: permit }),
            Err(_) => {
                self.report_exhausted();
                None
            }
        }
    }

    /// `count` descriptors, waiting for them when none are free.
    pub async fn take(&self, count: u32) -> Descriptors {
        if let Some(taken) = self.try_take(count) {
            return taken;
        }
        match self.semaphore.clone().acquire_many_owned(count).await {
            Ok(permit) => Descriptors { _permit: permit },
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    /// Free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn report_exhausted(&self) {
        let now = tokio::time::Instant::now();
        let report = self.exhausted.lock().unwrap_or_else(|p| p.into_inner()).allow(now);
        if let Some(held_back) = report {
            tracing::warn!(
                budget = self.size,
                not_logged_since_last = held_back,
                "the descriptors kept for {} are all in use",
                self.purpose
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn takes_are_bounded_and_a_waiting_take_gets_what_comes_back() {
        let budget = DescriptorBudget::new("a test", 4);
        let association = budget.try_take(UDP_ASSOCIATION).expect("two of four");
        let lookup = budget.try_take(2).expect("the other two");
        assert!(budget.try_take(1).is_none());
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(3).await }
        });
        drop(association);
        assert_eq!(budget.available(), 2, "the waiting lookup needs three");
        drop(lookup);
        let taken = waiting.await.expect("lookup task");
        assert_eq!(budget.available(), 1);
        drop(taken);
        assert_eq!(budget.available(), 4);
        let budgets = Budgets::split(7);
        assert_eq!((budgets.lookups.size(), budgets.sessions.size()), (3, 4));
    }
}
