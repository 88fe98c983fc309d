//! The SOCKS5 server as a library: [`Server::run`] serves a listener until a shutdown future
//! completes, then drains. `main` only parses arguments and calls it; tests call it on port 0.

mod accept;
pub mod auth;
mod bind;
mod bind_waits;
mod buffers;
mod copy;
pub mod cut;
pub mod fd_limit;
mod handler;
pub mod limit;
pub mod login_limit;
pub mod metrics;
pub mod proxy_header;
pub mod relay;
pub mod reload;
mod udp;
pub mod verify_queue;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access::{AccessPolicy, SharedPolicy};
use crate::config::Config;
use crate::descriptors::{Budgets, DescriptorBudget};
use crate::pool::{Pool, PoolError, PoolOptions};
use crate::resolve::{DnsResolver, Resolver};
use crate::telemetry::Telemetry;
use crate::upstream::{Connector, Dialer, DirectConnector, PolicyDialer};
use auth::Authenticator;
use metrics::ServerMetrics;
pub use reload::{LogLevelHook, ReloadError, ReloadReport, Reloader};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the connection pool: {0}")]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Stats(#[from] crate::stats::StatsError),
    #[error("cannot start the DNS resolver: {0}")]
    Resolver(#[from] crate::resolve::ResolveError),
}

/// A configured server, ready to run on a listener.
pub struct Server {
    config: Config,
    access: SharedPolicy,
    resolver: Arc<dyn Resolver>,
    /// Extra descriptors for lookups, UDP associations and BINDs (`crate::descriptors`).
    descriptors: Arc<DescriptorBudget>,
    connector: Arc<dyn Connector>,
    pool: Option<Pool>,
    metrics: Arc<ServerMetrics>,
    telemetry: Telemetry,
    /// Bound in `build` when `[sessions] stats_api_enabled`, so a taken port fails at start-up.
    stats_listener: Option<TcpListener>,
    readiness: crate::stats::Readiness,
    dialer: Arc<dyn Dialer>,
    /// Set by `with_connector`: a reload keeps that connector.
    injected: bool,
    reloader: Reloader,
    reload_requests: Option<reload::Requests>,
    log_level: Option<LogLevelHook>,
}

impl Server {
    /// Builds the server's parts (the upstream connector) from a validated config, resolving
    /// names with the DNS resolver `[server.dns]` describes.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let budgets = Budgets::split(fd_limit::extra_descriptors(&config));
        let resolver =
            DnsResolver::from_config(&config.server.dns)?.with_descriptors(budgets.lookups.clone());
        Self::build_with(config, Arc::new(resolver), budgets).await
    }

    /// Like [`Server::build`], with names resolved by `resolver` (tests inject a static one).
    pub async fn build_with_resolver(
        config: Config,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, ServerError> {
        let budgets = Budgets::split(fd_limit::extra_descriptors(&config));
        Self::build_with(config, resolver, budgets).await
    }

    async fn build_with(
        config: Config,
        resolver: Arc<dyn Resolver>,
        budgets: Budgets,
    ) -> Result<Self, ServerError> {
        let policy = AccessPolicy::from_config(&config);
        if let Some(guard) = policy.host_guard() {
            info!(
                own_addresses = guard.own_addresses().len(),
                "listener not on loopback: destinations on loopback, link-local, metadata and \
                 this host's addresses are denied unless an allow rule names their network"
            );
        }
        let access = policy.shared();
        let telemetry = Telemetry::new(&config.telemetry);
        // Pooled or direct, every dial goes through the access rules. A name's second
        // connect attempt shares the lookups' budget: both are a name's extra sockets.
        let dialer: Arc<dyn Dialer> = Arc::new(
            PolicyDialer::new(access.clone(), resolver.clone()).with_descriptors(budgets.lookups),
        );
        let descriptors = budgets.sessions;
        let options = PoolOptions::from_server_config(&config.server);
        let (connector, pool): (Arc<dyn Connector>, _) = if config.server.pool.enabled {
            let pool = Pool::spawn(options, dialer.clone(), telemetry.clone()).await?;
            (Arc::new(pool.clone()), Some(pool))
        } else {
            (Arc::new(DirectConnector::with_dialer(dialer.clone(), options.dial_limits())), None)
        };
        let metrics = Arc::new(ServerMetrics::default());
        let stats_listener = if config.sessions.stats_api_enabled {
            Some(crate::stats::bind(&config).await?)
        } else {
            None
        };
        let readiness = crate::stats::Readiness::new();
        let (reloader, reload_requests) = Reloader::channel();
        Ok(Server {
            config,
            access,
            resolver,
            descriptors,
            connector,
            pool,
            metrics,
            telemetry,
            stats_listener,
            readiness,
            dialer,
            injected: false,
            reloader,
            reload_requests: Some(reload_requests),
            log_level: None,
        })
    }

    /// Asks the running server to reload (SIGHUP in `main`; tests call it directly).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// How a reload applies `logging.level` (`main` owns the log subscriber).
    pub fn with_log_level_hook(mut self, hook: LogLevelHook) -> Self {
        self.log_level = Some(hook);
        self
    }

    /// Replaces the upstream connector (harnesses inject their own).
    pub fn with_connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = connector;
        self.injected = true;
        self
    }

    pub fn metrics(&self) -> Arc<ServerMetrics> {
        self.metrics.clone()
    }

    pub fn telemetry(&self) -> Telemetry {
        self.telemetry.clone()
    }

    /// Where the stats endpoint listens, when `[sessions] stats_api_enabled` (tests bind port 0).
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.stats_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// What resolves destination names (the UDP relay and BIND use it too).
    pub fn resolver(&self) -> Arc<dyn Resolver> {
        self.resolver.clone()
    }

    /// The connection pool, when `[server.pool] enabled = true`.
    pub fn pool(&self) -> Option<Pool> {
        self.pool.clone()
    }

    /// Serves `listener` until `shutdown` completes. Then it stops accepting at once, lets
    /// sessions in flight finish for up to `shutdown_grace_secs`, cuts the rest and returns.
    pub async fn run(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let live = crate::config::LiveConfig::new(self.config.clone());
        let live_pool = Arc::new(crate::stats::LivePool::new(self.pool.clone()));
        let stats = self.stats_listener.take().map(|stats_listener| {
            let ctx = crate::stats::StatsContext::new(
                self.config.clone(),
                self.telemetry.clone(),
                self.metrics.clone(),
            )
            .with_live_config(live.clone())
            .with_pool_source(live_pool.clone())
            .with_readiness(self.readiness.clone());
            crate::stats::spawn(stats_listener, ctx)
        });
        self.readiness.set_listening(true);
        let bind_waits = bind_waits::BindWaits::for_this_host();
        let server = &self.config.server;
        let auth = Authenticator::with_counters(&self.config.auth, self.metrics.auth_counters());
        let shared = reload::Shared {
            metrics: &self.metrics,
            telemetry: &self.telemetry,
            resolver: &self.resolver,
            descriptors: &self.descriptors,
            bind_waits: &bind_waits,
        };
        let ctx = Arc::new(ArcSwap::from_pointee(reload::context(
            &self.config,
            auth,
            self.access.clone(),
            self.connector.clone(),
            shared,
        )));
        let limit = limit::ConnectionLimit::new(server.max_connections);
        let runtime = reload::Runtime {
            config: live.clone(),
            contexts: ctx.clone(),
            limit: limit.clone(),
            pool: live_pool.clone(),
            access: self.access.clone(),
            dialer: self.dialer.clone(),
            telemetry: self.telemetry.clone(),
            metrics: self.metrics.clone(),
            resolver: self.resolver.clone(),
            descriptors: self.descriptors.clone(),
            bind_waits: bind_waits.clone(),
            injected: self.injected.then(|| self.connector.clone()),
            log_level: self.log_level.take(),
        };
        let reloads =
            self.reload_requests.take().map(|requests| tokio::spawn(runtime.serve(requests)));
        let tracker = TaskTracker::new();
        let cut = cut::Cut::new();
        let stop = CancellationToken::new();

        {
            let accepting = accept::accept_loop(&listener, limit, ctx, &tracker, &cut, &stop);
            tokio::pin!(accepting);
            tokio::select! {
                _ = &mut accepting => {}
                _ = shutdown => {
                    // /health answers 503 from this moment on, before anything else happens,
                    // so a load balancer's health check takes the instance out while it drains.
                    self.readiness.set_listening(false);
                    let delay = live.current().server.shutdown_delay();
                    if !delay.is_zero() {
                        info!(?delay, "shutting down: /health answers 503; still accepting until the delay ends");
                        tokio::select! {
                            _ = &mut accepting => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    stop.cancel();
                }
            }
            accepting.await;
        }
        self.readiness.set_listening(false);
        // Closing the listener now makes new clients fail fast instead of queueing (with
        // reuse_port, the kernel sends them to the other processes on the port).
        drop(listener);

        tracker.close();
        let grace = live.current().server.shutdown_grace();
        if !tracker.is_empty() {
            info!(sessions = tracker.len(), ?grace, "shutting down: draining sessions");
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(sessions = tracker.len(), "grace period over: cutting remaining sessions");
            cut.fire();
            tracker.wait().await;
        }
        // The endpoint stays up while sessions drain (operators watch the drain), then stops.
        if let Some(stats) = stats {
            if let Err(e) = stats.stop().await {
                warn!(error = %e, "stats endpoint");
            }
        }
        if let Some(reloads) = reloads {
            reloads.abort();
        }
        if let Some(pool) = live_pool.get() {
            // Closes every spare, so the process leaves no half-open upstream connection behind.
            pool.shutdown().await;
        }
        info!("shut down");
        Ok(())
    }
}

/// The listen backlog: what tokio's own `TcpListener::bind` uses.
#[cfg(unix)]
const LISTEN_BACKLOG: u32 = 1024;

/// Binds `config.server`'s address (with SO_REUSEPORT when `reuse_port`, so several processes
/// can share the port and the kernel spreads new connections over them).
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    let addr = config.server.bind_addr();
    let bound = if config.server.reuse_port {
        bind_reuse_port(addr)
    } else {
        TcpListener::bind(addr).await
    };
    bound.map_err(|source| ServerError::Bind { addr, source })
}

#[cfg(unix)]
fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(not(unix))]
fn bind_reuse_port(_addr: SocketAddr) -> std::io::Result<TcpListener> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "SO_REUSEPORT needs Unix"))
}

/// Builds a server from `config` and runs it on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::build(config).await?.run(listener, shutdown).await
}
