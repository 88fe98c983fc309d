//! `[server]` and `[server.pool]`: the SOCKS listener, its limits, and the upstream pool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const DEFAULT_BIND_PORT: u16 = 1080;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;

pub const DEFAULT_POOL_ENABLED: bool = false;
pub const DEFAULT_MAX_IDLE_PER_DEST: usize = 4;
pub const DEFAULT_MAX_TOTAL_IDLE: usize = 100;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 90;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub bind_address: IpAddr,
    pub bind_port: u16,
    /// Client connections served at once; the next one is accepted and closed at once.
    pub max_connections: usize,
    /// Time a client has to finish greeting, authentication and request.
    pub handshake_timeout_ms: u64,
    /// How long relays may drain after SIGINT/SIGTERM before they are cut.
    pub shutdown_grace_secs: u64,
    /// Listening beyond loopback without authentication makes an open proxy; it must be asked for.
    pub allow_open_proxy: bool,
    pub pool: PoolConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind_address: DEFAULT_BIND_ADDRESS,
            bind_port: DEFAULT_BIND_PORT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            allow_open_proxy: false,
            pool: PoolConfig::default(),
        }
    }
}

impl ServerConfig {
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind_address, self.bind_port)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// `[server.pool]`: the upstream connection pool (see README, "The pool").
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub enabled: bool,
    /// Spares kept per destination.
    pub max_idle_per_dest: usize,
    /// Spares kept across all destinations.
    pub max_total_idle: usize,
    /// A spare older than this is closed.
    pub idle_timeout_secs: u64,
    /// Limit on each connect attempt, pooled or not.
    pub connect_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: DEFAULT_POOL_ENABLED,
            max_idle_per_dest: DEFAULT_MAX_IDLE_PER_DEST,
            max_total_idle: DEFAULT_MAX_TOTAL_IDLE,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

impl PoolConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}
