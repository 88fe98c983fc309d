//! Relays bytes between a client and its upstream until the session ends.
//!
//! A session ends when both directions have seen EOF (half-close is passed on each way), when
//! either socket reports an error (a client's RST ends it at once, even while the other
//! direction is blocked on a destination that stopped reading), when no byte moved either way
//! for the idle timeout, or when the server cuts it at shutdown.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub(super) use super::copy::watch_error;
use super::copy::{self, Tally};
use super::cut::SessionCut;
use super::metrics::ServerMetrics;
use crate::pool::spare::{probe, Probe};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// True when not a byte (nor a FIN) reached the upstream and none came from it, and the
    /// client is really gone: the upstream is still a never-used spare and may go back.
    pub upstream_untouched: bool,
    pub end: SessionEnd,
}

/// How a session ended, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionEnd {
    /// Both directions reached EOF.
    #[default]
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// Cut at shutdown.
    Cut,
}

/// What a relay needs besides its two sockets.
pub struct RelaySettings<'a> {
    /// Bytes the client sent right behind its request (read with the handshake), delivered first.
    pub pending: &'a [u8],
    /// Whether an untouched upstream can go back to a pool (only then is it worth watching for
    /// a client that leaves before anything moved).
    pub may_return_untouched: bool,
    pub idle_timeout: Duration,
    pub metrics: &'a ServerMetrics,
    pub cut: &'a mut SessionCut,
}

/// Relays until the session ends (see the module docs). An I/O error of either socket is
/// returned as `Err`; bytes moved before it are already counted in the server's metrics.
///
/// Whether the upstream is still untouched is judged when the session ends, not by waiting
/// for its first event (an extra peek and wake-up on every pooled session): not a byte moved
/// either way, no FIN was passed to it, it is still open, and the session ended because its
/// client reset, idled out or was cut. A client's FIN is a half-close, never "gone".
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    settings: RelaySettings<'_>,
) -> io::Result<RelayOutcome> {
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let (up_shut, down_shut) = (AtomicBool::new(false), AtomicBool::new(false));
    let (to_upstream_total, to_client_total) = settings.metrics.relayed_totals();
    if !settings.pending.is_empty() {
        upstream.write_all(settings.pending).await?;
        let sent = settings.pending.len() as u64;
        up.fetch_add(sent, Ordering::Relaxed);
        to_upstream_total.fetch_add(sent, Ordering::Relaxed);
    }

    let idle = idle_timer(&up, &down, settings.idle_timeout);
    let ended = {
        let copy = copy::bidirectional(
            &mut *client,
            &mut *upstream,
            Tally { session: &up, total: to_upstream_total, shut: &up_shut },
            Tally { session: &down, total: to_client_total, shut: &down_shut },
        );
        tokio::select! {
            biased;
            copied = copy => copied.map(|()| SessionEnd::Closed),
            () = idle => Ok(SessionEnd::IdleTimeout),
            () = settings.cut.cut() => Ok(SessionEnd::Cut),
        }
    };
    let pristine = settings.may_return_untouched
        && up.load(Ordering::Relaxed) == 0
        && down.load(Ordering::Relaxed) == 0
        && !up_shut.load(Ordering::Relaxed)
        && probe(upstream) == Probe::Quiet;
    let outcome = |end, untouched| RelayOutcome {
        client_to_upstream: up.load(Ordering::Relaxed),
        upstream_to_client: down.load(Ordering::Relaxed),
        upstream_untouched: untouched,
        end,
    };
    match ended {
        Ok(end) => Ok(outcome(end, pristine && end != SessionEnd::Closed)),
        // The client reset before anything moved: its upstream is still a spare.
        Err(_) if pristine => Ok(outcome(SessionEnd::Closed, true)),
        Err(error) => Err(error),
    }
}

/// Completes once neither counter moved for `timeout`. It looks every quarter of the timeout,
/// so a session is closed between 1 and 1.25 timeouts after its last byte, without touching a
/// clock on the byte path.
async fn idle_timer(up: &AtomicU64, down: &AtomicU64, timeout: Duration) {
    let step = (timeout / 4).max(Duration::from_millis(1));
    let moved = || up.load(Ordering::Relaxed).wrapping_add(down.load(Ordering::Relaxed));
    let mut last_seen = moved();
    let mut quiet_for = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now_seen = moved();
        if now_seen == last_seen {
            quiet_for += step;
            if quiet_for >= timeout {
                return;
            }
        } else {
            last_seen = now_seen;
            quiet_for = Duration::ZERO;
        }
    }
}
