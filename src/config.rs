//! The TOML configuration, laid out like RustSocks' so its users can bring their files.
//!
//! Parsing is strict (`deny_unknown_fields`: a typo is an error, not a silently ignored key),
//! every default is a named constant, and [`Config::validate`] checks what types cannot.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::secret::Secret;

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

pub const DEFAULT_LOGIN_FAILURE_LIMIT: u32 = 5;
pub const DEFAULT_LOGIN_FAILURE_WINDOW_SECS: u64 = 60;

pub const DEFAULT_STATS_API_ENABLED: bool = false;
pub const DEFAULT_STATS_API_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const DEFAULT_STATS_API_PORT: u16 = 9090;

pub const DEFAULT_TELEMETRY_ENABLED: bool = true;
pub const DEFAULT_TELEMETRY_MAX_EVENTS: usize = 256;
pub const DEFAULT_TELEMETRY_RETENTION_HOURS: u64 = 6;

pub const DEFAULT_LOG_LEVEL: &str = "info";

/// RFC 1929 caps usernames and passwords at 255 bytes.
const MAX_CREDENTIAL_LEN: usize = 255;

/// The commented example shipped in `config/`, also what `poolsocks` runs on with no arguments.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/poolsocks.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config{}: {message}", origin_suffix(.origin))]
    Parse { origin: Option<PathBuf>, message: String },
    #[error("invalid config{}{}: `{key}` {problem}", origin_suffix(.origin), line_suffix(.line))]
    Invalid { origin: Option<PathBuf>, line: Option<usize>, key: &'static str, problem: String },
}

fn origin_suffix(origin: &Option<PathBuf>) -> String {
    origin.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
}

fn line_suffix(line: &Option<usize>) -> String {
    line.map(|n| format!(", line {n}")).unwrap_or_default()
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { origin: None, line: None, key, problem: problem.into() }
}

/// The 1-based line where `key`'s last segment is assigned, if it is assigned exactly once.
/// Good enough to point an operator at the line; the key name is always in the message anyway.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let leaf = key.rsplit('.').next()?;
    let mut lines = text.lines().enumerate().filter(|(_, line)| {
        line.trim_start().strip_prefix(leaf).is_some_and(|rest| rest.trim_start().starts_with('='))
    });
    match (lines.next(), lines.next()) {
        (Some((index, _)), None) => Some(index + 1),
        _ => None,
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub access: AccessConfig,
    pub sessions: SessionsConfig,
    pub telemetry: TelemetryConfig,
    pub logging: LoggingConfig,
}

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

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocksMethod {
    #[default]
    None,
    Userpass,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When absent: `userpass` if `users` lists anyone, else `none`.
    pub socks_method: Option<SocksMethod>,
    pub users: Vec<UserConfig>,
    /// Failed logins a source address may have within the window before it is refused outright.
    pub login_failure_limit: u32,
    pub login_failure_window_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            socks_method: None,
            users: Vec::new(),
            login_failure_limit: DEFAULT_LOGIN_FAILURE_LIMIT,
            login_failure_window_secs: DEFAULT_LOGIN_FAILURE_WINDOW_SECS,
        }
    }
}

impl AuthConfig {
    pub fn method(&self) -> SocksMethod {
        self.socks_method.unwrap_or(if self.users.is_empty() {
            SocksMethod::None
        } else {
            SocksMethod::Userpass
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// Plain text, or an argon2 PHC string (`$argon2id$v=19$...`).
    pub password: Secret,
}

impl UserConfig {
    pub fn password_is_hashed(&self) -> bool {
        self.password.expose().starts_with("$argon2")
    }
}

/// `[access]`: who may use the proxy, and where to.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Client source networks allowed to connect; empty allows any.
    pub client_networks: Vec<IpNet>,
    /// What happens to a destination no rule matches.
    pub default_action: RuleAction,
    /// Destination rules, first match wins.
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    #[default]
    Allow,
    Deny,
}

/// A destination rule. It matches when every criterion it sets matches (an unset criterion
/// matches anything); within a criterion any entry may match.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: RuleAction,
    /// CIDRs, checked against every resolved address (so a name cannot smuggle a denied address).
    #[serde(default)]
    pub networks: Vec<IpNet>,
    /// Domain suffixes: `example.com` matches it and every subdomain.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Ports or ranges: `443` or `"8000-8999"`.
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

/// An inclusive port range, written `80` or `"8000-8999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            Range(String),
        }
        let parse =
            |text: &str| text.trim().parse::<u16>().map_err(|_| format!("bad port {text:?}"));
        let range = match Raw::deserialize(deserializer)? {
            Raw::Port(port) => Ok(PortRange { first: port, last: port }),
            Raw::Range(text) => match text.split_once('-') {
                Some((first, last)) => {
                    parse(first).and_then(|first| Ok(PortRange { first, last: parse(last)? }))
                }
                None => parse(&text).map(|port| PortRange { first: port, last: port }),
            },
        };
        match range {
            Ok(range) if range.first <= range.last => Ok(range),
            Ok(range) => Err(serde::de::Error::custom(format!(
                "port range {}-{} is backwards",
                range.first, range.last
            ))),
            Err(message) => Err(serde::de::Error::custom(format!(
                "{message}: expected a port (443) or a range (\"8000-8999\")"
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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

impl Config {
    /// Parses and validates a TOML document. `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: Option<&Path>) -> Result<Self, ConfigError> {
        // toml's message already names the line, the column and the offending key.
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.map(Path::to_path_buf),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, problem, .. } => ConfigError::Invalid {
                origin: origin.map(Path::to_path_buf),
                line: line_of_key(text, key),
                key,
                problem,
            },
            other => other,
        })?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, Some(path))
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG_TOML, None)
    }

    /// Checks the relations between keys that their types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let server = &self.server;
        if server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if server.handshake_timeout_ms == 0 {
            return Err(invalid("server.handshake_timeout_ms", "must be greater than 0"));
        }
        let pool = &server.pool;
        if pool.connect_timeout_ms == 0 {
            return Err(invalid("server.pool.connect_timeout_ms", "must be greater than 0"));
        }
        if pool.idle_timeout_secs == 0 {
            return Err(invalid("server.pool.idle_timeout_secs", "must be greater than 0"));
        }
        if pool.max_idle_per_dest > pool.max_total_idle {
            return Err(invalid(
                "server.pool.max_idle_per_dest",
                format!(
                    "({}) must not exceed server.pool.max_total_idle ({})",
                    pool.max_idle_per_dest, pool.max_total_idle
                ),
            ));
        }
        if pool.enabled && pool.max_idle_per_dest == 0 {
            return Err(invalid(
                "server.pool.max_idle_per_dest",
                "must be at least 1 when the pool is enabled",
            ));
        }
        self.validate_auth()?;
        self.validate_access()?;
        if !server.bind_address.is_loopback()
            && self.auth.method() == SocksMethod::None
            && !server.allow_open_proxy
        {
            return Err(invalid(
                "server.bind_address",
                format!(
                    "is {} (not loopback) with no authentication: anyone who can reach it could \
                     relay through this proxy. Add [[auth.users]], listen on 127.0.0.1, or set \
                     server.allow_open_proxy = true if an open proxy is really intended",
                    server.bind_address
                ),
            ));
        }
        if self.telemetry.enabled && self.telemetry.max_events == 0 {
            return Err(invalid(
                "telemetry.max_events",
                "must be at least 1 when telemetry is enabled",
            ));
        }
        if self.sessions.stats_api_enabled
            && self.sessions.stats_api_addr() == server.bind_addr()
            && server.bind_port != 0
        {
            return Err(invalid(
                "sessions.stats_api_port",
                format!("({}) is the SOCKS listener's own address", self.sessions.stats_api_port),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            return Err(invalid(
                "logging.level",
                format!("{:?} is not a level or filter: {e}", self.logging.level),
            ));
        }
        Ok(())
    }

    fn validate_access(&self) -> Result<(), ConfigError> {
        for rule in &self.access.rules {
            if let Some(domain) = rule.domains.iter().find(|d| d.trim_matches('.').is_empty()) {
                return Err(invalid(
                    "access.rules.domains",
                    format!("{domain:?} is not a domain suffix"),
                ));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.login_failure_limit == 0 {
            return Err(invalid("auth.login_failure_limit", "must be at least 1"));
        }
        if auth.login_failure_window_secs == 0 {
            return Err(invalid("auth.login_failure_window_secs", "must be greater than 0"));
        }
        for user in auth.users.iter().filter(|user| user.password_is_hashed()) {
            let problem = match argon2::PasswordHash::new(user.password.expose()) {
                Ok(hash) if hash.salt.is_some() && hash.hash.is_some() => continue,
                Ok(_) => "it has no salt or no hash".to_string(),
                Err(e) => e.to_string(),
            };
            return Err(invalid(
                "auth.users.password",
                format!(
                    "of user {:?} looks like an argon2 hash but does not parse: {problem}",
                    user.username
                ),
            ));
        }
        match auth.method() {
            SocksMethod::None if !auth.users.is_empty() => Err(invalid(
                "auth.socks_method",
                format!(
                    "is \"none\" but auth.users lists {} user(s): set socks_method = \"userpass\" or remove the users",
                    auth.users.len()
                ),
            )),
            SocksMethod::Userpass if auth.users.is_empty() => Err(invalid(
                "auth.users",
                "is empty but auth.socks_method is \"userpass\": add [[auth.users]] entries",
            )),
            _ => {
                let mut seen = std::collections::HashSet::new();
                for user in &auth.users {
                    if user.username.is_empty() || user.username.len() > MAX_CREDENTIAL_LEN {
                        return Err(invalid("auth.users.username", "must be 1 to 255 bytes long"));
                    }
                    if user.password.expose().is_empty() || user.password.expose().len() > MAX_CREDENTIAL_LEN {
                        return Err(invalid(
                            "auth.users.password",
                            format!("of user {:?} must be 1 to 255 bytes long", user.username),
                        ));
                    }
                    if !seen.insert(user.username.as_str()) {
                        return Err(invalid(
                            "auth.users.username",
                            format!("{:?} is listed more than once", user.username),
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_to_the_named_defaults() {
        let config = Config::embedded_default().expect("embedded default config is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.server.bind_addr(), "127.0.0.1:1080".parse().unwrap());
    }

    #[test]
    fn auth_method_follows_users_when_unset() {
        let config = Config::from_toml(
            "[[auth.users]]\nusername = \"alice\"\npassword = \"secret\"\n",
            None,
        )
        .unwrap();
        assert_eq!(config.auth.method(), SocksMethod::Userpass);
    }
}
