//! The accept loop and per-connection serving, with the limits that keep the endpoint from
//! competing with the proxy: a connection cap, a header read timeout, a bounded request head
//! and a connection lifetime.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::context::StatsContext;
use super::router::{self, Shared};
use super::StatsError;
use crate::config::Config;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds `[sessions] stats_api_bind_address:stats_api_port`.
pub async fn bind(config: &Config) -> Result<TcpListener, StatsError> {
    let addr = config.sessions.stats_api_addr();
    TcpListener::bind(addr).await.map_err(|source| StatsError::Bind { addr, source })
}

/// Serves the stats routes on `listener` until `shutdown` completes; then stops accepting,
/// lets responses in flight finish for `shutdown_grace` and closes what is left.
pub async fn serve(
    listener: TcpListener,
    ctx: StatsContext,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StatsError> {
    let options = ctx.options.clone();
    let shared = Arc::new(Shared::new(ctx));
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let stop = CancellationToken::new();
    // Dropping the set aborts whatever is still running, so nothing outlives `serve`.
    let mut connections = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "stats endpoint listening");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow with every client.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over the cap: close at once rather than queue, so a flood of idle
                    // connections costs one accept each and nothing more.
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        debug!(%peer, "stats endpoint at its connection limit; closing");
                        continue;
                    };
                    let shared = shared.clone();
                    let stop = stop.clone();
                    connections.spawn(
                        serve_connection(stream, shared, stop, permit)
                            .instrument(info_span!("stats_conn", %peer)),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "stats endpoint accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(left = connections.len(), "stats connections cut at shutdown");
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let options = &shared.ctx.options;
    let lifetime = options.connection_lifetime;
    let grace = options.shutdown_grace;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // hyper panics below 8 KiB; the option documents that, this keeps it true.
        .max_buf_size(options.max_request_head_bytes.max(8192))
        .keep_alive(true);
    let handler = shared.clone();
    let service = service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(router::handle(&handler, request).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "stats connection ended");
            }
            return;
        }
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(lifetime) => {}
    }
    // Finish the response in flight, if any, then close; a client that will not read it
    // gets `grace` and no more.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, connection).await;
}

/// A stats endpoint running in its own task (see [`spawn`]).
pub struct StatsHandle {
    addr: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), StatsError>>,
}

impl StatsHandle {
    /// Where it listens (useful when bound to port 0).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Stops accepting, lets responses in flight finish (bounded) and waits for the task.
    pub async fn stop(self) -> Result<(), StatsError> {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(StatsError::Task(e.to_string())),
        }
    }
}

/// Spawns [`serve`] on the current runtime; stop it with [`StatsHandle::stop`].
pub fn spawn(listener: TcpListener, ctx: StatsContext) -> StatsHandle {
    let addr = listener.local_addr().ok();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, ctx, stop.clone().cancelled_owned()));
    StatsHandle { addr, stop, task }
}
