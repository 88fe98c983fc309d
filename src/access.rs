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
//!
//! A second one holds when the SOCKS listener is not on loopback, so its clients are not this
//! host's users: the proxy's own host and what only it can reach are no destination unless the
//! operator says so. Loopback (`127.0.0.0/8`, `::1`), link-local (`169.254.0.0/16`, which holds
//! the usual cloud metadata address, and `fe80::/10`), the other metadata services
//! (`fd00:ec2::254`, `100.100.100.200`) and this host's own addresses (see [`HostGuard`]) are
//! denied. Only an allow rule whose `networks` contain the address lifts that (its `ports` and
//! `domains`, if set, must match too), and only when no earlier rule denies it: an allow rule
//! without `networks` (`ports = [443]`) and `default_action` do not reach these addresses, so
//! a "web only" policy does not open the metadata service on port 80.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::config::{Config, PortRange, RuleAction, RuleConfig};
use crate::socks::TargetAddr;

/// The rules in force, swapped whole when the config is reloaded; every check takes the
/// current snapshot without a lock.
pub type SharedPolicy = Arc<ArcSwap<AccessPolicy>>;

#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    client_networks: Vec<IpNet>,
    default_action: RuleAction,
    rules: Vec<Rule>,
    /// Set when the listener is not on loopback.
    host_guard: Option<HostGuard>,
}

/// What the built-in deny for a listener beyond loopback covers: the fixed networks
/// ([`is_host_or_metadata_network`]) and this host's own addresses, taken when the policy is
/// built (at start and at each reload): every interface address, the listener's, the stats
/// endpoint's and `udp_bind_address`. The last three are added whatever the interfaces say, so
/// they are covered on a host whose interfaces cannot be listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostGuard {
    /// Canonical (IPv4-mapped ones as IPv4), sorted, no duplicates.
    own: Vec<IpAddr>,
}

impl HostGuard {
    /// The guard for `config`'s listener, with `interfaces` as this host's interface addresses.
    pub fn new(config: &Config, interfaces: impl IntoIterator<Item = IpAddr>) -> Self {
        let server = &config.server;
        let sessions = &config.sessions;
        let mut own: Vec<IpAddr> = interfaces
            .into_iter()
            .chain(Some(server.bind_address))
            .chain(sessions.stats_api_enabled.then_some(sessions.stats_api_bind_address))
            .chain(server.udp_bind_address)
            .map(canonical)
            .filter(|addr| !is_unspecified(*addr))
            .collect();
        own.sort_unstable();
        own.dedup();
        HostGuard { own }
    }

    /// This host's own addresses the guard holds (beyond the fixed networks).
    pub fn own_addresses(&self) -> &[IpAddr] {
        &self.own
    }

    fn covers(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        is_host_or_metadata_network(addr) || self.own.binary_search(&addr).is_ok()
    }
}

/// Alibaba Cloud's metadata service, alone: the rest of 100.64.0.0/10 is real networks (CGNAT).
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// AWS's IPv6 metadata service, alone: the rest of fd00::/8 is real (unique-local) networks.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Loopback, link-local (both families) and the metadata services' addresses, whichever host
/// the proxy runs on. IPv4-mapped forms count as the IPv4 address they carry.
pub fn is_host_or_metadata_network(addr: IpAddr) -> bool {
    match canonical(addr) {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4 == ALIBABA_METADATA,
        IpAddr::V6(v6) => {
            v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6
        }
    }
}

/// This host's interface addresses, or why they could not be listed.
#[cfg(unix)]
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) stores the head of a list it allocated in `head`, which is only
    // read below while the list is alive and is freed once, with freeifaddrs(3).
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = head;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned (not yet freed).
        let node = unsafe { &*entry };
        let addr = node.ifa_addr;
        if !addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points to a socket address whose family field says
            // which structure it is; each is read unaligned, as what it says it is.
            let family = i32::from(unsafe { (*addr).sa_family });
            if family == libc::AF_INET {
                let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(addr.cast()) };
                found.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
            } else if family == libc::AF_INET6 {
                let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(addr.cast()) };
                found.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        entry = node.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed only here.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// Elsewhere the listener's and the stats endpoint's addresses are all the guard knows.
#[cfg(not(unix))]
pub fn interface_addresses() -> std::io::Result<Vec<IpAddr>> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "not supported on this platform"))
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
    /// The policy `config` describes: its `[access]` rules, and the built-in deny of this
    /// host's addresses when `server.bind_address` is not loopback (with the interfaces'
    /// addresses listed now; a host whose interfaces cannot be listed gets a warning and the
    /// addresses the config names).
    pub fn from_config(config: &Config) -> Self {
        let guard = (!config.server.listens_on_loopback()).then(|| {
            let interfaces = interface_addresses().unwrap_or_else(|e| {
                tracing::warn!(
                    error = %e,
                    "cannot list this host's interface addresses: the built-in deny covers                      loopback, link-local, metadata and the addresses the config names only"
                );
                Vec::new()
            });
            HostGuard::new(config, interfaces)
        });
        Self::with_host_guard(config, guard)
    }

    /// The policy for `config`'s `[access]` with `guard` as the built-in deny of this host's
    /// addresses (`None`: none, as for a loopback listener), whatever the listener.
    pub fn with_host_guard(config: &Config, guard: Option<HostGuard>) -> Self {
        let access = &config.access;
        AccessPolicy {
            client_networks: access.client_networks.clone(),
            default_action: access.default_action,
            rules: access.rules.iter().map(Rule::from_config).collect(),
            host_guard: guard,
        }
    }

    /// Allows everything: what a config without `[access]` means on a loopback listener.
    pub const ALLOW_ALL: AccessPolicy = AccessPolicy {
        client_networks: Vec::new(),
        default_action: RuleAction::Allow,
        rules: Vec::new(),
        host_guard: None,
    };

    pub fn allow_all() -> Self {
        Self::ALLOW_ALL
    }

    /// The built-in deny of this host's addresses, when the listener is not on loopback.
    pub fn host_guard(&self) -> Option<&HostGuard> {
        self.host_guard.as_ref()
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
    /// resolves to; otherwise the dial-time check decides. An address literal is judged in
    /// full at once.
    pub fn may_reach(&self, target: &TargetAddr) -> bool {
        let name = match target {
            TargetAddr::Ip(addr) => return self.may_connect(target, addr.ip()),
            TargetAddr::Domain(name, _) => name.as_str(),
        };
        for rule in &self.rules {
            match rule.judge(Some(name), None, target.port()) {
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
        let guarded = self.host_guard.as_ref().is_some_and(|guard| guard.covers(addr));
        for rule in &self.rules {
            if !matches!(rule.judge(name, Some(addr), target.port()), Verdict::Matches) {
                continue;
            }
            // Only an allow rule that names the address's network speaks for a guarded one.
            if guarded && rule.action == RuleAction::Allow && rule.networks.is_empty() {
                continue;
            }
            return rule.action == RuleAction::Allow;
        }
        !guarded && self.default_action == RuleAction::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> AccessPolicy {
        AccessPolicy::from_config(&Config::from_toml(toml, None).expect("valid"))
    }

    /// A listener on every address of a host whose interfaces are 192.0.2.10 and 2001:db8::10,
    /// with `rules` (TOML) as its access section.
    fn open_listener(rules: &str) -> AccessPolicy {
        let config = Config::from_toml(
            &format!(
                "[server]\nbind_address = \"0.0.0.0\"\nallow_open_proxy = true\n\
                 [sessions]\nstats_api_enabled = true\nstats_api_bind_address = \"198.51.100.7\"\n\
                 {rules}"
            ),
            None,
        )
        .expect("valid");
        let interfaces = ["192.0.2.10", "2001:db8::10"].map(|a| a.parse().expect("ip"));
        AccessPolicy::with_host_guard(&config, Some(HostGuard::new(&config, interfaces)))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn literal(addr: &str, port: u16) -> TargetAddr {
        TargetAddr::Ip(std::net::SocketAddr::new(ip(addr), port))
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

    #[test]
    fn a_listener_beyond_loopback_denies_this_host_link_local_and_metadata_by_default() {
        let p = open_listener("");
        let named = domain("innocent.example", 80);
        for addr in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf:ffff::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:100.100.100.200",
            // This host's interfaces and the stats endpoint's address.
            "192.0.2.10",
            "::ffff:192.0.2.10",
            "2001:db8::10",
            "198.51.100.7",
        ] {
            assert!(!p.may_connect(&named, ip(addr)), "{addr} by name must be refused");
            assert!(!p.may_reach(&literal(addr, 80)), "{addr} literal must be refused at once");
        }
        for addr in ["192.0.2.11", "100.100.100.201", "fec0::1", "fd00:ec2::253", "8.8.8.8"] {
            assert!(p.may_connect(&named, ip(addr)), "{addr} is someone else's");
            assert!(p.may_reach(&literal(addr, 80)), "{addr} is someone else's");
        }
        assert!(p.may_reach(&named), "a name is judged on its addresses");
    }

    #[test]
    fn only_an_allow_rule_naming_the_network_lifts_the_built_in_deny() {
        let p = open_listener(
            "[access]\ndefault_action = \"allow\"\n\
             [[access.rules]]\naction = \"allow\"\nports = [80, 443]\n\
             [[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.2/32\"]\n\
             [[access.rules]]\naction = \"allow\"\nnetworks = [\"127.0.0.0/8\"]\nports = [8080]\n",
        );
        let named = domain("app.example", 8080);
        assert!(p.may_connect(&named, ip("127.0.0.1")), "named network and port");
        assert!(p.may_connect(&named, ip("::ffff:127.0.0.1")), "and its mapped form");
        assert!(p.may_reach(&literal("127.0.0.1", 8080)));
        assert!(!p.may_connect(&named, ip("127.0.0.2")), "an earlier deny still wins");
        assert!(!p.may_reach(&literal("127.0.0.1", 9090)), "another port: not named");
        assert!(!p.may_reach(&literal("::1", 8080)), "another network: not named");
        assert!(
            !p.may_reach(&literal("169.254.169.254", 80)),
            "an allow rule without networks does not open metadata"
        );
        assert!(p.may_reach(&literal("192.0.2.200", 80)), "it still allows everyone else");
    }

    #[test]
    fn a_loopback_listener_has_no_guard_and_unspecified_listeners_are_not_an_own_address() {
        let p = policy("");
        assert!(p.host_guard().is_none());
        assert!(p.may_reach(&literal("127.0.0.1", 9090)), "loopback listener: as configured");
        assert!(p.may_reach(&literal("169.254.169.254", 80)));
        let guarded = open_listener("");
        let own = guarded.host_guard().expect("guard").own_addresses();
        assert!(!own.iter().any(|a| a.is_unspecified()), "{own:?}");
        assert!(own.contains(&ip("198.51.100.7")), "{own:?}");
    }

    #[cfg(unix)]
    #[test]
    fn the_daemon_lists_this_hosts_interfaces() {
        let config = Config::from_toml(
            "[server]\nbind_address = \"0.0.0.0\"\nallow_open_proxy = true\n",
            None,
        )
        .expect("valid");
        let p = AccessPolicy::from_config(&config);
        assert!(p.host_guard().is_some());
        let interfaces = interface_addresses().expect("getifaddrs");
        assert!(interfaces.contains(&ip("127.0.0.1")), "lo is an interface: {interfaces:?}");
        assert!(!p.may_reach(&literal("127.0.0.1", 9090)));
    }
}
