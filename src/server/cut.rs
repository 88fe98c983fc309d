//! The shutdown cut: ends the sessions still running when the drain's grace period is over.
//!
//! Why not a `CancellationToken` shared by every session, as before: each poll of its
//! `cancelled()` locks the token's mutex, and each wait joins and then leaves one `Notify` list
//! that all sessions share, so the workers contended for those locks several times per session
//! (perf on 16 clients: `sched_yield` from parking_lot's spin, mutex and list code in the top
//! user-space symbols; without it the proxy used 7% less user CPU per session). Here a session
//! registers its task's waker once, on its first wait, and every later poll is one atomic load.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The server's side: fires once, for every session at once.
#[derive(Clone, Default)]
pub struct Cut {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    fired: AtomicBool,
    waiting: Mutex<Waiting>,
}

/// The wakers of the sessions waiting on something, by registration number.
#[derive(Default)]
struct Waiting {
    next: u64,
    wakers: HashMap<u64, Waker>,
}

impl Shared {
    /// Nothing panics while holding this lock, so a poisoned one is still consistent.
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Cut {
    pub fn new() -> Self {
        Cut::default()
    }

    /// Ends every session: each one's next poll (or the one this wakes) sees the cut.
    pub fn fire(&self) {
        // Set before the wakers are taken: a session registering meanwhile sees it under the lock.
        self.inner.fired.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut self.inner.waiting().wakers);
        for waker in wakers.into_values() {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }

    /// A watch for one session, to be polled from that session's task.
    pub fn session(&self) -> SessionCut {
        SessionCut { shared: Arc::clone(&self.inner), registered: None }
    }
}

/// One session's view of the cut. Polled from one task: it keeps that task's waker
/// registered from its first wait to its drop.
pub struct SessionCut {
    shared: Arc<Shared>,
    registered: Option<(u64, Waker)>,
}

impl SessionCut {
    /// Completes once the server cuts its sessions.
    pub async fn cut(&mut self) {
        poll_fn(|cx| self.poll_cut(cx)).await
    }

    /// Ready once cut; otherwise the task of `cx` is woken when it happens.
    pub fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if let Some((_, waker)) = &self.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        let mut waiting = self.shared.waiting();
        if self.shared.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        let key = match &self.registered {
            Some((key, _)) => *key,
            None => {
                waiting.next += 1;
                waiting.next
            }
        };
        waiting.wakers.insert(key, cx.waker().clone());
        drop(waiting);
        self.registered = Some((key, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for SessionCut {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            self.shared.waiting().wakers.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_the_cut_and_a_new_one_sees_it_at_once() {
        let cut = Cut::new();
        let mut session = cut.session();
        let (first_poll, polled) = tokio::sync::oneshot::channel();
        let waiting = tokio::spawn(async move {
            let mut first_poll = Some(first_poll);
            poll_fn(|cx| {
                let cut = session.poll_cut(cx);
                if let Some(tell) = first_poll.take() {
                    let _ = tell.send(());
                }
                cut
            })
            .await;
            session
        });
        polled.await.expect("first poll");
        assert_eq!(cut.inner.waiting().wakers.len(), 1, "registered on its first wait");
        cut.fire();
        let session = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the cut woke the session")
            .expect("session task");
        drop(session);
        assert!(cut.inner.waiting().wakers.is_empty());
        let mut late = cut.session();
        late.cut().await;
        assert!(cut.is_fired());
    }

    #[test]
    fn a_session_registers_once_and_leaves_no_waker_behind() {
        let cut = Cut::new();
        let mut session = cut.session();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        {
            let mut waiting = pin!(session.cut());
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
        }
        assert!(session.poll_cut(&mut cx).is_pending());
        assert_eq!(cut.inner.waiting().wakers.len(), 1);
        drop(session);
        assert!(cut.inner.waiting().wakers.is_empty());
    }
}
