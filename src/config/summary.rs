//! The one-screen summary `poolsocks --check` prints for a valid file: what will run.

use std::fmt::Write;

use super::{config_hash, Config, RuleAction, RuleConfig, SocksMethod};
use crate::logsafe::Escaped;

/// A few aligned lines: listener, pool, users, each access rule and what is denied whatever the
/// rules, stats endpoint, what a RustSocks file had that is accepted but not used. No secret
/// appears, only whether one is set.
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
    let access = &config.access;
    line(
        "access",
        format!(
            "{} rule(s), first match wins, otherwise {}",
            access.rules.len(),
            action(access.default_action)
        ),
    );
    for (index, rule) in access.rules.iter().enumerate() {
        line(&format!("rule {}", index + 1), describe_rule(rule));
    }
    line(
        "client networks",
        if access.client_networks.is_empty() {
            "any".to_string()
        } else {
            list(&access.client_networks)
        },
    );
    line(
        "built-in deny",
        if server.listens_on_loopback() {
            "unspecified only (listener on loopback)"
        } else {
            "loopback, link-local, metadata, own addresses (listener not loopback); unspecified"
        }
        .to_string(),
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

fn action(action: RuleAction) -> &'static str {
    match action {
        RuleAction::Allow => "allow",
        RuleAction::Deny => "deny",
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `deny networks 127.0.0.0/8, ::1/128; domains example.com; ports 25, 6000-6063`.
fn describe_rule(rule: &RuleConfig) -> String {
    let mut text = action(rule.action).to_string();
    let domains: Vec<String> = rule.domains.iter().map(|d| Escaped(d).to_string()).collect();
    let criteria = [
        ("networks", list(&rule.networks)),
        ("domains", domains.join(", ")),
        ("ports", list(&rule.ports)),
    ];
    let mut first = true;
    for (name, values) in criteria.iter().filter(|(_, values)| !values.is_empty()) {
        text.push_str(if first { " " } else { "; " });
        first = false;
        let _ = write!(text, "{name} {values}");
    }
    text
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
        for expected in [
            "127.0.0.1:1080",
            "1 user(s)",
            "0 rule(s)",
            "client networks any",
            "built-in deny   unspecified only (listener on loopback)",
            "on: 4 spares",
            "token required",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
        assert!(text.contains("accepted, not used") && text.contains("[acl]"), "{text}");
        assert!(!text.contains("pw-9f") && !text.contains("tok-77"), "{text}");
        assert!(text.lines().count() <= 24, "one screen:\n{text}");
    }

    #[test]
    fn each_rule_and_every_client_network_has_its_line() {
        let config = Config::from_toml(
            "[server]\nbind_address = \"0.0.0.0\"\nallow_open_proxy = true\n\
             [access]\ndefault_action = \"deny\"\n\
             client_networks = [\"10.0.0.0/8\", \"fc00::/7\"]\n\
             [[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.0/8\", \"::1/128\"]\n\
             [[access.rules]]\naction = \"allow\"\ndomains = [\"example.com\"]\n\
             ports = [443, \"8000-8999\"]\n",
            None,
        )
        .expect("valid");
        let text = summary(&config);
        for expected in [
            "access          2 rule(s), first match wins, otherwise deny\n",
            "rule 1          deny networks 127.0.0.0/8, ::1/128\n",
            "rule 2          allow domains example.com; ports 443, 8000-8999\n",
            "client networks 10.0.0.0/8, fc00::/7\n",
            "built-in deny   loopback, link-local, metadata, own addresses (listener not \
             loopback); unspecified\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
    }
}
