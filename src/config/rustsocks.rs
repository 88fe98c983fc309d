//! RustSocks config files: the sections of features poolsocks does not have are accepted while
//! those features are off, and refused, naming the section, when they are on.
//!
//! RustSocks' own layout (its minimal default config and its full example) has, besides the
//! sections poolsocks shares (`[server]`, `[server.pool]`, `[auth]`, `[sessions]` stats keys,
//! `[telemetry]`, `[logging]`): `[acl]`, `[qos]` (with `[qos.htb]`, `[qos.connection_limits]`),
//! `[metrics]`, `[server.tls]`, `auth.client_method`, `[auth.pam]`, `[auth.gssapi]`, session
//! tracking keys in `[sessions]` and `[sessions.dashboard_auth]`.
//!
//! Before the strict parse (`deny_unknown_fields`), those keys are set aside: their bytes are
//! blanked in a copy of the text (newlines kept), so every other key still gets toml's own
//! error with its own line, and a key neither poolsocks nor RustSocks knows is still refused.
//! Unknown keys inside a RustSocks-only section are refused here, with their line.

use std::ops::Range;
use std::path::Path;

use toml_edit::{ImDocument, Item, Key, TableLike};

use super::ConfigError;

/// What a RustSocks file had that poolsocks accepts but does not use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RustsocksCompat {
    /// Sections and keys accepted, not used, in the order the file has them, each once.
    pub accepted: Vec<String>,
}

impl RustsocksCompat {
    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }
}

/// How a RustSocks-only table says whether its feature is on.
#[derive(Clone, Copy)]
enum Switch {
    /// `enabled = true|false`, with RustSocks' default when the key is absent.
    Enabled { key: &'static str, default_on: bool },
    /// No switch of its own: the table only configures methods poolsocks refuses anyway.
    None,
}

/// A table that only RustSocks has.
struct Section {
    path: &'static [&'static str],
    name: &'static str,
    keys: &'static [&'static str],
    /// Subtables (and arrays of tables) and their keys.
    children: &'static [(&'static str, &'static [&'static str])],
    switch: Switch,
    /// Said when the feature is on: what poolsocks has instead.
    instead: &'static str,
}

const SECTIONS: &[Section] = &[
    Section {
        path: &["acl"],
        name: "[acl]",
        keys: &["enabled", "config_file", "watch", "anonymous_user"],
        children: &[],
        switch: Switch::Enabled { key: "acl.enabled", default_on: false },
        instead: "poolsocks does not provide RustSocks' ACL files: write the rules as [access] \
                  client_networks and [[access.rules]] (they reload on SIGHUP), then set [acl] \
                  enabled = false",
    },
    Section {
        path: &["qos"],
        name: "[qos]",
        keys: &["enabled", "algorithm"],
        children: &[
            (
                "htb",
                &[
                    "global_bandwidth_bytes_per_sec",
                    "guaranteed_bandwidth_bytes_per_sec",
                    "max_bandwidth_bytes_per_sec",
                    "burst_size_bytes",
                    "refill_interval_ms",
                    "fair_sharing_enabled",
                    "rebalance_interval_ms",
                    "idle_timeout_secs",
                ],
            ),
            ("connection_limits", &["max_connections_per_user", "max_connections_global"]),
        ],
        switch: Switch::Enabled { key: "qos.enabled", default_on: false },
        instead: "poolsocks does not provide QoS (bandwidth shaping, per-user connection \
                  limits): not supported; server.max_connections caps the clients served at \
                  once. Set [qos] enabled = false",
    },
    Section {
        path: &["metrics"],
        name: "[metrics]",
        keys: &[
            "enabled",
            "storage",
            "retention_hours",
            "cleanup_interval_hours",
            "collection_interval_secs",
        ],
        children: &[],
        // RustSocks collects metrics unless told not to.
        switch: Switch::Enabled { key: "metrics.enabled", default_on: true },
        instead: "poolsocks does not provide RustSocks' stored metrics: its stats endpoint \
                  serves Prometheus text at /metrics ([sessions] stats_api_enabled = true) for \
                  a Prometheus server to scrape and keep. Set [metrics] enabled = false",
    },
    Section {
        path: &["server", "tls"],
        name: "[server.tls]",
        keys: &[
            "enabled",
            "certificate_path",
            "private_key_path",
            "key_password",
            "require_client_auth",
            "client_ca_path",
            "alpn_protocols",
            "min_protocol_version",
        ],
        children: &[],
        switch: Switch::Enabled { key: "server.tls.enabled", default_on: false },
        instead: "poolsocks does not provide SOCKS over TLS: not supported; terminate TLS in \
                  front of it (stunnel, haproxy) or keep the listener on a trusted network. Set \
                  [server.tls] enabled = false",
    },
    Section {
        path: &["auth", "pam"],
        name: "[auth.pam]",
        keys: &[
            "username_service",
            "address_service",
            "default_user",
            "default_ruser",
            "verbose",
            "verify_service",
        ],
        children: &[],
        switch: Switch::None,
        instead: "",
    },
    Section {
        path: &["auth", "gssapi"],
        name: "[auth.gssapi]",
        keys: &["service_name", "keytab_path", "protection_level", "verbose"],
        children: &[],
        switch: Switch::None,
        instead: "",
    },
    Section {
        path: &["sessions", "dashboard_auth"],
        name: "[sessions.dashboard_auth]",
        keys: &[
            "enabled",
            "altcha_enabled",
            "altcha_challenge_url",
            "session_secret",
            "session_duration_hours",
        ],
        children: &[("users", &["username", "password"])],
        switch: Switch::Enabled { key: "sessions.dashboard_auth.enabled", default_on: false },
        instead: "poolsocks does not provide dashboard logins: set sessions.stats_api_token \
                  instead (the dashboard then asks for it: any user name, the token as the \
                  password). Set [sessions.dashboard_auth] enabled = false",
    },
];

/// RustSocks' session-tracking keys in `[sessions]`, beside poolsocks' own `stats_api_*`.
const SESSION_TRACKING_KEYS: &[&str] = &[
    "enabled",
    "storage",
    "database_url",
    "batch_size",
    "batch_interval_ms",
    "retention_days",
    "cleanup_interval_hours",
    "traffic_update_packet_interval",
    "traffic_queue_capacity",
    "stats_window_hours",
    "swagger_enabled",
    "dashboard_enabled",
    "base_path",
];

/// Socks methods RustSocks has and poolsocks does not.
const FOREIGN_SOCKS_METHODS: &[&str] = &["pam.address", "pam.username", "gssapi"];

/// Finds the RustSocks-only keys of `text`, refuses those whose feature is on, and returns the
/// text with the others blanked out (same length, same lines) and what was accepted.
/// A text that does not parse is returned as it is: the strict parse reports its error.
pub(super) fn set_aside(
    text: &str,
    origin: Option<&Path>,
) -> Result<(String, RustsocksCompat), ConfigError> {
    let Ok(document) = ImDocument::parse(text) else {
        return Ok((text.to_string(), RustsocksCompat::default()));
    };
    let mut scan = Scan { text, origin, masks: Vec::new(), accepted: Vec::new() };
    let root = document.as_table() as &dyn TableLike;
    for section in SECTIONS {
        scan.section(root, section)?;
    }
    scan.auth_methods(root)?;
    scan.session_tracking(root)?;

    let mut bytes = text.as_bytes().to_vec();
    for range in &scan.masks {
        if let Some(span) = bytes.get_mut(range.clone()) {
            for byte in span.iter_mut().filter(|b| **b != b'\n' && **b != b'\r') {
                *byte = b' ';
            }
        }
    }
    let masked = String::from_utf8(bytes).unwrap_or_else(|_| text.to_string());
    scan.accepted.sort_by_key(|(offset, _)| *offset);
    let mut accepted: Vec<String> = Vec::new();
    for (_, name) in scan.accepted {
        if !accepted.contains(&name) {
            accepted.push(name);
        }
    }
    Ok((masked, RustsocksCompat { accepted }))
}

struct Scan<'a> {
    text: &'a str,
    origin: Option<&'a Path>,
    masks: Vec<Range<usize>>,
    accepted: Vec<(usize, String)>,
}

/// The table at `path`, with the key naming it (for its position), if the file has it.
fn lookup<'t>(root: &'t dyn TableLike, path: &[&str]) -> Option<(&'t Key, &'t Item)> {
    let (last, parents) = path.split_last()?;
    let mut table = root;
    for name in parents {
        table = table.get(name)?.as_table_like()?;
    }
    table.get_key_value(last)
}

impl Scan<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text.get(..offset).map_or(0, |head| head.matches('\n').count()) + 1
    }

    fn line_start(&self, offset: usize) -> usize {
        self.text.get(..offset).and_then(|head| head.rfind('\n')).map_or(0, |i| i + 1)
    }

    fn offset_of(key: &Key, item: &Item) -> usize {
        key.span().or_else(|| item.span()).map_or(usize::MAX, |span| span.start)
    }

    fn refuse(&self, key: &'static str, offset: usize, problem: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.map(Path::to_path_buf),
            line: (offset != usize::MAX).then(|| self.line_of(offset)),
            key,
            problem,
        }
    }

    fn unknown(&self, section: &str, key: &str, offset: usize, known: &[&str]) -> ConfigError {
        let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        ConfigError::Parse {
            origin: self.origin.map(Path::to_path_buf),
            message: format!(
                "line {}: unknown field `{key}` in {section} (a RustSocks section poolsocks \
                 accepts while its feature is off), expected one of {}",
                self.line_of(offset),
                expected.join(", ")
            ),
        }
    }

    /// Blanks a key and its value, or a whole table (header and every key), recursively.
    fn mask(&mut self, key: &Key, item: &Item) {
        match item {
            Item::None => {}
            Item::Value(value) => {
                if let (Some(key_span), Some(value_span)) = (key.span(), value.span()) {
                    self.masks.push(self.line_start(key_span.start)..value_span.end);
                }
            }
            Item::Table(table) => self.mask_table(table),
            Item::ArrayOfTables(tables) => {
                for table in tables.iter() {
                    self.mask_table(table);
                }
            }
        }
    }

    fn mask_table(&mut self, table: &toml_edit::Table) {
        if let Some(span) = table.span() {
            self.masks.push(self.line_start(span.start)..span.end);
        }
        for (name, _) in table.iter() {
            if let Some((key, item)) = table.get_key_value(name) {
                self.mask(key, item);
            }
        }
    }

    /// Checks one RustSocks-only table's keys and switch, then sets it aside.
    fn section(&mut self, root: &dyn TableLike, section: &Section) -> Result<(), ConfigError> {
        let Some((key, item)) = lookup(root, section.path) else { return Ok(()) };
        let offset = Self::offset_of(key, item);
        let Some(table) = item.as_table_like() else {
            return Err(self.refuse(
                section_key(section),
                offset,
                format!("must be a table ({})", section.name),
            ));
        };
        for (name, child) in table.iter() {
            let child_offset =
                table.get_key_value(name).map_or(offset, |(k, i)| Self::offset_of(k, i));
            if section.keys.contains(&name) {
                continue;
            }
            let Some((_, child_keys)) = section.children.iter().find(|(n, _)| *n == name) else {
                let known: Vec<&str> = section
                    .keys
                    .iter()
                    .copied()
                    .chain(section.children.iter().map(|(n, _)| *n))
                    .collect();
                return Err(self.unknown(section.name, name, child_offset, &known));
            };
            let rows: Vec<&dyn TableLike> = match child {
                Item::ArrayOfTables(tables) => tables.iter().map(|t| t as &dyn TableLike).collect(),
                other => other.as_table_like().into_iter().collect(),
            };
            for row in rows {
                for (leaf, _) in row.iter() {
                    if !child_keys.contains(&leaf) {
                        let leaf_offset = row
                            .get_key_value(leaf)
                            .map_or(child_offset, |(k, i)| Self::offset_of(k, i));
                        let name = format!("{}.{name}]", section.name.trim_end_matches(']'));
                        return Err(self.unknown(&name, leaf, leaf_offset, child_keys));
                    }
                }
            }
        }
        if let Switch::Enabled { key: switch_key, default_on } = section.switch {
            let (on, at) = match table.get_key_value("enabled") {
                Some((enabled_key, enabled)) => {
                    let at = Self::offset_of(enabled_key, enabled);
                    match enabled.as_value().and_then(toml_edit::Value::as_bool) {
                        Some(on) => (on, at),
                        None => {
                            return Err(self.refuse(switch_key, at, "must be true or false".into()))
                        }
                    }
                }
                None => (default_on, offset),
            };
            if on {
                let how = if table.contains_key("enabled") {
                    "is true"
                } else {
                    "is not set, which RustSocks takes as on"
                };
                return Err(self.refuse(
                    switch_key,
                    at,
                    format!("{how}: {} is on. {}", section.name, section.instead),
                ));
            }
        }
        self.mask(key, item);
        self.accepted.push((offset, section.name.to_string()));
        Ok(())
    }

    /// `auth.client_method` (RustSocks only) and RustSocks' extra `auth.socks_method` values.
    fn auth_methods(&mut self, root: &dyn TableLike) -> Result<(), ConfigError> {
        let Some(auth) = root.get("auth").and_then(Item::as_table_like) else { return Ok(()) };
        if let Some((key, item)) = auth.get_key_value("socks_method") {
            let offset = Self::offset_of(key, item);
            if let Some(method) = item.as_str().filter(|m| FOREIGN_SOCKS_METHODS.contains(m)) {
                let what = if method == "gssapi" { "GSS-API" } else { "PAM" };
                return Err(self.refuse(
                    "auth.socks_method",
                    offset,
                    format!(
                        "is {method:?}, but poolsocks does not provide {what} authentication: not \
                         supported; use socks_method = \"userpass\" with [[auth.users]] (plain or \
                         argon2 passwords, reloaded on SIGHUP)"
                    ),
                ));
            }
        }
        if let Some((key, item)) = auth.get_key_value("client_method") {
            let offset = Self::offset_of(key, item);
            match item.as_str() {
                Some("none") => {
                    self.mask(key, item);
                    self.accepted.push((offset, "auth.client_method = \"none\"".into()));
                }
                Some(method) => {
                    return Err(self.refuse(
                        "auth.client_method",
                        offset,
                        format!(
                            "is {method:?}, but poolsocks does not provide PAM client \
                             authentication: not supported; only \"none\" is accepted. Limit \
                             who may connect with [access] client_networks"
                        ),
                    ))
                }
                None => {
                    return Err(self.refuse(
                        "auth.client_method",
                        offset,
                        "must be a string (\"none\")".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// RustSocks' session tracking keys in `[sessions]`: accepted while tracking is off.
    fn session_tracking(&mut self, root: &dyn TableLike) -> Result<(), ConfigError> {
        let Some(sessions) = root.get("sessions").and_then(Item::as_table_like) else {
            return Ok(());
        };
        if let Some((key, item)) = sessions.get_key_value("api_token") {
            return Err(self.refuse(
                "sessions.api_token",
                Self::offset_of(key, item),
                "is RustSocks' name for the stats token: poolsocks calls it \
                 sessions.stats_api_token (every stats route then requires it)"
                    .into(),
            ));
        }
        if let Some((key, item)) = sessions.get_key_value("enabled") {
            let offset = Self::offset_of(key, item);
            match item.as_value().and_then(toml_edit::Value::as_bool) {
                Some(false) => {}
                Some(true) => {
                    return Err(self.refuse(
                        "sessions.enabled",
                        offset,
                        "is true: RustSocks' session tracking (a database of every session) is \
                         on, but poolsocks does not provide it; its stats endpoint (the \
                         stats_api_* keys) serves live counters, /metrics and recent events. Set \
                         [sessions] enabled = false and keep the stats_api_* keys"
                            .into(),
                    ))
                }
                None => {
                    return Err(self.refuse(
                        "sessions.enabled",
                        offset,
                        "must be true or false".into(),
                    ))
                }
            }
        }
        if let Some((key, item)) = sessions.get_key_value("base_path") {
            let path = item.as_str().map(str::trim);
            if !matches!(path, Some("" | "/")) {
                return Err(self.refuse(
                    "sessions.base_path",
                    Self::offset_of(key, item),
                    "is not \"/\": poolsocks serves its stats routes at the root only; put a \
                     reverse proxy in front to serve them under a prefix"
                        .into(),
                ));
            }
        }
        for name in SESSION_TRACKING_KEYS {
            if let Some((key, item)) = sessions.get_key_value(name) {
                let offset = Self::offset_of(key, item);
                self.mask(key, item);
                self.accepted.push((offset, format!("sessions.{name}")));
            }
        }
        Ok(())
    }
}

fn section_key(section: &Section) -> &'static str {
    match section.switch {
        Switch::Enabled { key, .. } => key,
        Switch::None => section.name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanked_text_keeps_its_length_and_lines() {
        let text = "[server]\nbind_port = 1\n[acl]\nenabled = false\nwatch = true\n\
                    [auth]\nclient_method = \"none\"\n[auth.pam]\nverbose = false\n";
        let (masked, compat) = set_aside(text, None).expect("accepted");
        assert_eq!(masked.len(), text.len());
        assert_eq!(masked.lines().count(), text.lines().count());
        assert!(masked.contains("bind_port = 1") && masked.contains("[auth]"));
        assert!(!masked.contains("acl") && !masked.contains("client_method"), "{masked}");
        assert!(!masked.contains("pam"), "{masked}");
        assert_eq!(compat.accepted, ["[acl]", "auth.client_method = \"none\"", "[auth.pam]"]);
    }

    #[test]
    fn an_enabled_feature_is_refused_naming_its_section_and_line() {
        let text = "[server]\nbind_port = 1\n\n[qos]\nenabled = true\n";
        let message = set_aside(text, None).expect_err("refused").to_string();
        assert!(message.contains("qos.enabled") && message.contains("line 5"), "{message}");
        assert!(message.contains("[qos] is on") && message.contains("not supported"), "{message}");
    }

    #[test]
    fn metrics_without_enabled_is_on_as_in_rustsocks() {
        let message =
            set_aside("[metrics]\nstorage = \"memory\"\n", None).expect_err("on").to_string();
        assert!(message.contains("metrics.enabled") && message.contains("/metrics"), "{message}");
    }

    #[test]
    fn unknown_keys_inside_a_rustsocks_section_are_still_refused() {
        let message = set_aside("[acl]\nenabled = false\nenabeld = true\n", None)
            .expect_err("typo")
            .to_string();
        assert!(message.contains("unknown field `enabeld`") && message.contains("line 3"));
        let message = set_aside("[qos]\nenabled = false\n[qos.htb]\nburst = 1\n", None)
            .expect_err("typo")
            .to_string();
        assert!(message.contains("`burst` in [qos.htb]"), "{message}");
    }

    #[test]
    fn dotted_and_inline_forms_are_blanked_whole() {
        let text = "[server]\ntls = { enabled = false }\nbind_port = 2\n[sessions]\n\
                    dashboard_auth.enabled = false\nstats_api_port = 3\n";
        let (masked, compat) = set_aside(text, None).expect("accepted");
        assert!(!masked.contains("tls") && !masked.contains("dashboard_auth"), "{masked}");
        assert!(masked.contains("bind_port = 2") && masked.contains("stats_api_port = 3"));
        assert_eq!(compat.accepted, ["[server.tls]", "[sessions.dashboard_auth]"]);
    }
}
