//! Access control: which clients may use the proxy and which destinations they may reach.
//!
//! Destination rules are checked twice. Before any DNS lookup, on the name the client gave
//! (so a denied name is never even resolved), as far as rules can decide without an address;
//! then at dial time on every resolved address, so a name cannot smuggle a connection to a
//! denied network (the stats endpoint's own address, say). The dialer checks the connected
//! peer once more before the client is told it succeeded.
//!
//! One rule is built in, before any configured one: no connection to an unspecified address
//! (`0.0.0.0/8`, `::`, and their IPv4-mapped forms). Linux delivers a connect to `0.0.0.0` or
//! `::` to the local host, so such an address would reach loopback services past a rule that
//! denies `127.0.0.0/8`; no real destination has one.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::config::{AccessConfig, PortRange, RuleAction, RuleConfig};
use crate::socks::TargetAddr;

/// The rules in force, swapped whole when the config is reloaded; every check takes the
/// current snapshot without a lock.
pub type SharedPolicy = Arc<ArcSwap<AccessPolicy>>;

#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    client_networks: Vec<IpNet>,
    default_action: RuleAction,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    action: RuleAction,
    networks: Vec<IpNet>,
    /// Lower-case suffixes without leading or trailing dots.
    domains: Vec<String>,
    ports: Vec<PortRange>,
}

/// What a rule can say about a request at a given stage.
enum Verdict {
    Matches,
    NoMatch,
    /// The rule needs the address, which is not known before resolution.
    Undecided,
}

impl Rule {
    fn from_config(rule: &RuleConfig) -> Self {
        Rule {
            action: rule.action,
            networks: rule.networks.clone(),
            domains: rule.domains.iter().map(|d| normalize_name(d)).collect(),
            ports: rule.ports.clone(),
        }
    }

    fn judge(&self, name: Option<&str>, addr: Option<IpAddr>, port: u16) -> Verdict {
        if !self.ports.is_empty() && !self.ports.iter().any(|range| range.contains(port)) {
            return Verdict::NoMatch;
        }
        if !self.domains.is_empty() {
            let matched = name.is_some_and(|name| {
                let name = normalize_name(name);
                self.domains.iter().any(|suffix| {
                    name == *suffix
                        || name
                            .strip_suffix(suffix.as_str())
                            .is_some_and(|head| head.ends_with('.'))
                })
            });
            if !matched {
                return Verdict::NoMatch;
            }
        }
        if !self.networks.is_empty() {
            match addr {
                Some(addr) => {
                    if !self.networks.iter().any(|net| net.contains(&canonical(addr))) {
                        return Verdict::NoMatch;
                    }
                }
                None => return Verdict::Undecided,
            }
        }
        Verdict::Matches
    }
}

fn normalize_name(name: &str) -> String {
    name.trim_matches('.').to_ascii_lowercase()
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// "This host" rather than a destination: `0.0.0.0/8` (RFC 1122), `::`, and mapped forms.
pub fn is_unspecified(addr: IpAddr) -> bool {
    match canonical(addr) {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

impl AccessPolicy {
    pub fn from_config(config: &AccessConfig) -> Self {
        AccessPolicy {
            client_networks: config.client_networks.clone(),
            default_action: config.default_action,
            rules: config.rules.iter().map(Rule::from_config).collect(),
        }
    }

    /// Allows everything: what a config without `[access]` means.
    pub const ALLOW_ALL: AccessPolicy = AccessPolicy {
        client_networks: Vec::new(),
        default_action: RuleAction::Allow,
        rules: Vec::new(),
    };

    pub fn allow_all() -> Self {
        Self::ALLOW_ALL
    }

    /// This policy as the shared, swappable handle the server and its dialer hold.
    pub fn shared(self) -> SharedPolicy {
        Arc::new(ArcSwap::from_pointee(self))
    }

    pub fn client_allowed(&self, client: IpAddr) -> bool {
        self.client_networks.is_empty()
            || self.client_networks.iter().any(|net| net.contains(&canonical(client)))
    }

    /// The check before resolution. `false` only when the rules deny `target` whatever it
    /// resolves to; otherwise the dial-time check decides.
    pub fn may_reach(&self, target: &TargetAddr) -> bool {
        let (name, addr) = match target {
            TargetAddr::Ip(addr) => (None, Some(addr.ip())),
            TargetAddr::Domain(name, _) => (Some(name.as_str()), None),
        };
        if addr.is_some_and(is_unspecified) {
            return false;
        }
        for rule in &self.rules {
            match rule.judge(name, addr, target.port()) {
                Verdict::Matches => return rule.action == RuleAction::Allow,
                Verdict::NoMatch => continue,
                Verdict::Undecided => return true,
            }
        }
        self.default_action == RuleAction::Allow
    }

    /// The check at dial time, on one resolved (or literal) address of `target`.
    pub fn may_connect(&self, target: &TargetAddr, addr: IpAddr) -> bool {
        if is_unspecified(addr) {
            return false;
        }
        let name = match target {
            TargetAddr::Domain(name, _) => Some(name.as_str()),
            TargetAddr::Ip(_) => None,
        };
        let action = self
            .rules
            .iter()
            .find(|rule| matches!(rule.judge(name, Some(addr), target.port()), Verdict::Matches))
            .map_or(self.default_action, |rule| rule.action);
        action == RuleAction::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> AccessPolicy {
        AccessPolicy::from_config(&Config::from_toml(toml, None).expect("valid").access)
    }

    fn domain(name: &str, port: u16) -> TargetAddr {
        TargetAddr::Domain(name.into(), port)
    }

    #[test]
    fn domain_suffix_matches_the_domain_and_its_subdomains_only() {
        let p = policy("[[access.rules]]\naction = \"deny\"\ndomains = [\"Example.COM.\"]\n");
        assert!(!p.may_reach(&domain("example.com", 80)));
        assert!(!p.may_reach(&domain("www.example.com", 80)));
        assert!(!p.may_reach(&domain("WWW.EXAMPLE.COM.", 80)));
        assert!(p.may_reach(&domain("notexample.com", 80)));
        assert!(p.may_reach(&domain("example.com.evil.net", 80)));
    }

    #[test]
    fn port_ranges_and_first_match_wins() {
        let p = policy(
            "[access]\ndefault_action = \"deny\"\n\
             [[access.rules]]\naction = \"deny\"\nports = [25]\n\
             [[access.rules]]\naction = \"allow\"\nports = [\"1-1024\"]\n",
        );
        assert!(!p.may_reach(&domain("mail.example", 25)));
        assert!(p.may_reach(&domain("web.example", 443)));
        assert!(!p.may_reach(&domain("web.example", 8080)), "default deny");
    }

    #[test]
    fn a_name_resolving_into_a_denied_network_is_caught_at_dial_time() {
        let p = policy(
            "[[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.0/8\", \"::1/128\"]\n",
        );
        let target = domain("innocent.example", 9090);
        assert!(p.may_reach(&target), "undecidable before resolution");
        assert!(!p.may_connect(&target, "127.0.0.1".parse().expect("ip")));
        assert!(!p.may_connect(&target, "::ffff:127.0.0.1".parse().expect("ip")), "v4-mapped");
        assert!(!p.may_connect(&target, "::1".parse().expect("ip")));
        assert!(p.may_connect(&target, "192.0.2.7".parse().expect("ip")));
        let literal = TargetAddr::Ip("127.0.0.1:9090".parse().expect("addr"));
        assert!(!p.may_reach(&literal), "a literal address is judged at once");
    }

    #[test]
    fn unspecified_addresses_are_denied_whatever_the_rules_say() {
        let open = AccessPolicy::allow_all();
        let named = domain("zero.example", 9090);
        for addr in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"] {
            let ip: IpAddr = addr.parse().expect("ip");
            assert!(!open.may_connect(&named, ip), "{addr} must be refused");
            let literal = TargetAddr::Ip(std::net::SocketAddr::new(ip, 9090));
            assert!(!open.may_reach(&literal), "{addr} literal must be refused before dialing");
        }
        assert!(open.may_connect(&named, "192.0.2.7".parse().expect("ip")));
    }

    #[test]
    fn client_networks_restrict_sources_when_set() {
        let p = policy("[access]\nclient_networks = [\"10.0.0.0/8\"]\n");
        assert!(p.client_allowed("10.1.2.3".parse().expect("ip")));
        assert!(!p.client_allowed("127.0.0.1".parse().expect("ip")));
        assert!(AccessPolicy::allow_all().client_allowed("203.0.113.9".parse().expect("ip")));
    }
}
