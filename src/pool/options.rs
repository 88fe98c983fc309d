//! Everything a pool is built from: the `[server.pool]` config plus the knobs a harness may turn.

use std::time::Duration;

use super::admission::Admission;
use super::refill::RefillMode;
use ipnet::IpNet;

use crate::config::{PoolConfig, PortRange};
use crate::upstream::DialLimits;

/// Pool settings. [`PoolOptions::from_config`] gives the daemon's; harnesses adjust fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolOptions {
    pub max_idle_per_dest: usize,
    pub max_total_idle: usize,
    /// A spare older than this is closed (by the Janitor, or skipped at checkout).
    pub idle_timeout: Duration,
    /// Limit on each address a dial tries, background or for a miss.
    pub connect_timeout: Duration,
    /// Limit on a whole dial (resolution and every address).
    pub connect_phase_timeout: Duration,
    /// How long a handler waits for the pool's answer before dialing directly.
    pub checkout_timeout: Duration,
    /// Janitor period; `None` runs it only when asked (`Pool::run_janitor`).
    pub janitor_period: Option<Duration>,
    /// A destination with nothing idle, nothing in use and no traffic for this long loses its
    /// PoolManager at the next Janitor pass.
    pub cold_after: Duration,
    /// How long the Directory waits for one PoolManager during a sweep.
    pub sweep_call_timeout: Duration,
    /// First and longest pause of background dials after consecutive failures.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub refill: RefillMode,
    /// Destinations on these ports get no spares (`[server.pool] exclude_ports`).
    pub exclude_ports: Vec<PortRange>,
    /// Destinations in these networks get no spares (`[server.pool] exclude_networks`).
    pub exclude_networks: Vec<IpNet>,
    /// When a destination gets a PoolManager (see `admission`).
    pub admission: Admission,
    /// Destinations with a PoolManager at most (`[server.pool] max_destinations`).
    pub max_destinations: usize,
}

impl PoolOptions {
    pub fn from_config(config: &PoolConfig) -> Self {
        let idle_timeout = config.idle_timeout();
        PoolOptions {
            max_idle_per_dest: config.max_idle_per_dest,
            max_total_idle: config.max_total_idle,
            idle_timeout,
            connect_timeout: config.connect_timeout(),
            connect_phase_timeout: Duration::from_millis(
                crate::config::DEFAULT_CONNECT_PHASE_TIMEOUT_MS,
            )
            .max(config.connect_timeout()),
            checkout_timeout: Duration::from_millis(500),
            // Expiry is at most a tenth of the timeout late (and checkout skips old spares).
            janitor_period: Some(
                (idle_timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(10)),
            ),
            cold_after: idle_timeout.max(Duration::from_secs(1)),
            sweep_call_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            refill: RefillMode::Adaptive,
            exclude_ports: config.exclude_ports.clone(),
            exclude_networks: config.exclude_networks.clone(),
            // A spare older than the idle timeout is closed anyway: a destination not asked
            // for again within it could not have used one.
            admission: Admission::SecondSighting { window: idle_timeout },
            max_destinations: config.max_destinations,
        }
    }
}

impl PoolOptions {
    /// The daemon's options: the pool's section plus the server-wide connect phase.
    pub fn from_server_config(server: &crate::config::ServerConfig) -> Self {
        let mut options = Self::from_config(&server.pool);
        options.connect_phase_timeout = server.connect_phase_timeout();
        options
    }

    /// Whether a connection to `addr` must not become a spare.
    pub fn excluded_address(&self, addr: std::net::IpAddr) -> bool {
        let addr = match addr {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.exclude_networks.iter().any(|net| net.contains(&addr))
    }

    pub fn dial_limits(&self) -> DialLimits {
        DialLimits { per_address: self.connect_timeout, overall: self.connect_phase_timeout }
    }
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self::from_config(&PoolConfig::default())
    }
}
