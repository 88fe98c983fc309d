//! The pool's side of `upstream::Lease`: tells the PoolManager when a session ends.

use std::time::Duration;

use ractor::ActorRef;
use tokio::net::TcpStream;

use super::messages::ManagerMsg;
use crate::upstream::Lease;

/// One outstanding session of a PoolManager. Ending it, by `finish` or by being dropped (a
/// handler that panicked, a checkout reply nobody received), decrements the manager's in-use
/// count exactly once.
pub struct PoolLease {
    manager: Option<ActorRef<ManagerMsg>>,
}

impl PoolLease {
    pub(crate) fn new(manager: ActorRef<ManagerMsg>) -> Self {
        PoolLease { manager: Some(manager) }
    }

    /// Reports the outcome of the caller's own dial after a `Miss`, and how long it took.
    pub fn report_dial(&self, ok: bool, took: Duration) {
        if let Some(manager) = &self.manager {
            let _ = manager.cast(ManagerMsg::MissDialed { ok, took });
        }
    }

    fn end(&mut self, untouched: Option<TcpStream>) {
        if let Some(manager) = self.manager.take() {
            // If the manager is gone (restarted), the message comes back and the stream in it is
            // closed; the replacement manager never counted this lease.
            let _ = manager.cast(ManagerMsg::Release { untouched });
        }
    }
}

impl Lease for PoolLease {
    fn finish(mut self: Box<Self>, untouched: Option<TcpStream>) {
        self.end(untouched);
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        self.end(None);
    }
}
