//! What the endpoint reads from (config, pool, telemetry, server counters) and its limits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::PoolStatsSource;
use crate::config::Config;
use crate::pool::Pool;
use crate::server::metrics::ServerMetrics;
use crate::telemetry::Telemetry;

/// Limits that keep the endpoint cheap for the proxy whatever its clients do.
#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// How long a request waits for the pool's counters before answering without them.
    pub pool_call_timeout: Duration,
    /// Pool counters younger than this are served again instead of asking the actors: a
    /// client polling in a loop costs the pool at most one call per period.
    pub pool_stats_ttl: Duration,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head (request line plus headers); hyper answers 431 beyond it.
    /// hyper does not accept less than 8 KiB.
    pub max_request_head_bytes: usize,
    /// HTTP connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// A connection is closed (after its current response) this long after it was accepted,
    /// so keep-alive cannot hold a connection slot forever.
    pub connection_lifetime: Duration,
    /// At shutdown, how long responses in flight may take to finish.
    pub shutdown_grace: Duration,
    /// At the connection limit, a connection that has waited this long for a request head may
    /// be closed to serve a newcomer (see `server`); younger ones are left alone.
    pub evictable_after: Duration,
    /// Destinations given their own labelled series in `/metrics` (the busiest ones); the rest
    /// are only in the totals, so a client naming many destinations cannot blow up cardinality.
    pub metrics_destination_cap: usize,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions {
            pool_call_timeout: Duration::from_secs(1),
            pool_stats_ttl: Duration::from_millis(250),
            header_read_timeout: Duration::from_secs(5),
            max_request_head_bytes: 16 * 1024,
            max_connections: 64,
            connection_lifetime: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(2),
            evictable_after: Duration::from_millis(100),
            metrics_destination_cap: 50,
        }
    }
}

/// Whether the daemon is ready for traffic: set by whoever owns the SOCKS listener once it
/// listens, cleared when it starts draining. Cheap to clone; clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    listening: Arc<AtomicBool>,
}

impl Readiness {
    /// Not ready until [`Readiness::set_listening`] says so.
    pub fn new() -> Self {
        Self::default()
    }

    /// Already listening (for callers that start the endpoint after the listener is bound).
    pub fn listening() -> Self {
        let readiness = Self::default();
        readiness.set_listening(true);
        readiness
    }

    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }
}

/// Everything the endpoint reads. Passwords and the stats token stay inside `config` and are
/// never serialised (the JSON lists chosen fields only).
pub struct StatsContext {
    pub config: Arc<Config>,
    /// `None` when the pool is off: the routes then report zeros and `enabled: false`.
    pub pool: Option<Arc<dyn PoolStatsSource>>,
    pub telemetry: Telemetry,
    pub server_metrics: Arc<ServerMetrics>,
    pub readiness: Readiness,
    pub options: StatsOptions,
    pub(crate) started: Instant,
}

impl StatsContext {
    /// A context without a pool, readiness not yet set, default limits.
    pub fn new(config: Config, telemetry: Telemetry, server_metrics: Arc<ServerMetrics>) -> Self {
        StatsContext {
            config: Arc::new(config),
            pool: None,
            telemetry,
            server_metrics,
            readiness: Readiness::new(),
            options: StatsOptions::default(),
            started: Instant::now(),
        }
    }

    /// Reads pool counters from `pool` (`None` keeps the pool reported as off).
    pub fn with_pool(mut self, pool: Option<Pool>) -> Self {
        self.pool = pool.map(|p| Arc::new(p) as Arc<dyn PoolStatsSource>);
        self
    }

    /// Reads pool counters from any source (a harness's stand-in, a wrapper).
    pub fn with_pool_source(mut self, source: Arc<dyn PoolStatsSource>) -> Self {
        self.pool = Some(source);
        self
    }

    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    pub fn with_options(mut self, options: StatsOptions) -> Self {
        self.options = options;
        self
    }
}
