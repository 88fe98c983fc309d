//! The accept loop and per-connection serving, with the limits that keep the endpoint from
//! competing with the proxy: a connection cap, a header read timeout, a bounded request head
//! and a connection lifetime.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
use crate::throttle::Throttle;

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin; it
/// doubles while accepts keep failing.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// At most one log line per this long while accepts keep failing (it was one per 50 ms).
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Binds `[sessions] stats_api_bind_address:stats_api_port`.
pub async fn bind(config: &Config) -> Result<TcpListener, StatsError> {
    let addr = config.sessions.stats_api_addr();
    TcpListener::bind(addr).await.map_err(|source| StatsError::Bind { addr, source })
}

/// Serves the stats routes on `listener` until `shutdown` completes; then stops accepting,
/// lets responses in flight finish for `shutdown_grace` and closes what is left.
///
/// At its connection limit it does not turn the newcomer away: it closes the connection that
/// has waited longest for a request head (an idle keep-alive, or a client dripping bytes) and
/// serves the newcomer. Clients that hold slots without asking anything cannot starve one that
/// asks at once, such as a balancer's health check (70 idle or one-byte-per-second connections
/// refilled each second used to fail 12 of 15 checks).
pub async fn serve(
    listener: TcpListener,
    ctx: StatsContext,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StatsError> {
    let options = ctx.options.clone();
    let shared = Arc::new(Shared::new(ctx));
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let stop = CancellationToken::new();
    let registry = Arc::new(Registry::default());
    // Dropping the set aborts whatever is still running, so nothing outlives `serve`.
    let mut connections = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "stats endpoint listening");
    }
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut error_log = Throttle::new(ACCEPT_ERROR_LOG_INTERVAL);
    let mut failing = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections so the set does not grow with every client.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut failing) {
                        let held_back = error_log.take_suppressed();
                        info!(failed_accepts_not_logged = held_back, "stats endpoint accepting again");
                    }
                    backoff = ACCEPT_BACKOFF_START;
                    let Some(permit) = admit(&permits, &registry, options.evictable_after).await else {
                        debug!(%peer, "stats endpoint at its connection limit, every slot busy; closing");
                        continue;
                    };
                    let state = registry.add();
                    let shared = shared.clone();
                    let stop = stop.clone();
                    let registry = registry.clone();
                    connections.spawn(
                        async move {
                            serve_connection(stream, peer, shared, stop, &registry, &state).await;
                            registry.remove(state.id);
                            drop(permit);
                        }
                        .instrument(info_span!("stats_conn", %peer)),
                    );
                }
                Err(e) => {
                    failing = true;
                    if let Some(held_back) = error_log.allow(tokio::time::Instant::now()) {
                        warn!(error = %e, failed_accepts_not_logged = held_back, "stats endpoint accept failed; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
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

/// A connection slot for a newcomer: a free one, or the one of the connection that has waited
/// longest for a request head, closed for it. `None` when every connection is mid-request.
async fn admit(
    permits: &Arc<Semaphore>,
    registry: &Registry,
    evictable_after: Duration,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = permits.clone().try_acquire_owned() {
        return Some(permit);
    }
    registry.evict_longest_waiting(evictable_after)?;
    // The evicted connection's task gives its slot back as soon as it runs.
    tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned()).await.ok()?.ok()
}

/// How long a newcomer waits for the slot of the connection closed for it.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// What the endpoint knows of each connection: whether it is waiting for a request head, and
/// since when, and how to close it.
#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
    connections: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

struct ConnectionState {
    id: u64,
    /// Milliseconds (since the registry started) from which it has waited for a request head;
    /// `BUSY` while a request is being answered.
    waiting_since_ms: AtomicU64,
    evict: CancellationToken,
}

const BUSY: u64 = u64::MAX;

impl Registry {
    fn now_ms(&self) -> u64 {
        let started = self.started.get_or_init(std::time::Instant::now);
        u64::try_from(started.elapsed().as_millis()).unwrap_or(BUSY - 1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnectionState>>> {
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self) -> Arc<ConnectionState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState {
            id,
            waiting_since_ms: AtomicU64::new(self.now_ms()),
            evict: CancellationToken::new(),
        });
        self.lock().insert(id, state.clone());
        state
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn mark_busy(&self, state: &ConnectionState) {
        state.waiting_since_ms.store(BUSY, Ordering::Relaxed);
    }

    fn mark_waiting(&self, state: &ConnectionState) {
        state.waiting_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Closes the connection waiting longest for a request head; `Some` if there was one. One
    /// that has waited less than `evictable_after` is left alone: a client that asks at once
    /// (a health check) has that long to send its request, however fast others reconnect.
    fn evict_longest_waiting(&self, evictable_after: Duration) -> Option<()> {
        let after_ms = u64::try_from(evictable_after.as_millis()).unwrap_or(u64::MAX);
        let newest_evictable = self.now_ms().checked_sub(after_ms)?;
        let connections = self.lock();
        let victim = connections
            .values()
            .filter(|c| c.waiting_since_ms.load(Ordering::Relaxed) <= newest_evictable)
            .filter(|c| !c.evict.is_cancelled())
            .min_by_key(|c| c.waiting_since_ms.load(Ordering::Relaxed))?;
        debug!("stats endpoint full: closing the connection that waited longest for a request");
        victim.evict.cancel();
        Some(())
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    registry: &Arc<Registry>,
    state: &Arc<ConnectionState>,
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
    let watched = state.clone();
    let registry = registry.clone();
    let service = service_fn(move |request| {
        let handler = handler.clone();
        let state = watched.clone();
        let registry = registry.clone();
        async move {
            registry.mark_busy(&state);
            let response = router::handle(&handler, request, peer).await;
            registry.mark_waiting(&state);
            Ok::<_, Infallible>(response)
        }
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
        // Closed for a newcomer: nothing in flight (it was waiting for a head), so at once.
        _ = state.evict.cancelled() => return,
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
