//! The TOML configuration, laid out like RustSocks' so its users can bring their files.
//!
//! Parsing is strict (`deny_unknown_fields`: a typo is an error, not a silently ignored key),
//! every default is a named constant, and [`Config::validate`] checks what types cannot.

mod access;
mod auth;
mod compare;
mod file;
mod live;
mod loosening;
mod parse_error;
mod rustsocks;
mod server;
mod sessions;
mod summary;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use access::{AccessConfig, PortRange, RuleAction, RuleConfig};
pub use auth::*;
pub use compare::{changed_keys, config_hash, is_reloadable, RELOADABLE_KEYS};
pub use file::MAX_CONFIG_BYTES;
pub use live::{LiveConfig, LoadStatus};
pub use loosening::{loosenings, unconfirmed, Loosening};
pub use rustsocks::RustsocksCompat;
pub use server::*;
pub use sessions::*;
pub use summary::summary;

/// The commented example shipped in `config/`, also what `poolsocks` runs on with no arguments.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/poolsocks.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot read config file {path}: it is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "cannot read config file {path}: it is {size} bytes, more than the {limit} a config may be"
    )]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
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

pub(crate) fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
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

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub access: AccessConfig,
    pub sessions: SessionsConfig,
    pub telemetry: TelemetryConfig,
    pub logging: LoggingConfig,
    /// RustSocks sections the file had that poolsocks accepts but does not use.
    #[serde(skip)]
    pub rustsocks: RustsocksCompat,
}

impl Config {
    /// Parses and validates a TOML document. `origin` names the file in error messages.
    pub fn from_toml(text: &str, origin: Option<&Path>) -> Result<Self, ConfigError> {
        // RustSocks-only sections are blanked (lines kept) or refused when their feature is on.
        let (text, rustsocks) = rustsocks::set_aside(text, origin)?;
        // Named by position and key, never by the text: the line may hold a secret.
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: origin.map(Path::to_path_buf),
            message: parse_error::ParseProblem::from_toml(&text, &e).to_string(),
        })?;
        config.rustsocks = rustsocks;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, problem, .. } => ConfigError::Invalid {
                origin: origin.map(Path::to_path_buf),
                line: config.line_of_problem(&text, key),
                key,
                problem,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// The line `validate`'s complaint about `key` points at. A rule's key is assigned once per
    /// rule, so the rule at fault is found by its position.
    fn line_of_problem(&self, text: &str, key: &str) -> Option<usize> {
        match self.access.rule_problem() {
            Some((index, _, _)) if key.starts_with("access.rules") => {
                access::line_of_rule(text, index, key).or_else(|| line_of_key(text, key))
            }
            _ => line_of_key(text, key),
        }
    }

    /// Reads and parses the file at `path`. Blocking: call it off the async runtime.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_text(path).map(|(config, _)| config)
    }

    /// Like [`Config::load`], with the text read (a reload checks which keys it writes).
    pub fn load_with_text(path: &Path) -> Result<(Self, String), ConfigError> {
        let text = file::read(path)?;
        Ok((Self::from_toml(&text, Some(path))?, text))
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
        if server.session_idle_timeout_secs == 0 {
            return Err(invalid("server.session_idle_timeout_secs", "must be greater than 0"));
        }
        if server.connect_phase_timeout_ms == 0 {
            return Err(invalid("server.connect_phase_timeout_ms", "must be greater than 0"));
        }
        if server.udp_idle_timeout_secs == 0 {
            return Err(invalid("server.udp_idle_timeout_secs", "must be greater than 0"));
        }
        if server.bind_timeout_secs == 0 {
            return Err(invalid("server.bind_timeout_secs", "must be greater than 0"));
        }
        if let Some(address) = server.udp_bind_address {
            if address.is_unspecified() || address.is_multicast() {
                return Err(invalid(
                    "server.udp_bind_address",
                    format!(
                        "is {address}: the UDP ASSOCIATE reply tells clients to send there, so it \
                         must be one unicast address of this host (unset, the address each client \
                         reached the listener on)"
                    ),
                ));
            }
        }
        if server.proxy_protocol && server.proxy_protocol_trusted.is_empty() {
            return Err(invalid(
                "server.proxy_protocol_trusted",
                "is empty while server.proxy_protocol = true: no balancer could send a header, so \
                 every client would be refused. List the balancers' addresses",
            ));
        }
        if server.reuse_port && !cfg!(unix) {
            return Err(invalid("server.reuse_port", "is only supported on Unix (SO_REUSEPORT)"));
        }
        if server.dns.timeout_ms == 0 {
            return Err(invalid("server.dns.timeout_ms", "must be greater than 0"));
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
        if pool.max_destinations == 0 {
            return Err(invalid("server.pool.max_destinations", "must be at least 1"));
        }
        if pool.enabled && pool.max_idle_per_dest == 0 {
            return Err(invalid(
                "server.pool.max_idle_per_dest",
                "must be at least 1 when the pool is enabled",
            ));
        }
        self.validate_auth()?;
        self.validate_access()?;
        if !server.listens_on_loopback()
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
        self.validate_sessions()?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_to_the_named_defaults() {
        let config = Config::embedded_default().expect("embedded default config is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.server.bind_addr(), "127.0.0.1:1080".parse().unwrap());
        assert!(!config.server.proxy_protocol);
        assert!(!config.server.reuse_port);
        let trusted: Vec<String> =
            config.server.proxy_protocol_trusted.iter().map(ToString::to_string).collect();
        assert_eq!(trusted, ["127.0.0.0/8", "::1/128"]);
    }

    #[test]
    fn proxy_protocol_needs_someone_to_trust() {
        let text = "[server]\nproxy_protocol = true\nproxy_protocol_trusted = []\n";
        let error = Config::from_toml(text, None).unwrap_err().to_string();
        assert!(error.contains("`server.proxy_protocol_trusted`"), "{error}");
        assert!(error.contains("line 3"), "{error}");
        let text = "[server]\nproxy_protocol = true\nproxy_protocol_trusted = [\"10.0.0.5/32\"]\n";
        assert!(Config::from_toml(text, None).unwrap().server.proxy_protocol);
        let text = "[server]\nproxy_protocol_trusted = [\"10.0.0.5\"]\n";
        assert!(Config::from_toml(text, None).is_err(), "a bare address is not a CIDR");
    }

    #[test]
    fn a_stats_token_of_nothing_is_refused_by_line() {
        for token in ["", "  \t"] {
            let text =
                format!("[sessions]\nstats_api_enabled = true\nstats_api_token = \"{token}\"\n");
            let error = Config::from_toml(&text, None).unwrap_err().to_string();
            assert!(error.contains("`sessions.stats_api_token` is empty"), "{error}");
            assert!(error.contains("line 3"), "{error}");
        }
        let text = "[sessions]\nstats_api_token = \"t0ken\"\n";
        assert!(Config::from_toml(text, None).is_ok());
    }

    #[test]
    fn a_rule_matching_everything_is_refused_by_its_own_line() {
        let text = "[[access.rules]]\naction = \"deny\"\nports = [25]\n\n\
                    [[access.rules]]\naction = \"deny\"\nnetworks = []\n";
        let error = Config::from_toml(text, None).unwrap_err().to_string();
        assert!(error.contains("line 5: `access.rules` (rule 2, deny)"), "{error}");
        assert!(error.contains("access.default_action = \"deny\""), "{error}");
        let text = "[[access.rules]]\naction = \"allow\"\n";
        let error = Config::from_toml(text, None).unwrap_err().to_string();
        assert!(error.contains("line 1: `access.rules` (rule 1, allow)"), "{error}");
        assert!(error.contains("access.default_action = \"allow\""), "{error}");
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
