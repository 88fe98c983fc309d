//! `[server]` and `[server.pool]`: the SOCKS listener, its limits, and the upstream pool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::PortRange;

pub const DEFAULT_BIND_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const DEFAULT_BIND_PORT: u16 = 1080;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
/// The listener closes as soon as shutdown starts unless asked to wait.
pub const DEFAULT_SHUTDOWN_DELAY_MS: u64 = 0;
/// Envoy's TCP proxy default (1 hour): long enough for any interactive session that is only
/// quiet (an ssh shell, a database connection between queries), short enough that a session
/// whose peers both vanished without a FIN or RST gives its slot back the same hour.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_SECS: u64 = 3_600;
/// Twice the per-address connect timeout: a name with several dead addresses gets two full
/// tries, and a client never waits longer than this for its reply, whatever DNS returned.
pub const DEFAULT_CONNECT_PHASE_TIMEOUT_MS: u64 = 10_000;

/// RFC 1928's commands besides CONNECT are on by default, as in RustSocks and Dante.
pub const DEFAULT_UDP_ASSOCIATE: bool = true;
pub const DEFAULT_BIND: bool = true;
/// RFC 4787 (REQ-5) asks a NAT to keep a UDP mapping at least 2 minutes and recommends 5; an
/// association is such a mapping, so it lives 5 minutes without a datagram either way.
pub const DEFAULT_UDP_IDLE_TIMEOUT_SECS: u64 = 300;
/// How long a BIND waits for its one incoming connection. An FTP server opens its active-mode
/// data connection within seconds of the command that asks for it; a minute covers slow ones.
pub const DEFAULT_BIND_TIMEOUT_SECS: u64 = 60;
/// PROXY protocol headers are off: the socket's peer is the client.
pub const DEFAULT_PROXY_PROTOCOL: bool = false;
/// Who may send a PROXY protocol header when it is on: loopback only (a balancer on this host).
pub const DEFAULT_PROXY_PROTOCOL_TRUSTED: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// One process per port unless asked for.
pub const DEFAULT_REUSE_PORT: bool = false;

pub const DEFAULT_DNS_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_DNS_CACHE_MAX_TTL_SECS: u64 = 60;

pub const DEFAULT_POOL_ENABLED: bool = false;
pub const DEFAULT_MAX_IDLE_PER_DEST: usize = 4;
pub const DEFAULT_MAX_TOTAL_IDLE: usize = 100;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 90;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// About 100 MiB of per-destination state at most, however many names clients send.
pub const DEFAULT_MAX_DESTINATIONS: usize = 10_000;
/// A dial this fast is a host on the same machine or LAN: a spare saves less than its
/// background dial, watch and close cost (on loopback a dial is ~60 µs of CPU, the same work
/// moved, not saved).
pub const DEFAULT_CHEAP_DIAL_US: u64 = 1_000;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
    /// After SIGINT/SIGTERM, how long the listener keeps accepting (with `/health` already
    /// answering 503) before it closes, so a balancer's health check takes the instance out
    /// first.
    pub shutdown_delay_ms: u64,
    /// Listening beyond loopback without authentication makes an open proxy; it must be asked for.
    pub allow_open_proxy: bool,
    /// A session in which no byte moved either way for this long is closed.
    pub session_idle_timeout_secs: u64,
    /// Limit on the whole connect phase of a CONNECT: resolution and every address tried.
    pub connect_phase_timeout_ms: u64,
    /// Serve UDP ASSOCIATE; off, it gets reply `0x07` (command not supported).
    pub udp_associate: bool,
    /// Serve BIND; off, it gets reply `0x07`.
    pub bind: bool,
    /// Where UDP relay sockets are bound and what the UDP ASSOCIATE reply names; unset, the
    /// address the client reached the SOCKS listener on.
    pub udp_bind_address: Option<IpAddr>,
    /// An association with no datagram either way for this long is closed.
    pub udp_idle_timeout_secs: u64,
    /// Which datagrams arriving at an association's outbound socket reach the client.
    pub udp_reply_filter: UdpReplyFilter,
    /// How long a BIND waits for its incoming connection before reply `0x06`.
    pub bind_timeout_secs: u64,
    /// Every client connection starts with a PROXY protocol header (v1 or v2) from a balancer;
    /// the address in it is the client from then on.
    pub proxy_protocol: bool,
    /// Sources allowed to send that header; a connection from anywhere else is closed.
    pub proxy_protocol_trusted: Vec<IpNet>,
    /// Bind the SOCKS listener with SO_REUSEPORT, so several processes can share the port.
    pub reuse_port: bool,
    pub dns: DnsConfig,
    pub pool: PoolConfig,
}

/// Which senders may answer a UDP association (RFC 4787's filtering behaviours).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UdpReplyFilter {
    /// Only the address and port this association sent to (what a NAT usually does).
    #[default]
    AddressAndPort,
    /// Any port of an address this association sent to.
    Address,
    /// Anyone (endpoint-independent filtering, for peer-to-peer clients); access rules still
    /// apply to the sender.
    Any,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind_address: DEFAULT_BIND_ADDRESS,
            bind_port: DEFAULT_BIND_PORT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            shutdown_grace_secs: DEFAULT_SHUTDOWN_GRACE_SECS,
            shutdown_delay_ms: DEFAULT_SHUTDOWN_DELAY_MS,
            allow_open_proxy: false,
            session_idle_timeout_secs: DEFAULT_SESSION_IDLE_TIMEOUT_SECS,
            connect_phase_timeout_ms: DEFAULT_CONNECT_PHASE_TIMEOUT_MS,
            udp_associate: DEFAULT_UDP_ASSOCIATE,
            bind: DEFAULT_BIND,
            udp_bind_address: None,
            udp_idle_timeout_secs: DEFAULT_UDP_IDLE_TIMEOUT_SECS,
            udp_reply_filter: UdpReplyFilter::default(),
            bind_timeout_secs: DEFAULT_BIND_TIMEOUT_SECS,
            proxy_protocol: DEFAULT_PROXY_PROTOCOL,
            proxy_protocol_trusted: default_proxy_protocol_trusted(),
            reuse_port: DEFAULT_REUSE_PORT,
            dns: DnsConfig::default(),
            pool: PoolConfig::default(),
        }
    }
}

/// [`DEFAULT_PROXY_PROTOCOL_TRUSTED`] as networks.
pub fn default_proxy_protocol_trusted() -> Vec<IpNet> {
    DEFAULT_PROXY_PROTOCOL_TRUSTED.iter().filter_map(|net| net.parse().ok()).collect()
}

impl ServerConfig {
    pub fn bind_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind_address, self.bind_port)
    }

    /// Whether only this host's users can reach the listener. Anything else (an IPv4-mapped
    /// loopback address included) counts as reachable by others: authentication is required
    /// and the built-in deny of this host's addresses applies.
    pub fn listens_on_loopback(&self) -> bool {
        self.bind_address.is_loopback()
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn session_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.session_idle_timeout_secs)
    }

    pub fn connect_phase_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_phase_timeout_ms)
    }

    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    pub fn udp_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.udp_idle_timeout_secs)
    }

    pub fn bind_timeout(&self) -> Duration {
        Duration::from_secs(self.bind_timeout_secs)
    }
}

/// `[server.pool]`: the upstream connection pool (see README, "The pool").
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
    /// Destination ports that never get spares (`22`, `"3306"`, `"5432-5433"`): servers that
    /// log or limit unauthenticated connections (databases, ssh).
    pub exclude_ports: Vec<PortRange>,
    /// Destination networks that never get spares.
    pub exclude_networks: Vec<IpNet>,
    /// Destinations the pool tracks at most; the least recently active is forgotten first.
    pub max_destinations: usize,
    /// A destination whose dials take less than this many microseconds gets no spares.
    pub cheap_dial_us: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            enabled: DEFAULT_POOL_ENABLED,
            max_idle_per_dest: DEFAULT_MAX_IDLE_PER_DEST,
            max_total_idle: DEFAULT_MAX_TOTAL_IDLE,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            exclude_ports: Vec::new(),
            exclude_networks: Vec::new(),
            max_destinations: DEFAULT_MAX_DESTINATIONS,
            cheap_dial_us: DEFAULT_CHEAP_DIAL_US,
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

/// `[server.dns]`: how destination names are resolved (see `crate::resolve`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers (`"192.0.2.53:53"`); empty uses the system's (`/etc/resolv.conf`).
    /// `/etc/hosts` is read first either way.
    pub servers: Vec<SocketAddr>,
    /// A lookup that takes longer fails (reply `0x04`).
    pub timeout_ms: u64,
    /// Answers are cached for their TTL, but at most this long.
    pub cache_max_ttl_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout_ms: DEFAULT_DNS_TIMEOUT_MS,
            cache_max_ttl_secs: DEFAULT_DNS_CACHE_MAX_TTL_SECS,
        }
    }
}

impl DnsConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn cache_max_ttl(&self) -> Duration {
        Duration::from_secs(self.cache_max_ttl_secs)
    }
}
