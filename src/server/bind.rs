//! BIND (RFC 1928 sections 4 and 6): the proxy listens for one incoming connection on the
//! client's behalf (active-mode FTP's data connection, say), then relays it like CONNECT.
//!
//! The request names the host expected to connect (DST.ADDR; a name is resolved). The access
//! rules judge that host exactly as a CONNECT destination (before DNS, then every address), so
//! a BIND cannot let in a peer the rules would not let a client reach; a BIND naming no host
//! (0.0.0.0) is refused like any unspecified destination. The proxy listens on a fresh port of
//! the address the client reached it on, sends the first reply with that address, and accepts
//! connections until one comes from an address of that host within `bind_timeout_secs`; any
//! other is reset and the wait goes on. The listener is closed as soon as the peer is in, the
//! wait times out (reply `0x06`), the client closes its control connection, or the server cuts
//! the wait at shutdown (reply `0x01`). Then the second reply names the peer and the session
//! is relayed by [`relay`], with half-close, splice and the idle timeout, as CONNECT is.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use tracing::{debug, info, warn};

use super::accept::is_per_connection;
use super::bind_waits::{BindWait, BindWaits, Full};
use super::cut::SessionCut;
use super::handler::{HandlerContext, CATEGORY_ACCESS};
use super::metrics::BindOutcome;
use super::relay::{relay, watch_error, RelaySettings, SessionEnd};
use crate::descriptors::{self, Descriptors};
use crate::socks::{Command, Reply, ReplyCode, TargetAddr};
use crate::throttled;

/// What BIND needs from the config.
#[derive(Debug, Clone)]
pub struct BindSettings {
    pub timeout: Duration,
    /// Shared by every session: BINDs waiting per client and in all.
    pub waits: Arc<BindWaits>,
}

/// Bytes a client may send before its peer connects, delivered to the peer first; beyond
/// this the proxy stops reading from the client until then (one relay buffer's worth).
const MAX_EARLY_BYTES: usize = 16 * 1024;

/// Serves a BIND for `expected` (the host named in the request). `pending` holds bytes the
/// client sent right behind its request.
pub(super) async fn bind(
    ctx: &HandlerContext,
    client: &mut TcpStream,
    peer: SocketAddr,
    expected: &TargetAddr,
    mut pending: Vec<u8>,
    settings: &BindSettings,
    cut: &mut SessionCut,
) {
    let metrics = &ctx.metrics;
    // A listening port and a descriptor are held from here to the peer's arrival.
    let (_wait, _listener_descriptor) = match places(ctx, peer, settings) {
        Some(places) => places,
        None => {
            metrics.bind.outcome(BindOutcome::Limited);
            let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
            return;
        }
    };
    let allowed = match expected_addresses(ctx, client, expected, cut).await {
        Ok(allowed) => allowed,
        Err(Refusal::Gone) => return,
        Err(Refusal::Reply(code, outcome)) => {
            metrics.bind.outcome(outcome);
            let _ = client.write_all(&Reply::failure(code).to_bytes()).await;
            return;
        }
    };
    let listen_on = match client.local_addr() {
        Ok(local) => SocketAddr::new(local.ip().to_canonical(), 0),
        Err(e) => {
            debug!(error = %e, "client left before BIND listened");
            return;
        }
    };
    let listener = match TcpListener::bind(listen_on).await {
        Ok(listener) => listener,
        Err(e) => {
            warn!(address = %listen_on, error = %e, "BIND cannot listen: reply 0x01");
            metrics.bind.outcome(BindOutcome::Failed);
            let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
            return;
        }
    };
    let listening = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            warn!(error = %e, "BIND listener has no address: reply 0x01");
            metrics.bind.outcome(BindOutcome::Failed);
            let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
            return;
        }
    };
    let first = Reply { code: ReplyCode::Succeeded, bound: TargetAddr::Ip(listening) };
    if let Err(e) = client.write_all(&first.to_bytes()).await {
        debug!(error = %e, "client left before the first BIND reply");
        return;
    }
    metrics.session_started(Command::Bind);
    metrics.bind.wait_started();
    debug!(%listening, %expected, "BIND listening");

    let waited = wait_for_peer(ctx, client, &listener, &allowed, &mut pending, settings, cut).await;
    // The port is freed before the client hears anything more.
    drop(listener);
    metrics.bind.wait_ended();
    let (mut peer, from) = match waited {
        Ok(connected) => connected,
        Err(outcome) => {
            metrics.bind.outcome(outcome);
            let code = match outcome {
                BindOutcome::TimedOut => {
                    info!(%expected, timeout = ?settings.timeout, "BIND: no connection from the expected host in time: reply 0x06");
                    Some(ReplyCode::TtlExpired)
                }
                BindOutcome::Cut => {
                    debug!(%expected, "BIND wait cut at shutdown: reply 0x01");
                    Some(ReplyCode::GeneralFailure)
                }
                BindOutcome::ClientLeft => {
                    debug!(%expected, "client left while BIND waited");
                    None
                }
                _ => Some(ReplyCode::GeneralFailure),
            };
            if let Some(code) = code {
                let _ = client.write_all(&Reply::failure(code).to_bytes()).await;
            }
            metrics.session_ended();
            return;
        }
    };
    metrics.bind.outcome(BindOutcome::Connected);
    let _ = peer.set_nodelay(true);
    let second = Reply { code: ReplyCode::Succeeded, bound: TargetAddr::Ip(from) };
    if let Err(e) = client.write_all(&second.to_bytes()).await {
        debug!(error = %e, "client left before the second BIND reply");
        metrics.session_ended();
        return;
    }
    debug!(%from, "BIND peer connected");
    let relayed = relay(
        client,
        &mut peer,
        RelaySettings {
            pending: &pending,
            may_return_untouched: false,
            idle_timeout: ctx.session_idle_timeout,
            metrics,
            cut,
        },
    )
    .await;
    metrics.session_ended();
    match relayed {
        Ok(outcome) => {
            let (sent, received) = (outcome.client_to_upstream, outcome.upstream_to_client);
            match outcome.end {
                SessionEnd::Closed => debug!(%from, sent, received, "BIND session closed"),
                SessionEnd::IdleTimeout => {
                    info!(%from, sent, received, timeout = ?ctx.session_idle_timeout, "BIND session idle too long: closed")
                }
                SessionEnd::Cut => debug!(%from, sent, received, "BIND session cut at shutdown"),
            }
        }
        Err(e) => debug!(%from, error = %e, "BIND session ended with an error"),
    }
}

/// A BIND's place among the waits and the descriptor of its listener, or `None` (logged at
/// most once per interval) when either has run out.
fn places(
    ctx: &HandlerContext,
    peer: SocketAddr,
    settings: &BindSettings,
) -> Option<(BindWait, Descriptors)> {
    let wait = match settings.waits.try_begin(peer.ip()) {
        Ok(wait) => wait,
        Err(full) => {
            match full {
                Full::Client(limit) => throttled!(warn, limit, "BIND refused: this client already has as many BINDs waiting as it may: reply 0x01"),
                Full::Total(limit) => throttled!(warn, limit, "BIND refused: as many BINDs are waiting as the ephemeral port range allows: reply 0x01"),
            }
            return None;
        }
    };
    let descriptor = ctx.descriptors.try_take(descriptors::BIND)?;
    Some((wait, descriptor))
}

enum Refusal {
    /// The client left (or the server is shutting down) before a reply was due.
    Gone,
    Reply(ReplyCode, BindOutcome),
}

/// The addresses the expected host may connect from: its literal address or what its name
/// resolves to, each allowed by the access rules.
async fn expected_addresses(
    ctx: &HandlerContext,
    client: &TcpStream,
    expected: &TargetAddr,
    cut: &mut SessionCut,
) -> Result<Vec<IpAddr>, Refusal> {
    let denied = || {
        warn!(%expected, "BIND peer denied by access rules");
        ctx.telemetry.warning(
            CATEGORY_ACCESS,
            "BIND peer denied by access rules",
            // The host named is what the rules judged, as a CONNECT's destination.
            vec![("destination", json!(expected.to_string())), ("command", json!("bind"))],
        );
        Refusal::Reply(ReplyCode::NotAllowed, BindOutcome::Denied)
    };
    if !ctx.access.load().may_reach(expected) {
        return Err(denied());
    }
    let addresses = match expected {
        TargetAddr::Ip(addr) => vec![addr.ip()],
        TargetAddr::Domain(name, port) => {
            let looked_up = tokio::select! {
                looked_up = ctx.resolver.lookup(name, *port) => looked_up,
                error = watch_error(client) => {
                    debug!(%error, "client left while the BIND peer's name was resolved");
                    return Err(Refusal::Gone);
                }
                () = cut.cut() => return Err(Refusal::Gone),
            };
            match looked_up {
                Ok(addrs) => addrs.into_iter().map(|addr| addr.ip()).collect(),
                Err(e) => {
                    info!(%expected, error = %e, "BIND peer does not resolve: reply 0x04");
                    return Err(Refusal::Reply(
                        ReplyCode::HostUnreachable,
                        BindOutcome::Unresolvable,
                    ));
                }
            }
        }
    };
    let policy = ctx.access.load();
    let allowed: Vec<IpAddr> = addresses
        .into_iter()
        .map(|ip| ip.to_canonical())
        .filter(|ip| policy.may_connect(expected, *ip))
        .collect();
    if allowed.is_empty() {
        return Err(denied());
    }
    Ok(allowed)
}

/// Accepts until a connection comes from one of `allowed`; refuses (resets) the others.
async fn wait_for_peer(
    ctx: &HandlerContext,
    client: &TcpStream,
    listener: &TcpListener,
    allowed: &[IpAddr],
    pending: &mut Vec<u8>,
    settings: &BindSettings,
    cut: &mut SessionCut,
) -> Result<(TcpStream, SocketAddr), BindOutcome> {
    let deadline = tokio::time::sleep(settings.timeout);
    tokio::pin!(deadline);
    let mut chunk = [0u8; 4096];
    let mut refused = 0u64;
    loop {
        let room = MAX_EARLY_BYTES.saturating_sub(pending.len()).min(chunk.len());
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    if allowed.contains(&from.ip()) {
                        return Ok((stream, from));
                    }
                    ctx.metrics.bind.refused_peer();
                    refused += 1;
                    // Said once per BIND: a stranger's flood of connections is only counted.
                    if refused == 1 {
                        info!(%from, "BIND refused a connection from another host than the one named; still waiting");
                    } else {
                        debug!(%from, refused, "BIND refused another connection");
                    }
                    // A reset, so the stranger learns at once that nobody is there for it.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    warn!(error = %e, "BIND accept failed: reply 0x01");
                    return Err(BindOutcome::Failed);
                }
            },
            () = &mut deadline => return Err(BindOutcome::TimedOut),
            ready = client.readable(), if room > 0 => {
                if ready.is_err() {
                    return Err(BindOutcome::ClientLeft);
                }
                match client.try_read(&mut chunk[..room]) {
                    Ok(0) => return Err(BindOutcome::ClientLeft),
                    Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(BindOutcome::ClientLeft),
                }
            }
            _ = watch_error(client), if room == 0 => return Err(BindOutcome::ClientLeft),
            () = cut.cut() => return Err(BindOutcome::Cut),
        }
    }
}
