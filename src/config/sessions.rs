//! `[sessions]` (the stats endpoint), `[telemetry]` and `[logging]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError};
use crate::secret::Secret;

pub const DEFAULT_STATS_API_ENABLED: bool = false;
pub const DEFAULT_STATS_API_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const DEFAULT_STATS_API_PORT: u16 = 9090;

pub const DEFAULT_TELEMETRY_ENABLED: bool = true;
pub const DEFAULT_TELEMETRY_MAX_EVENTS: usize = 256;
pub const DEFAULT_TELEMETRY_RETENTION_HOURS: u64 = 6;

pub const DEFAULT_LOG_LEVEL: &str = "info";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    pub stats_api_enabled: bool,
    pub stats_api_bind_address: IpAddr,
    pub stats_api_port: u16,
    /// When set, every stats route requires `Authorization: Bearer <token>`.
    pub stats_api_token: Option<Secret>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            stats_api_enabled: DEFAULT_STATS_API_ENABLED,
            stats_api_bind_address: DEFAULT_STATS_API_BIND_ADDRESS,
            stats_api_port: DEFAULT_STATS_API_PORT,
            stats_api_token: None,
        }
    }
}

impl SessionsConfig {
    pub fn stats_api_addr(&self) -> SocketAddr {
        SocketAddr::new(self.stats_api_bind_address, self.stats_api_port)
    }
}

impl Config {
    pub(super) fn validate_sessions(&self) -> Result<(), ConfigError> {
        // An empty token is matched by Basic credentials with an empty password (`user:`), so it
        // guards nothing; one of only whitespace is a mistake as surely. The message never
        // quotes the value.
        if self.sessions.stats_api_token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
            return Err(invalid(
                "sessions.stats_api_token",
                "is empty (or only whitespace), which guards nothing: Basic credentials with an \
                 empty password match an empty token. Set a token, or remove the key to serve \
                 the stats endpoint without one",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub enabled: bool,
    pub max_events: usize,
    pub retention_hours: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: DEFAULT_TELEMETRY_ENABLED,
            max_events: DEFAULT_TELEMETRY_MAX_EVENTS,
            retention_hours: DEFAULT_TELEMETRY_RETENTION_HOURS,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A level (`info`) or a `tracing` filter directive (`poolsocks=debug,warn`).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: DEFAULT_LOG_LEVEL.to_string(), format: LogFormat::Pretty }
    }
}
