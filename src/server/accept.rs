//! The accept loop: admission against `max_connections`, and back-off on accept errors.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use super::cut::Cut;
use super::handler::{self, HandlerContext};
use super::limit::ConnectionLimit;
use crate::throttle::Throttle;

const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "max_connections reached" line per this long: at the limit, every client that
/// arrives while a slot is taken is a rejection, and churn around the limit would otherwise
/// log two lines per client.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counts runs of failures so they are logged at a start and an end, never once per failure
/// (a flood of EMFILE must not become a flood of log lines). Under exhaustion every freed
/// descriptor admits one client and a new run starts, so a start is logged at most once per
/// [`BURST_LOG_INTERVAL`] and the end only of a run whose start was logged; the line carries
/// the runs not logged.
#[derive(Debug)]
struct Burst {
    count: u64,
    logged: bool,
    starts: Throttle,
}

const BURST_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Burst {
    fn new() -> Self {
        Burst { count: 0, logged: false, starts: Throttle::new(BURST_LOG_INTERVAL) }
    }

    /// Records a failure; for the first of a run that is to be logged, the runs not logged
    /// since the last one that was.
    fn fail(&mut self, now: tokio::time::Instant) -> Option<u64> {
        self.count += 1;
        if self.count > 1 {
            return None;
        }
        let report = self.starts.allow(now);
        self.logged = report.is_some();
        report
    }

    /// Ends the run; how many failures it had, if it had any and its start was logged.
    fn end(&mut self) -> Option<u64> {
        let failures = std::mem::take(&mut self.count);
        let logged = std::mem::take(&mut self.logged);
        (failures > 0 && logged).then_some(failures)
    }
}

/// Errors about one connection that was already gone; the next accept may succeed at once.
pub(super) fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Most connections taken from the kernel's queue when the listener stops (its backlog is 1024):
/// bounds the drain even if clients keep arriving faster than it runs.
const BACKLOG_DRAIN_MAX: usize = 4096;

/// What admitting one accepted connection needs: the limit, the handler's context, the task set.
struct Admission<'a> {
    limit: Arc<ConnectionLimit>,
    /// Swapped by a reload; each client takes the one in force when it is accepted.
    contexts: Arc<ArcSwap<HandlerContext>>,
    tracker: &'a TaskTracker,
    cut: &'a Cut,
    rejections: Throttle,
    /// Whether accepted sockets already have `TCP_NODELAY` (see [`nodelay_inherited`]).
    nodelay_inherited: bool,
}

impl Admission<'_> {
    /// Serves `client` in a task holding a permit of `limit`, or closes it at once when
    /// `max_connections` are being served.
    fn admit(&mut self, client: TcpStream, peer: SocketAddr) {
        let ctx = self.contexts.load_full();
        let Some(permit) = self.limit.try_acquire() else {
            ctx.metrics.rejected_over_limit();
            if let Some(held_back) = self.rejections.allow(tokio::time::Instant::now()) {
                warn!(
                    // This client and those held back since the last line.
                    rejected = held_back + 1,
                    "max_connections reached: closing new clients until a slot frees"
                );
            }
            drop(client);
            return;
        };
        // With the PROXY protocol the socket's peer is the balancer (`via`); the handler
        // records the client named by the header as `peer` once it has read it.
        let span = if ctx.proxy_protocol.is_some() {
            info_span!("client", peer = tracing::field::Empty, via = %peer)
        } else {
            info_span!("client", %peer)
        };
        if !self.nodelay_inherited {
            let _ = client.set_nodelay(true);
        }
        let cut = self.cut.session();
        // The session's state machine (about 2 KB) lives in a box of its own: the task that
        // holds it stays small, and tokio copies a task's future whole when spawning it and
        // again when it completes (memmove was the proxy's top user-space symbol).
        self.tracker.spawn(
            async move {
                Box::pin(handler::serve(ctx, client, peer, cut)).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Accepts until `stop` fires. Each admitted client runs in a task on `tracker` holding a
/// permit of `limit`; clients over the limit are accepted and closed at once rather than left
/// waiting in the kernel backlog. When `stop` fires, the connections already waiting in the
/// kernel's accept queue are taken and served too: closing a listener resets them, and a load
/// balancer that saw its connect succeed cannot send that client elsewhere. Each client keeps
/// the context in force when it was accepted to its end (a reload swaps `contexts`).
pub(super) async fn accept_loop(
    listener: &TcpListener,
    limit: Arc<ConnectionLimit>,
    contexts: Arc<ArcSwap<HandlerContext>>,
    tracker: &TaskTracker,
    cut: &Cut,
    stop: &CancellationToken,
) {
    let mut admission = Admission {
        limit,
        contexts,
        tracker,
        cut,
        rejections: Throttle::new(REJECTION_LOG_INTERVAL),
        nodelay_inherited: nodelay_inherited(listener),
    };
    let mut errors = Burst::new();
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((client, peer)) => {
                if let Some(failures) = errors.end() {
                    warn!(failures, "accepting again after a burst of accept errors");
                }
                backoff = ACCEPT_BACKOFF_START;
                admission.admit(client, peer);
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Typically EMFILE/ENFILE: wait for descriptors to free up instead of spinning.
                if let Some(runs_not_logged) = errors.fail(tokio::time::Instant::now()) {
                    warn!(error = %e, runs_not_logged, "accept failed; backing off until it succeeds again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    let drained = drain_backlog(listener, &mut admission);
    if drained > 0 {
        debug!(drained, "served the connections still queued when the listener stopped");
    }
}

/// Sets `TCP_NODELAY` on the listener, which Linux copies to every socket it accepts: one
/// setsockopt(2) at start instead of one per client (a SOCKS session is small writes both ways,
/// none of which may wait for Nagle). False elsewhere, where each client gets its own.
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux") && socket2::SockRef::from(listener).set_nodelay(true).is_ok()
}

/// Accepts, without waiting, what the kernel has queued on `listener` right now. The accept
/// is a plain non-blocking syscall on the socket (not tokio's readiness, which may not have
/// seen the latest arrivals yet). Returns how many were taken.
fn drain_backlog(listener: &TcpListener, admission: &mut Admission<'_>) -> usize {
    let mut taken = 0;
    while taken < BACKLOG_DRAIN_MAX {
        let (socket, addr) = match socket2::SockRef::from(listener).accept() {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => continue,
            // WouldBlock: the queue is empty; anything else: nothing more to take either.
            Err(_) => break,
        };
        let Some(peer) = addr.as_socket() else { continue };
        if socket.set_nonblocking(true).is_err() {
            continue;
        }
        let Ok(client) = TcpStream::from_std(std::net::TcpStream::from(socket)) else { continue };
        taken += 1;
        admission.admit(client, peer);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-session setsockopt(2) is skipped only where the kernel copies the option: a
    /// client accepted here must have it all the same.
    #[tokio::test]
    async fn accepted_clients_have_tcp_nodelay_without_setting_it_each() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let inherited = nodelay_inherited(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        if inherited {
            assert!(accepted.nodelay().expect("getsockopt"), "TCP_NODELAY inherited");
        }
    }

    #[test]
    fn a_burst_is_reported_once_at_each_end_and_short_runs_fold_into_the_next_report() {
        let start = tokio::time::Instant::now();
        let mut burst = Burst::new();
        assert_eq!(burst.end(), None);
        assert_eq!(burst.fail(start), Some(0));
        assert_eq!(burst.fail(start), None);
        assert_eq!(burst.fail(start), None);
        assert_eq!(burst.end(), Some(3));
        assert_eq!(burst.end(), None);
        // 94 runs of one failure each within the interval: no line at either end.
        for _ in 0..94 {
            assert_eq!(burst.fail(start), None);
            assert_eq!(burst.end(), None);
        }
        assert_eq!(burst.fail(start + BURST_LOG_INTERVAL), Some(94));
        assert_eq!(burst.end(), Some(1));
    }
}
