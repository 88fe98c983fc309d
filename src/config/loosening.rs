//! Reloads that open the proxy up.
//!
//! A config file cut short by a non-atomic write still parses when the cut falls between
//! sections, and what it lost (`[auth]`, `[access]`) falls back to defaults that let everyone
//! in. So a reload that turns authentication off, drops every access rule, makes the default
//! action `allow` or lets every client network in must say so: the key has to be written in
//! the new file (`socks_method = "none"`, `rules = []`, `default_action = "allow"`,
//! `client_networks = []`). A loosening that is written out is applied and logged at `warn`.

use super::{Config, RuleAction, SocksMethod};

/// One way a new config is more open than the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loosening {
    /// The key that has to be written in the file for the loosening to be applied, or `None`
    /// for one that is only reported (some users or some deny rules removed).
    pub confirm_with: Option<&'static str>,
    pub what: String,
}

/// Every way `new` is more open than `old`.
pub fn loosenings(old: &Config, new: &Config) -> Vec<Loosening> {
    let mut found = Vec::new();
    let mut add = |confirm_with, what: String| found.push(Loosening { confirm_with, what });
    if old.auth.method() == SocksMethod::Userpass && new.auth.method() == SocksMethod::None {
        add(Some("auth.socks_method"), "turns authentication off".into());
    } else {
        let removed = old
            .auth
            .users
            .iter()
            .filter(|user| !new.auth.users.iter().any(|u| u.username == user.username))
            .count();
        if removed > 0 {
            add(None, format!("removes {removed} user(s)"));
        }
    }
    let (was, now) = (&old.access, &new.access);
    if !was.rules.is_empty() && now.rules.is_empty() {
        add(Some("access.rules"), format!("removes every access rule ({})", was.rules.len()));
    } else {
        let dropped = was
            .rules
            .iter()
            .filter(|rule| rule.action == RuleAction::Deny && !now.rules.contains(rule))
            .count();
        if dropped > 0 {
            add(None, format!("removes or changes {dropped} deny rule(s)"));
        }
    }
    if was.default_action == RuleAction::Deny && now.default_action == RuleAction::Allow {
        add(Some("access.default_action"), "makes the default action allow".into());
    }
    if !was.client_networks.is_empty() && now.client_networks.is_empty() {
        add(Some("access.client_networks"), "lets clients from every network in".into());
    }
    found
}

/// The keys a loosening needs that `text` does not write.
pub fn unconfirmed(loosenings: &[Loosening], text: &str) -> Vec<&'static str> {
    let written: Option<toml::Table> = text.parse().ok();
    loosenings
        .iter()
        .filter_map(|l| l.confirm_with)
        .filter(|key| !written.as_ref().is_some_and(|table| writes(table, key)))
        .collect()
}

fn writes(table: &toml::Table, dotted: &str) -> bool {
    let mut segments = dotted.split('.').peekable();
    let mut current = table;
    while let Some(segment) = segments.next() {
        let Some(value) = current.get(segment) else { return false };
        if segments.peek().is_none() {
            return true;
        }
        let Some(inner) = value.as_table() else { return false };
        current = inner;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_toml(text, None).expect("valid")
    }

    const GUARDED: &str = "[auth]\nlogin_failure_limit = 5\n[[auth.users]]\nusername = \"alice\"\n\
        password = \"pw\"\n[access]\ndefault_action = \"deny\"\nclient_networks = [\"127.0.0.0/8\"]\n\
        [[access.rules]]\naction = \"allow\"\nports = [80]\n";

    #[test]
    fn a_file_cut_before_auth_needs_every_opening_written_out() {
        let old = parse(GUARDED);
        let cut = "[server]\nmax_connections = 100\n";
        let found = loosenings(&old, &parse(cut));
        let keys = unconfirmed(&found, cut);
        assert_eq!(
            keys,
            [
                "auth.socks_method",
                "access.rules",
                "access.default_action",
                "access.client_networks"
            ]
        );
        let explicit = "[auth]\nsocks_method = \"none\"\n[access]\ndefault_action = \"allow\"\n\
                        client_networks = []\nrules = []\n";
        let found = loosenings(&old, &parse(explicit));
        assert_eq!(found.len(), 4);
        assert!(unconfirmed(&found, explicit).is_empty());
    }

    #[test]
    fn tightening_or_keeping_needs_nothing_and_partial_removals_are_only_reported() {
        let old = parse(GUARDED);
        assert!(loosenings(&old, &old).is_empty());
        assert!(loosenings(&Config::default(), &old).is_empty());
        let fewer = GUARDED.replace(
            "[[auth.users]]\nusername = \"alice\"\n",
            "[[auth.users]]\nusername = \"bob\"\n",
        );
        let found = loosenings(&old, &parse(&fewer));
        assert_eq!(found, [Loosening { confirm_with: None, what: "removes 1 user(s)".into() }]);
        assert!(unconfirmed(&found, &fewer).is_empty());
    }
}
