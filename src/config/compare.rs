//! Comparing two configs key by key (what a reload changes, and whether it may), and the hash
//! of the effective config.
//!
//! Both work on the config's canonical form: its serialisation as a JSON tree (object keys
//! sorted). Secrets serialise as a digest (see `crate::secret`), so a changed password shows as
//! a changed key and changes the hash, without the value ever being held in that form.
//!
//! What a reload may change is a list of what it *applies* ([`RELOADABLE_KEYS`]); every other
//! key, including any a later version adds, needs a restart. A new key is therefore refused by a
//! reload until someone teaches the reload to apply it, never silently ignored.

use blake2::{Blake2s256, Digest};
use serde_json::Value;

use super::Config;

/// Keys (and whole sections, by prefix) a reload applies without a restart. Listed once here;
/// README's Operations section lists the same.
pub const RELOADABLE_KEYS: &[&str] = &[
    "server.max_connections",
    "server.handshake_timeout_ms",
    "server.shutdown_grace_secs",
    "server.shutdown_delay_ms",
    "server.allow_open_proxy",
    "server.session_idle_timeout_secs",
    "server.connect_phase_timeout_ms",
    "server.pool",
    "auth",
    "access",
    "telemetry",
    "logging.level",
    "sessions.stats_api_token",
];

/// Whether a reload applies `key` (a dotted path such as `server.pool.max_total_idle`).
pub fn is_reloadable(key: &str) -> bool {
    RELOADABLE_KEYS.iter().any(|prefix| {
        key == *prefix || key.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.'))
    })
}

fn canonical(config: &Config) -> Value {
    // Serialising plain data into a JSON tree cannot fail; `Null` would only hide a bug.
    serde_json::to_value(config).unwrap_or(Value::Null)
}

/// The dotted keys whose values differ between `old` and `new` (arrays, such as `auth.users`
/// or `access.rules`, count as one key), sorted.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    diff("", &canonical(old), &canonical(new), &mut changed);
    changed.sort();
    changed
}

fn diff(path: &str, old: &Value, new: &Value, changed: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff(&child, x, y, changed),
                    _ => changed.push(child),
                }
            }
        }
        (a, b) if a != b => changed.push(path.to_string()),
        _ => {}
    }
}

/// Writes `value` with object keys in sorted order, whatever the map type's own order.
fn write_sorted(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(child) = map.get(key) {
                    write_sorted(child, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// BLAKE2s-256 of the effective config's canonical form, in hex: equal for equal effective
/// configs (however the files are laid out, commented or ordered), on any instance.
pub fn config_hash(config: &Config) -> String {
    let mut text = String::new();
    write_sorted(&canonical(config), &mut text);
    let digest = Blake2s256::new_with_prefix(b"poolsocks config\0").chain_update(text).finalize();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_toml(text, None).expect("valid")
    }

    #[test]
    fn changed_keys_names_leaves_and_arrays() {
        let old = parse("[server.pool]\nmax_total_idle = 100\n");
        let new = parse(
            "[server]\nbind_port = 1081\n[server.pool]\nmax_total_idle = 10\n\
             [[access.rules]]\naction = \"deny\"\nports = [25]\n",
        );
        assert_eq!(
            changed_keys(&old, &new),
            ["access.rules", "server.bind_port", "server.pool.max_total_idle"]
        );
        assert!(changed_keys(&old, &old).is_empty());
    }

    #[test]
    fn a_password_change_is_a_change_and_is_not_printed() {
        let old = parse("[[auth.users]]\nusername = \"a\"\npassword = \"one-secret\"\n");
        let new = parse("[[auth.users]]\nusername = \"a\"\npassword = \"two-secret\"\n");
        assert_eq!(changed_keys(&old, &new), ["auth.users"]);
        assert_ne!(config_hash(&old), config_hash(&new));
        let canonical = serde_json::to_string(&new).expect("json");
        assert!(!canonical.contains("two-secret"), "{canonical}");
    }

    #[test]
    fn the_hash_ignores_layout_and_defaults_written_out() {
        let terse = parse("[server]\nbind_port = 1080\n");
        let spelled =
            parse("# comment\n[server]\nbind_address = \"127.0.0.1\"\nbind_port = 1080\n");
        assert_eq!(config_hash(&terse), config_hash(&spelled));
        assert_eq!(config_hash(&terse), config_hash(&Config::default()));
        assert_eq!(config_hash(&terse).len(), 64);
    }

    #[test]
    fn only_listed_keys_reload() {
        assert!(is_reloadable("server.pool.max_total_idle"));
        assert!(is_reloadable("auth.users"));
        assert!(is_reloadable("sessions.stats_api_token"));
        assert!(!is_reloadable("server.bind_port"));
        assert!(!is_reloadable("sessions.stats_api_port"));
        assert!(!is_reloadable("server.pool_size"), "a prefix is a whole segment");
        assert!(!is_reloadable("server.proxy_protocol"), "a new socket's worth: restart");
        assert!(!is_reloadable("server.proxy_protocol_trusted"));
        assert!(!is_reloadable("server.reuse_port"));
        assert!(!is_reloadable("server.some_future_key"), "unknown keys need a restart");
        assert!(!is_reloadable("logging.format"));
    }
}
