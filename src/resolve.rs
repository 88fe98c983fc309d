//! Name resolution: one seam ([`Resolver`]) for everything that turns a name into addresses
//! (CONNECT, UDP datagrams, the pool's background dials).
//!
//! The daemon's resolver ([`DnsResolver`]) is asynchronous (hickory): a lookup is a future on
//! the runtime, not a thread. `getaddrinfo` on the blocking pool let 600 lookups of names whose
//! server never answers fill all 512 blocking threads, and everyone else waited behind them.
//! Here a silent name server costs a pending future and a UDP socket per lookup (bounded by
//! the sessions that asked), each lookup is bounded by `[server.dns] timeout_ms`, and answers
//! are cached for their TTL (at most `cache_max_ttl_secs`), so a burst to one name asks once.
//!
//! Names follow the system: a name the hosts file lists resolves to exactly its entries there
//! (see `hosts`); the others' answers are ordered as the system's resolver orders them (see
//! `address_selection`), so the first address is the one a local client would use.
//!
//! Tests and harnesses inject a [`StaticResolver`]: no test asks the machine's DNS server.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::address_selection;
use crate::config::DnsConfig;
use crate::descriptors::{self, DescriptorBudget};
use crate::hosts::{HostsFile, SYSTEM_HOSTS};
use crate::logsafe::Escaped;
use crate::upstream::BoxFuture;

/// Why a name did not resolve. Every variant maps to SOCKS reply `0x04` (host unreachable).
/// The host is whatever a client sent, so it is shown escaped (see `logsafe`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("{} does not resolve", Escaped(host))]
    NotFound { host: String },
    #[error("resolving {} took longer than {timeout:?}", Escaped(host))]
    Timeout { host: String, timeout: Duration },
    #[error("resolving {} failed: {}", Escaped(host), Escaped(message))]
    Failed { host: String, message: String },
}

/// Turns a host name into socket addresses. Implementations must bound their own time.
pub trait Resolver: Send + Sync + 'static {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>>;
}

/// A name that is an address literal (`192.0.2.1`, `::1`, `[::1]`) needs no lookup. Only the
/// standard forms count: `127.1` or `0` are names, which keeps a resolver's looser parsing from
/// turning them into addresses the access rules never saw written.
pub fn literal(host: &str) -> Option<IpAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .or_else(|_| bare.parse::<Ipv6Addr>().map(IpAddr::V6))
        .ok()
}

/// The daemon's resolver: `/etc/hosts` first (read by `hosts`, not by hickory), then hickory
/// over the system's name servers (or `[server.dns] servers`), each lookup bounded, its answer
/// in the order `address_selection` gives.
pub struct DnsResolver {
    inner: hickory_resolver::Resolver<TokioRuntimeProvider>,
    hosts: Arc<HostsFile>,
    timeout: Duration,
    /// Each lookup takes its sockets from it first (see `descriptors`).
    descriptors: Arc<DescriptorBudget>,
}

impl DnsResolver {
    pub fn from_config(config: &DnsConfig) -> Result<Self, ResolveError> {
        let failed = |message: String| ResolveError::Failed { host: "(config)".into(), message };
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.servers.is_empty() {
            hickory_resolver::Resolver::builder(provider)
                .map_err(|e| failed(format!("cannot read the system's DNS config: {e}")))?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                    name_server.connections = vec![udp, tcp];
                    name_server
                })
                .collect();
            hickory_resolver::Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            )
        };
        let options = builder.options_mut();
        options.timeout = config.timeout();
        options.attempts = 1;
        // `hosts` reads the file: hickory's reading mixes it with DNS answers per family.
        options.use_hosts_file = ResolveHosts::Never;
        options.cache_size = 1024;
        options.positive_max_ttl = Some(config.cache_max_ttl());
        options.negative_max_ttl = Some(config.cache_max_ttl().min(NEGATIVE_TTL_CAP));
        let inner = builder.build().map_err(|e| failed(e.to_string()))?;
        Ok(DnsResolver {
            inner,
            hosts: Arc::new(HostsFile::new(SYSTEM_HOSTS)),
            timeout: config.timeout(),
            descriptors: DescriptorBudget::unlimited(),
        })
    }

    /// Lookups take their sockets from `descriptors`, and wait (within the lookup's timeout)
    /// when it is spent.
    pub fn with_descriptors(mut self, descriptors: Arc<DescriptorBudget>) -> Self {
        self.descriptors = descriptors;
        self
    }

    /// Reads names from the hosts file at `path` instead of `/etc/hosts` (tests).
    pub fn with_hosts_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.hosts = Arc::new(HostsFile::new(path));
        self
    }
}

/// A name that does not exist is asked again after at most this long.
const NEGATIVE_TTL_CAP: Duration = Duration::from_secs(5);

impl Resolver for DnsResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        let host = host.to_string();
        if let Some(ip) = literal(&host) {
            return Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) });
        }
        let inner = self.inner.clone();
        let hosts = self.hosts.clone();
        let timeout = self.timeout;
        let descriptors = self.descriptors.clone();
        Box::pin(async move {
            if let Some(listed) = hosts.lookup(&host) {
                return Ok(listed.into_iter().map(|ip| SocketAddr::new(ip, port)).collect());
            }
            let lookup = async {
                let _sockets = descriptors.take(descriptors::LOOKUP).await;
                let found = inner.lookup_ip(host.as_str()).await?;
                let mut addrs: Vec<SocketAddr> =
                    found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                // The probes' sockets come under the lookup's descriptors, one at a time.
                address_selection::sort(&mut addrs);
                Ok::<_, hickory_resolver::net::NetError>(addrs)
            };
            match tokio::time::timeout(timeout, lookup).await {
                Err(_) => Err(ResolveError::Timeout { host, timeout }),
                Ok(Ok(addrs)) if addrs.is_empty() => Err(ResolveError::NotFound { host }),
                Ok(Ok(addrs)) => Ok(addrs),
                Ok(Err(e)) if e.is_no_records_found() => Err(ResolveError::NotFound { host }),
                Ok(Err(e)) => Err(ResolveError::Failed { host, message: e.to_string() }),
            }
        })
    }
}

/// A fixed table of names, for tests and harnesses: no packet leaves the process. Unknown
/// names do not resolve; `localhost` resolves to 127.0.0.1 unless the table says otherwise.
#[derive(Debug, Clone, Default)]
pub struct StaticResolver {
    names: HashMap<String, Answer>,
}

#[derive(Debug, Clone)]
enum Answer {
    Addresses(Vec<IpAddr>),
    /// The name server never answers: the lookup waits this long, then times out.
    Silent(Duration),
}

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` resolves to `addresses`, in this order.
    pub fn with(mut self, name: &str, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.names
            .insert(name.to_ascii_lowercase(), Answer::Addresses(addresses.into_iter().collect()));
        self
    }

    /// Looking up `name` takes `timeout`, then fails as a silent name server would.
    pub fn with_silent(mut self, name: &str, timeout: Duration) -> Self {
        self.names.insert(name.to_ascii_lowercase(), Answer::Silent(timeout));
        self
    }

    pub fn into_arc(self) -> Arc<dyn Resolver> {
        Arc::new(self)
    }
}

impl Resolver for StaticResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        let key = host.trim_end_matches('.').to_ascii_lowercase();
        let answer = match literal(host) {
            Some(ip) => Some(Answer::Addresses(vec![ip])),
            None => self.names.get(&key).cloned().or_else(|| {
                (key == "localhost").then(|| Answer::Addresses(vec![Ipv4Addr::LOCALHOST.into()]))
            }),
        };
        let host = host.to_string();
        Box::pin(async move {
            match answer {
                Some(Answer::Addresses(ips)) if !ips.is_empty() => {
                    Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
                }
                Some(Answer::Silent(timeout)) => {
                    tokio::time::sleep(timeout).await;
                    Err(ResolveError::Timeout { host, timeout })
                }
                _ => Err(ResolveError::NotFound { host }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_standard_literals_skip_the_lookup() {
        assert_eq!(literal("192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(literal("::ffff:0.0.0.0"), Some("::ffff:0.0.0.0".parse().unwrap()));
        // Short forms getaddrinfo would accept are names here.
        assert_eq!(literal("127.1"), None);
        assert_eq!(literal("0"), None);
        assert_eq!(literal("0x7f000001"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_static_table_answers_refuses_and_stays_silent() {
        let resolver = StaticResolver::new()
            .with("Two.Example", ["192.0.2.1".parse().unwrap(), "::1".parse().unwrap()])
            .with_silent("slow.example", Duration::from_secs(3));
        let two = resolver.lookup("two.example.", 80).await.unwrap();
        assert_eq!(two, ["192.0.2.1:80".parse().unwrap(), "[::1]:80".parse().unwrap()]);
        assert_eq!(
            resolver.lookup("nowhere.example", 80).await,
            Err(ResolveError::NotFound { host: "nowhere.example".into() })
        );
        assert_eq!(
            resolver.lookup("localhost", 1).await.unwrap(),
            ["127.0.0.1:1".parse().unwrap()]
        );
        let started = tokio::time::Instant::now();
        assert!(matches!(
            resolver.lookup("slow.example", 80).await,
            Err(ResolveError::Timeout { .. })
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
