//! Copies bytes between a client and its upstream until both directions are done.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayOutcome {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// True when not a byte (nor a FIN) reached the upstream and none came from it: the upstream
    /// connection is still a never-used spare and may go back to the pool.
    pub upstream_untouched: bool,
}

/// Relays until both directions have seen EOF, an error occurs, or `cancel` fires.
///
/// `pending` holds bytes the client sent right behind its CONNECT request (read along with the
/// handshake); they are delivered first. Half-close is propagated both ways: a client that shuts
/// down its write side still receives the rest of the response. `may_return_untouched` asks
/// whether the upstream is left untouched when the client leaves without sending (only worth a
/// syscall when a pool can take the connection back).
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    pending: &[u8],
    may_return_untouched: bool,
    cancel: &CancellationToken,
) -> io::Result<RelayOutcome> {
    let mut outcome = RelayOutcome::default();
    if pending.is_empty() && may_return_untouched {
        // Wait for the first event before touching the upstream. A client that leaves without
        // sending anything (a browser's unused preconnect, say) hands back an untouched spare.
        // Peeking needs no buffer and leaves the bytes for the copy below.
        let mut probe = [0u8; 1];
        tokio::select! {
            peeked = client.peek(&mut probe) => match peeked {
                Ok(0) | Err(_) => return Ok(RelayOutcome { upstream_untouched: true, ..outcome }),
                Ok(_) => {}
            },
            // The upstream speaks first (a server greeting) or closed: either way it is used now.
            ready = upstream.readable() => ready?,
            _ = cancel.cancelled() => {
                return Ok(RelayOutcome { upstream_untouched: true, ..outcome });
            }
        }
    } else if !pending.is_empty() {
        upstream.write_all(pending).await?;
        outcome.client_to_upstream += pending.len() as u64;
    }

    let copy = super::copy::bidirectional(client, upstream);
    tokio::select! {
        copied = copy => {
            let (to_upstream, to_client) = copied?;
            outcome.client_to_upstream += to_upstream;
            outcome.upstream_to_client += to_client;
            Ok(outcome)
        }
        _ = cancel.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "relay cut at shutdown")),
    }
}
