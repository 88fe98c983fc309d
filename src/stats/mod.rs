//! The stats endpoint: a small hyper 1 HTTP server beside the SOCKS listener.
//!
//! Routes (all `GET`; see README, "Stats endpoint"):
//! - `/api/pool/stats`: the pool's counters as JSON, with a per-destination breakdown;
//! - `/api/telemetry/events`: the telemetry feed, newest first, filtered by query parameters;
//! - `/metrics`: Prometheus text exposition of the pool and the server process;
//! - `/health`: liveness and readiness;
//! - `/`: a self-contained live dashboard polling the JSON routes.
//!
//! With `sessions.stats_api_token` set, every route but `/health` needs the token (see `auth`:
//! a source that sends 10 wrong tokens within 60 s gets 429 for the rest of the window).
//! `/health` stays open: it tells only liveness, readiness and uptime, and a load balancer's
//! check carries no token.
//!
//! It is built so a slow or hostile HTTP client cannot hurt the proxy: pool stats are read from
//! the actors with a timeout and shared between concurrent requests, headers must arrive in
//! time, request heads are size-bounded, connections are counted and have a lifetime.

mod auth;
mod context;
mod dashboard;
mod events;
mod health;
mod metrics;
mod pool_stats;
mod pool_view;
mod query;
mod response;
mod router;
mod server;
mod source;

pub use context::{Readiness, StatsContext, StatsOptions};
pub use query::{EventsQuery, QueryError, MAX_EVENTS_LIMIT};
pub use server::{bind, serve, spawn, StatsHandle};
pub use source::{LivePool, PoolStatsSource};

use std::net::SocketAddr;

/// Why the stats endpoint could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cannot listen for the stats endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the stats endpoint's task failed: {0}")]
    Task(String),
}
