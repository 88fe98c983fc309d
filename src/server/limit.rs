//! `server.max_connections` as a semaphore a reload can resize without cutting anyone.
//!
//! Raised: permits are added at once. Lowered: free permits are forgotten at once, and the rest
//! of the cut is a debt paid by the sessions still running: each permit that comes back while
//! a debt is owed is forgotten instead of returned. So the limit falls as sessions end, never
//! by ending one.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Size {
    max: usize,
    /// Permits still to forget as they come back.
    debt: usize,
}

/// How many clients are served at once.
#[derive(Debug)]
pub struct ConnectionLimit {
    semaphore: Arc<Semaphore>,
    size: Mutex<Size>,
}

/// One admitted client's place; given back (or forgotten, if the limit was lowered) on drop.
#[derive(Debug)]
pub struct ConnectionPermit {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<ConnectionLimit>,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            semaphore: Arc::new(Semaphore::new(max)),
            size: Mutex::new(Size { max, debt: 0 }),
        })
    }

    fn size(&self) -> MutexGuard<'_, Size> {
        // Every critical section is a few integer updates; a poisoned lock is still consistent.
        self.size.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place if one is free now (admission never waits: a client over the limit is closed).
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let permit = Arc::clone(&self.semaphore).try_acquire_owned().ok()?;
        Some(ConnectionPermit { permit: Some(permit), limit: Arc::clone(self) })
    }

    /// The limit in force.
    pub fn max(&self) -> usize {
        self.size().max
    }

    /// Places free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Permits still to be forgotten as sessions end (after a lowered limit).
    pub fn debt(&self) -> usize {
        self.size().debt
    }

    /// Sets a new limit; sessions in flight keep their places.
    pub fn resize(&self, max: usize) {
        let mut size = self.size();
        if max >= size.max {
            let mut more = max - size.max;
            let forgiven = more.min(size.debt);
            size.debt -= forgiven;
            more -= forgiven;
            self.semaphore.add_permits(more);
        } else {
            let cut = size.max - max;
            let forgotten = self.semaphore.forget_permits(cut);
            size.debt += cut - forgotten;
        }
        size.max = max;
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        let mut size = self.limit.size();
        if size.debt > 0 {
            size.debt -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_waits_for_sessions_to_end_and_raising_forgives_first() {
        let limit = ConnectionLimit::new(3);
        let held: Vec<_> = (0..3).map(|_| limit.try_acquire().expect("place")).collect();
        assert!(limit.try_acquire().is_none());
        limit.resize(1);
        assert_eq!((limit.max(), limit.debt()), (1, 2));
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        assert_eq!((limit.available(), limit.debt()), (0, 0), "two places forgotten");
        drop(held.next());
        assert_eq!(limit.available(), 1);
        let one = limit.try_acquire().expect("the one place");
        assert!(limit.try_acquire().is_none());
        // Lowered with the place taken, then raised before it came back: the debt is forgiven.
        limit.resize(0);
        assert_eq!(limit.debt(), 1);
        limit.resize(2);
        assert_eq!((limit.debt(), limit.available()), (0, 1));
        drop(one);
        assert_eq!(limit.available(), 2);
    }
}
