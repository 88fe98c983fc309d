//! The accept loop: admission against `max_connections`, and back-off on accept errors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use super::handler::{self, HandlerContext};
use super::limit::ConnectionLimit;
use crate::throttle::Throttle;

const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "max_connections reached" line per this long: at the limit, every client that
/// arrives while a slot is taken is a rejection, and churn around the limit would otherwise
/// log two lines per client.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts a run of failures so a burst is logged once at its start and once at its end,
/// never once per failure (a flood of EMFILE must not become a flood of log lines).
#[derive(Debug, Default)]
struct Burst {
    count: u64,
}

impl Burst {
    /// Records a failure; true for the first of a burst.
    fn fail(&mut self) -> bool {
        self.count += 1;
        self.count == 1
    }

    /// Ends the burst; returns how many failures it had, if any.
    fn end(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.count);
        (failures > 0).then_some(failures)
    }
}

/// Errors about one connection that was already gone; the next accept may succeed at once.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Accepts until `stop` fires. Each admitted client runs in a task on `tracker` holding a
/// permit of `limit`; clients over the limit are accepted and closed at once rather than left
/// waiting in the kernel backlog. Each client takes the context in force when it is accepted
/// and keeps it to its end (a reload swaps `contexts` for the next clients).
pub(super) async fn accept_loop(
    listener: &TcpListener,
    limit: Arc<ConnectionLimit>,
    contexts: Arc<ArcSwap<HandlerContext>>,
    tracker: &TaskTracker,
    cut: &CancellationToken,
    stop: &CancellationToken,
) {
    let mut errors = Burst::default();
    let mut rejections = Throttle::new(REJECTION_LOG_INTERVAL);
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                if let Some(failures) = errors.end() {
                    warn!(failures, "accepting again after a burst of accept errors");
                }
                backoff = ACCEPT_BACKOFF_START;
                let ctx = contexts.load_full();
                let Some(permit) = limit.try_acquire() else {
                    ctx.metrics.rejected_over_limit();
                    if let Some(held_back) = rejections.allow(tokio::time::Instant::now()) {
                        warn!(
                            rejected_since_last_report = held_back,
                            "max_connections reached: closing new clients until a slot frees"
                        );
                    }
                    drop(client);
                    continue;
                };
                let cut = cut.clone();
                tracker.spawn(
                    async move {
                        handler::serve(ctx, client, peer, cut).await;
                        drop(permit);
                    }
                    .instrument(info_span!("client", %peer)),
                );
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Typically EMFILE/ENFILE: wait for descriptors to free up instead of spinning.
                if errors.fail() {
                    warn!(error = %e, "accept failed; backing off until it succeeds again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_reported_once_at_each_end() {
        let mut burst = Burst::default();
        assert_eq!(burst.end(), None);
        assert!(burst.fail());
        assert!(!burst.fail());
        assert!(!burst.fail());
        assert_eq!(burst.end(), Some(3));
        assert_eq!(burst.end(), None);
        assert!(burst.fail());
    }
}
