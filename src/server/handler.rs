//! One client session: access check, handshake, then the command: CONNECT (upstream
//! acquisition and relay) here, BIND and UDP ASSOCIATE in their own modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::json;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{Authenticator, LoginOutcome};
use super::bind::{self, BindSettings};
use super::cut::SessionCut;
use super::metrics::ServerMetrics;
use super::proxy_header::{self, ProxiedSource};
use super::relay::{relay, watch_error, RelaySettings, SessionEnd};
use super::udp::{self, UdpSettings};
use crate::access::SharedPolicy;
use crate::descriptors::DescriptorBudget;
use crate::logsafe::Escaped;
use crate::resolve::Resolver;
use crate::socks::{
    Command, Greeting, MethodSelection, Reply, ReplyCode, Request, SocksError, TargetAddr,
    UserPassReply, UserPassRequest, METHOD_USERPASS,
};
use crate::telemetry::Telemetry;
use crate::throttled;
use crate::upstream::{ConnectError, Connector, Upstream};

/// Largest handshake read in one go; also bounds the pipelined bytes we hold before relaying.
const HANDSHAKE_BUFFER: usize = 1024;

/// Telemetry categories written by the server.
pub const CATEGORY_ACCESS: &str = "access";
pub const CATEGORY_AUTH: &str = "auth";

/// What every handler shares.
pub struct HandlerContext {
    pub auth: Authenticator,
    pub access: SharedPolicy,
    pub connector: Arc<dyn Connector>,
    pub handshake_timeout: Duration,
    pub session_idle_timeout: Duration,
    pub metrics: Arc<ServerMetrics>,
    pub telemetry: Telemetry,
    /// Names in UDP datagrams and BIND requests (CONNECT resolves through its connector).
    pub resolver: Arc<dyn Resolver>,
    /// What UDP associations and BINDs take their extra descriptors from.
    pub descriptors: Arc<DescriptorBudget>,
    /// `None` when `[server] udp_associate = false`.
    pub udp: Option<UdpSettings>,
    /// `None` when `[server] bind = false`.
    pub bind: Option<BindSettings>,
    /// `Some(trusted sources)` when `[server] proxy_protocol = true`: every connection starts
    /// with a PROXY protocol header naming the real client.
    pub proxy_protocol: Option<Vec<IpNet>>,
}

/// Reads the PROXY protocol header of a connection from `socket_peer`, before `deadline`.
/// Returns the client to serve (the header's source, or the balancer for LOCAL), or `None`
/// when the connection must be closed (untrusted source, no valid header, too slow, shutdown).
async fn proxied_client(
    ctx: &HandlerContext,
    trusted: &[IpNet],
    client: &mut TcpStream,
    socket_peer: SocketAddr,
    deadline: tokio::time::Instant,
    cut: &mut SessionCut,
) -> Option<SocketAddr> {
    if !proxy_header::is_trusted(trusted, socket_peer.ip()) {
        throttled!(info, "connection from a source not in server.proxy_protocol_trusted: closed");
        ctx.metrics.proxy_untrusted();
        ctx.telemetry.warning(
            CATEGORY_ACCESS,
            "PROXY protocol connection from an untrusted source",
            vec![("source", json!(socket_peer.ip().to_string()))],
        );
        return None;
    }
    let read = tokio::time::timeout_at(deadline, proxy_header::read_header(client));
    let source = tokio::select! {
        read = read => read,
        () = cut.cut() => return None,
    };
    match source {
        Ok(Ok(source)) => {
            let peer = source.client(socket_peer);
            tracing::Span::current().record("peer", tracing::field::display(peer));
            if source == ProxiedSource::Local {
                debug!("PROXY protocol LOCAL: serving the balancer itself");
            }
            Some(peer)
        }
        Ok(Err(e)) => {
            if e.is_disconnect() {
                debug!(error = %e, "connection closed before its PROXY protocol header");
            } else {
                throttled!(info, error = %e, "invalid PROXY protocol header: closed");
            }
            ctx.metrics.proxy_header_invalid();
            None
        }
        Err(_) => {
            throttled!(info, timeout = ?ctx.handshake_timeout, "PROXY protocol header timed out");
            ctx.metrics.proxy_header_invalid();
            None
        }
    }
}

/// Serves one client to the end. Never panics on client input; every failure is logged once.
/// `socket_peer` is the connection's peer: the client, or with the PROXY protocol on the
/// balancer, whose header then names the client that everything below judges and records.
pub async fn serve(
    ctx: Arc<HandlerContext>,
    mut client: TcpStream,
    socket_peer: SocketAddr,
    mut cut: SessionCut,
) {
    // One deadline for the PROXY header and the SOCKS handshake together: a slow drip of the
    // one cannot buy more time for the other.
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let peer = match &ctx.proxy_protocol {
        None => socket_peer,
        Some(trusted) => {
            let proxied =
                proxied_client(&ctx, trusted, &mut client, socket_peer, deadline, &mut cut);
            match Box::pin(proxied).await {
                Some(peer) => peer,
                None => return,
            }
        }
    };
    if !ctx.access.load().client_allowed(peer.ip()) {
        throttled!(info, "client address not allowed by access.client_networks");
        ctx.telemetry.warning(
            CATEGORY_ACCESS,
            "client address not allowed",
            vec![("client", json!(peer.ip().to_string()))],
        );
        return;
    }
    let handshake = tokio::time::timeout_at(deadline, handshake(&ctx, &mut client, peer));
    // `biased` in the session's selects: its own work is polled first, and no random branch
    // order is drawn on every poll (a thread-local RNG per poll showed in perf).
    let (request, pending) = tokio::select! {
        biased;
        result = handshake => match result {
            Ok(Ok(negotiated)) => negotiated,
            Ok(Err(e)) => {
                if e.is_disconnect() {
                    debug!(error = %e, "client left during handshake");
                } else {
                    throttled!(info, error = %e, "handshake failed");
                }
                ctx.metrics.handshake_failed();
                return;
            }
            Err(_) => {
                throttled!(info, timeout = ?ctx.handshake_timeout, "handshake timed out");
                ctx.metrics.handshake_failed();
                return;
            }
        },
        () = cut.cut() => return,
    };

    let target = request.target;
    // UDP ASSOCIATE, BIND and the PROXY header are boxed: their futures are large (BIND's is
    // 5.5 KB) and would otherwise size every CONNECT session's task, which is moved whole
    // when it is spawned (memmove was the proxy's top user-space symbol).
    match (request.command, &ctx.udp, &ctx.bind) {
        (Command::Connect, _, _) => {}
        (Command::UdpAssociate, Some(settings), _) => {
            let associate = udp::associate(&ctx, &mut client, peer, &target, settings, &mut cut);
            return Box::pin(associate).await;
        }
        (Command::Bind, _, Some(settings)) => {
            let bind = bind::bind(&ctx, &mut client, peer, &target, pending, settings, &mut cut);
            return Box::pin(bind).await;
        }
        // `handshake` answered a command that is turned off with 0x07.
        _ => return,
    }
    let Some(mut upstream) = connect(&ctx, &mut client, &target, &mut cut).await else { return };
    ctx.metrics.session_started(Command::Connect);
    let settings = RelaySettings {
        pending: &pending,
        may_return_untouched: upstream.is_leased(),
        idle_timeout: ctx.session_idle_timeout,
        metrics: &ctx.metrics,
        cut: &mut cut,
    };
    let result = relay(&mut client, &mut upstream.stream, settings).await;
    ctx.metrics.session_ended();
    match result {
        Ok(outcome) => {
            let sent = outcome.client_to_upstream;
            let received = outcome.upstream_to_client;
            match outcome.end {
                SessionEnd::Closed => debug!(%target, sent, received, "session closed"),
                SessionEnd::IdleTimeout => {
                    info!(%target, sent, received, timeout = ?ctx.session_idle_timeout, "session idle too long: closed")
                }
                SessionEnd::Cut => debug!(%target, sent, received, "session cut at shutdown"),
            }
            upstream.finish(outcome.upstream_untouched);
        }
        Err(e) => {
            debug!(%target, error = %e, "session ended with an error");
            upstream.finish(false);
        }
    }
}

/// Gets an upstream for `target` and sends the CONNECT reply (success or the failure code).
/// A client that resets meanwhile ends the attempt at once; one that half-closes still gets
/// its reply (and the session) when the connect completes.
async fn connect(
    ctx: &HandlerContext,
    client: &mut TcpStream,
    target: &TargetAddr,
    cut: &mut SessionCut,
) -> Option<Upstream> {
    let acquired = if ctx.access.load().may_reach(target) {
        tokio::select! {
            biased;
            acquired = ctx.connector.acquire(target) => acquired,
            error = watch_error(client) => {
                debug!(%target, %error, "client left while its connection was being made");
                return None;
            }
            () = cut.cut() => return None,
        }
    } else {
        Err(ConnectError::NotAllowed(target.clone()))
    };
    let upstream = match acquired {
        Ok(upstream) => upstream,
        Err(e) => {
            let code = e.reply_code();
            if let ConnectError::NotAllowed(_) = e {
                warn!(%target, "destination denied by access rules");
                ctx.telemetry.warning(
                    CATEGORY_ACCESS,
                    "destination denied by access rules",
                    vec![("destination", json!(target.to_string()))],
                );
            } else {
                info!(%target, error = %e, reply = ?code, "connect failed");
            }
            let _ = client.write_all(&Reply::failure(code).to_bytes()).await;
            return None;
        }
    };
    let bound = upstream
        .stream
        .local_addr()
        .map(TargetAddr::from)
        .unwrap_or_else(|_| TargetAddr::unspecified());
    if let Err(e) = client.write_all(&Reply { code: ReplyCode::Succeeded, bound }.to_bytes()).await
    {
        debug!(error = %e, "client left before the reply");
        // Nothing crossed the upstream connection: it is still as good as a spare.
        upstream.finish_unserved(true);
        return None;
    }
    debug!(%target, origin = ?upstream.origin, "connected");
    Some(upstream)
}

/// Greeting, authentication and request. Returns the request (of a command that is served) and
/// any bytes the client already sent behind it, which must reach the upstream first.
async fn handshake(
    ctx: &HandlerContext,
    client: &mut TcpStream,
    peer: SocketAddr,
) -> Result<(Request, Vec<u8>), SocksError> {
    let mut reader = BufReader::with_capacity(HANDSHAKE_BUFFER, client);
    let greeting = match Greeting::read_from(&mut reader).await {
        Err(SocksError::NoMethods) => {
            reader.get_mut().write_all(&MethodSelection::NO_ACCEPTABLE.to_bytes()).await?;
            return Err(SocksError::NoMethods);
        }
        other => other?,
    };
    let Some(method) = ctx.auth.select_method(&greeting.methods) else {
        reader.get_mut().write_all(&MethodSelection::NO_ACCEPTABLE.to_bytes()).await?;
        return Err(SocksError::NoAcceptableMethod);
    };
    reader.get_mut().write_all(&MethodSelection { method }.to_bytes()).await?;

    if method == METHOD_USERPASS {
        let request = UserPassRequest::read_from(&mut reader).await;
        let outcome = match &request {
            Ok(request) => ctx.auth.login(peer.ip(), request).await,
            Err(_) => LoginOutcome::Rejected,
        };
        let accepted = outcome == LoginOutcome::Accepted;
        reader.get_mut().write_all(&UserPassReply { success: accepted }.to_bytes()).await?;
        let request = request?;
        match outcome {
            LoginOutcome::Accepted => debug!(user = %Escaped(&request.username), "authenticated"),
            LoginOutcome::Rejected => {
                throttled!(warn, user = %Escaped(&request.username), "authentication failed");
                return Err(SocksError::AuthFailed);
            }
            LoginOutcome::RateLimited => {
                throttled!(warn, user = %Escaped(&request.username), "login refused: too many failures from this address");
                ctx.telemetry.warning(
                    CATEGORY_AUTH,
                    "login refused: too many failures from this address",
                    vec![("client", json!(peer.ip().to_string()))],
                );
                return Err(SocksError::AuthFailed);
            }
            // Logged by the authenticator, at most once per interval: a flood sheds many.
            LoginOutcome::Shed => return Err(SocksError::AuthFailed),
        }
    }

    let request = match Request::read_from(&mut reader).await {
        Ok(request) => request,
        Err(e) => {
            if let Some(code) = e.reply_code() {
                reader.get_mut().write_all(&Reply::failure(code).to_bytes()).await?;
            }
            return Err(e);
        }
    };
    let served = match request.command {
        Command::Connect => true,
        Command::Bind => ctx.bind.is_some(),
        Command::UdpAssociate => ctx.udp.is_some(),
    };
    if !served {
        reader
            .get_mut()
            .write_all(&Reply::failure(ReplyCode::CommandNotSupported).to_bytes())
            .await?;
        return Err(SocksError::CommandNotSupported(request.command.as_byte()));
    }
    let pending = reader.buffer().to_vec();
    Ok((request, pending))
}
