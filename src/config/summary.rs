//! The one-screen summary `poolsocks --check` prints for a valid file: what will run.

use std::fmt::Write;

use super::{config_hash, Config, RuleAction, SocksMethod};

/// A few aligned lines: listener, pool, users and rules, stats endpoint, what a RustSocks file
/// had that is accepted but not used. No secret appears, only whether one is set.
pub fn summary(config: &Config) -> String {
    let server = &config.server;
    let pool = &server.pool;
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "  {label:<16}{text}");
    };
    line(
        "listener",
        format!(
            "{} (at most {} clients, handshake {} ms, session idle {} s)",
            server.bind_addr(),
            server.max_connections,
            server.handshake_timeout_ms,
            server.session_idle_timeout_secs
        ),
    );
    let auth = match config.auth.method() {
        SocksMethod::None => "none (no authentication)".to_string(),
        SocksMethod::Userpass => format!(
            "userpass, {} user(s); {} failed logins per {} s per address",
            config.auth.users.len(),
            config.auth.login_failure_limit,
            config.auth.login_failure_window_secs
        ),
    };
    line("auth", auth);
    let networks = if config.access.client_networks.is_empty() {
        "any client".to_string()
    } else {
        format!("{} client network(s)", config.access.client_networks.len())
    };
    let default = match config.access.default_action {
        RuleAction::Allow => "allow",
        RuleAction::Deny => "deny",
    };
    line(
        "access",
        format!("{} rule(s), otherwise {default}; {networks}", config.access.rules.len()),
    );
    let pool_text = if pool.enabled {
        format!(
            "on: {} spares per destination, {} in all, idle {} s, connect {} ms, {} destinations \
             tracked at most",
            pool.max_idle_per_dest,
            pool.max_total_idle,
            pool.idle_timeout_secs,
            pool.connect_timeout_ms,
            pool.max_destinations
        )
    } else {
        format!("off (direct dials, connect {} ms)", pool.connect_timeout_ms)
    };
    line("pool", pool_text);
    let sessions = &config.sessions;
    let stats = if sessions.stats_api_enabled {
        format!(
            "{} ({})",
            sessions.stats_api_addr(),
            if sessions.stats_api_token.is_some() { "token required" } else { "no token" }
        )
    } else {
        "off".to_string()
    };
    line("stats endpoint", stats);
    let telemetry = &config.telemetry;
    line(
        "telemetry",
        if telemetry.enabled {
            format!("on, {} events, {} h", telemetry.max_events, telemetry.retention_hours)
        } else {
            "off".to_string()
        },
    );
    line(
        "logging",
        format!("{}, {:?}", config.logging.level, config.logging.format).to_lowercase(),
    );
    line("config hash", config_hash(config));
    if !config.rustsocks.is_empty() {
        line(
            "not used",
            format!("{} (RustSocks; accepted, not used)", config.rustsocks.accepted.join(", ")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_parts_and_no_secret() {
        let config = Config::from_toml(
            "[server.pool]\nenabled = true\n[[auth.users]]\nusername = \"a\"\npassword = \"pw-9f\"\n\
             [sessions]\nstats_api_enabled = true\nstats_api_token = \"tok-77\"\n\
             [acl]\nenabled = false\n",
            None,
        )
        .expect("valid");
        let text = summary(&config);
        for expected in
            ["127.0.0.1:1080", "1 user(s)", "0 rule(s)", "on: 4 spares", "token required"]
        {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        assert!(text.contains("accepted, not used") && text.contains("[acl]"), "{text}");
        assert!(!text.contains("pw-9f") && !text.contains("tok-77"), "{text}");
        assert!(text.lines().count() <= 24, "one screen:\n{text}");
    }
}
