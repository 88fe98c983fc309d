//! One client session: handshake, upstream acquisition, relay.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::Authenticator;
use super::metrics::ServerMetrics;
use super::relay::relay;
use crate::socks::{
    Command, Greeting, MethodSelection, Reply, ReplyCode, Request, SocksError, TargetAddr,
    UserPassReply, UserPassRequest, METHOD_USERPASS,
};
use crate::upstream::Connector;

/// Largest handshake read in one go; also bounds the pipelined bytes we hold before relaying.
const HANDSHAKE_BUFFER: usize = 1024;

/// What every handler shares.
pub struct HandlerContext {
    pub auth: Authenticator,
    pub connector: Arc<dyn Connector>,
    pub handshake_timeout: std::time::Duration,
    pub metrics: Arc<ServerMetrics>,
}

/// Serves one client to the end. Never panics on client input; every failure is logged once.
pub async fn serve(ctx: Arc<HandlerContext>, mut client: TcpStream, cancel: CancellationToken) {
    let _ = client.set_nodelay(true);
    let handshake = tokio::time::timeout(ctx.handshake_timeout, handshake(&ctx, &mut client));
    let (target, pending) = tokio::select! {
        result = handshake => match result {
            Ok(Ok(negotiated)) => negotiated,
            Ok(Err(e)) if e.is_disconnect() => {
                debug!(error = %e, "client left during handshake");
                ctx.metrics.handshake_failed();
                return;
            }
            Ok(Err(e)) => {
                info!(error = %e, "handshake failed");
                ctx.metrics.handshake_failed();
                return;
            }
            Err(_) => {
                info!(timeout = ?ctx.handshake_timeout, "handshake timed out");
                ctx.metrics.handshake_failed();
                return;
            }
        },
        _ = cancel.cancelled() => return,
    };

    let acquired = tokio::select! {
        acquired = ctx.connector.acquire(&target) => acquired,
        _ = cancel.cancelled() => return,
    };
    let mut upstream = match acquired {
        Ok(upstream) => upstream,
        Err(e) => {
            let code = e.reply_code();
            info!(%target, error = %e, reply = ?code, "connect failed");
            let _ = client.write_all(&Reply::failure(code).to_bytes()).await;
            return;
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
        upstream.finish(true);
        return;
    }
    debug!(%target, origin = ?upstream.origin, "connected");

    ctx.metrics.session_started();
    let result = relay(&mut client, &mut upstream.stream, &pending, &cancel).await;
    ctx.metrics.session_ended();
    match result {
        Ok(outcome) => {
            ctx.metrics.add_relayed(outcome.client_to_upstream, outcome.upstream_to_client);
            debug!(
                %target,
                sent = outcome.client_to_upstream,
                received = outcome.upstream_to_client,
                "session closed"
            );
            upstream.finish(outcome.upstream_untouched);
        }
        Err(e) => {
            debug!(%target, error = %e, "session ended with an error");
            upstream.finish(false);
        }
    }
}

/// Greeting, authentication and request. Returns the CONNECT target and any bytes the client
/// already sent behind the request, which must reach the upstream first.
async fn handshake(
    ctx: &HandlerContext,
    client: &mut TcpStream,
) -> Result<(TargetAddr, Vec<u8>), SocksError> {
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
        let accepted = matches!(&request, Ok(request) if ctx.auth.verify(request));
        reader.get_mut().write_all(&UserPassReply { success: accepted }.to_bytes()).await?;
        match request {
            Ok(request) if accepted => debug!(user = %request.username, "authenticated"),
            Ok(request) => {
                warn!(user = %request.username, "authentication failed");
                return Err(SocksError::AuthFailed);
            }
            Err(e) => return Err(e),
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
    if request.command != Command::Connect {
        reader
            .get_mut()
            .write_all(&Reply::failure(ReplyCode::CommandNotSupported).to_bytes())
            .await?;
        return Err(SocksError::CommandNotSupported(request.command.as_byte()));
    }
    Ok((request.target, reader.buffer().to_vec()))
}
