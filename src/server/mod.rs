//! The SOCKS5 server as a library: [`Server::run`] serves a listener until a shutdown future
//! completes, then drains. `main` only parses arguments and calls it; tests call it on port 0.

mod accept;
pub mod auth;
mod handler;
pub mod metrics;
pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::upstream::{Connector, DirectConnector};
use auth::Authenticator;
use handler::HandlerContext;
use metrics::ServerMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A configured server, ready to run on a listener.
pub struct Server {
    config: Config,
    connector: Arc<dyn Connector>,
    metrics: Arc<ServerMetrics>,
}

impl Server {
    /// Builds the server's parts (the upstream connector) from a validated config.
    pub async fn build(config: Config) -> Result<Self, ServerError> {
        let connector: Arc<dyn Connector> =
            Arc::new(DirectConnector::new(config.server.pool.connect_timeout()));
        Ok(Server { config, connector, metrics: Arc::new(ServerMetrics::default()) })
    }

    /// Replaces the upstream connector (harnesses inject their own).
    pub fn with_connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = connector;
        self
    }

    pub fn metrics(&self) -> Arc<ServerMetrics> {
        self.metrics.clone()
    }

    /// Serves `listener` until `shutdown` completes. Then it stops accepting at once, lets
    /// sessions in flight finish for up to `shutdown_grace_secs`, cuts the rest and returns.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let server = &self.config.server;
        let ctx = Arc::new(HandlerContext {
            auth: Authenticator::from_config(&self.config.auth),
            connector: self.connector.clone(),
            handshake_timeout: server.handshake_timeout(),
            metrics: self.metrics.clone(),
        });
        let limit = Arc::new(Semaphore::new(server.max_connections));
        let tracker = TaskTracker::new();
        let cut = CancellationToken::new();
        let stop = CancellationToken::new();

        {
            let accepting = accept::accept_loop(&listener, limit, ctx, &tracker, &cut, &stop);
            tokio::pin!(accepting);
            tokio::select! {
                _ = &mut accepting => {}
                _ = shutdown => stop.cancel(),
            }
            accepting.await;
        }
        // Closing the listener now makes new clients fail fast instead of queueing.
        drop(listener);

        tracker.close();
        let grace = server.shutdown_grace();
        if !tracker.is_empty() {
            info!(sessions = tracker.len(), ?grace, "shutting down: draining sessions");
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(sessions = tracker.len(), "grace period over: cutting remaining sessions");
            cut.cancel();
            tracker.wait().await;
        }
        info!("shut down");
        Ok(())
    }
}

/// Binds `config.server`'s address and serves until `shutdown`.
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    let addr = config.server.bind_addr();
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// Builds a server from `config` and runs it on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::build(config).await?.run(listener, shutdown).await
}
