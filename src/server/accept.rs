//! The accept loop: admission against `max_connections`, and back-off on accept errors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, warn, Instrument};

use super::handler::{self, HandlerContext};

const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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
/// waiting in the kernel backlog.
pub(super) async fn accept_loop(
    listener: &TcpListener,
    limit: Arc<Semaphore>,
    ctx: Arc<HandlerContext>,
    tracker: &TaskTracker,
    cut: &CancellationToken,
    stop: &CancellationToken,
) {
    let mut errors = Burst::default();
    let mut rejections = Burst::default();
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
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    ctx.metrics.rejected_over_limit();
                    if rejections.fail() {
                        warn!(%peer, "max_connections reached: closing new clients until a slot frees");
                    }
                    drop(client);
                    continue;
                };
                if let Some(rejected) = rejections.end() {
                    warn!(rejected, "below max_connections again");
                }
                // With the PROXY protocol the socket's peer is the balancer (`via`); the handler
                // records the client named by the header as `peer` once it has read it.
                let span = if ctx.proxy_protocol.is_some() {
                    info_span!("client", peer = tracing::field::Empty, via = %peer)
                } else {
                    info_span!("client", %peer)
                };
                let ctx = ctx.clone();
                let cut = cut.clone();
                tracker.spawn(
                    async move {
                        handler::serve(ctx, client, peer, cut).await;
                        drop(permit);
                    }
                    .instrument(span),
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
