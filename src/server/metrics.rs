//! Process-level counters of the SOCKS server (sessions by command, bytes, handshake failures,
//! PROXY protocol refusals, UDP associations and their datagrams, BIND waits).
//!
//! Plain atomics: these are independent tallies read by the stats endpoint, not pool state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

use super::auth::{AuthCounters, AuthCountersSnapshot};
use crate::socks::Command;

#[derive(Debug, Default)]
pub struct ServerMetrics {
    sessions_active: AtomicU64,
    sessions_total: AtomicU64,
    sessions_connect: AtomicU64,
    sessions_bind: AtomicU64,
    sessions_udp_associate: AtomicU64,
    bytes_client_to_upstream: AtomicU64,
    bytes_upstream_to_client: AtomicU64,
    handshake_failures: AtomicU64,
    rejected_over_limit: AtomicU64,
    proxy_untrusted: AtomicU64,
    proxy_header_invalid: AtomicU64,
    auth: Arc<AuthCounters>,
    pub udp: UdpMetrics,
    pub bind: BindMetrics,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ServerMetricsSnapshot {
    /// Sessions being served now, whatever their command (a CONNECT relaying, a UDP
    /// association, a BIND waiting or relaying).
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub sessions_by_command: CommandCounts,
    /// Bytes relayed over TCP (CONNECT and BIND sessions).
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub handshake_failures: u64,
    pub rejected_over_limit: u64,
    /// PROXY protocol on: connections closed because their source is not trusted to send one.
    pub proxy_untrusted: u64,
    /// PROXY protocol on: connections closed for a missing, invalid or late header.
    pub proxy_header_invalid: u64,
    #[serde(flatten)]
    pub auth: AuthCountersSnapshot,
    pub udp: UdpSnapshot,
    pub bind: BindSnapshot,
}

/// Sessions started since start, by command.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct CommandCounts {
    pub connect: u64,
    pub bind: u64,
    pub udp_associate: u64,
}

impl ServerMetrics {
    /// A session of `command` has started: a CONNECT or BIND relaying, a UDP association open,
    /// or a BIND listening for its peer.
    pub fn session_started(&self, command: Command) {
        self.sessions_active.fetch_add(1, Relaxed);
        self.sessions_total.fetch_add(1, Relaxed);
        let by_command = match command {
            Command::Connect => &self.sessions_connect,
            Command::Bind => &self.sessions_bind,
            Command::UdpAssociate => &self.sessions_udp_associate,
        };
        by_command.fetch_add(1, Relaxed);
    }

    pub fn session_ended(&self) {
        self.sessions_active.fetch_sub(1, Relaxed);
    }

    /// The byte totals (client to upstream, upstream to client) the relay adds to as bytes move.
    pub fn relayed_totals(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.bytes_client_to_upstream, &self.bytes_upstream_to_client)
    }

    pub fn handshake_failed(&self) {
        self.handshake_failures.fetch_add(1, Relaxed);
    }

    pub fn rejected_over_limit(&self) {
        self.rejected_over_limit.fetch_add(1, Relaxed);
    }

    pub fn proxy_untrusted(&self) {
        self.proxy_untrusted.fetch_add(1, Relaxed);
    }

    pub fn proxy_header_invalid(&self) {
        self.proxy_header_invalid.fetch_add(1, Relaxed);
    }

    /// The login path's counters (shared with the `Authenticator`).
    pub fn auth_counters(&self) -> Arc<AuthCounters> {
        self.auth.clone()
    }

    pub fn snapshot(&self) -> ServerMetricsSnapshot {
        ServerMetricsSnapshot {
            sessions_active: self.sessions_active.load(Relaxed),
            sessions_total: self.sessions_total.load(Relaxed),
            sessions_by_command: CommandCounts {
                connect: self.sessions_connect.load(Relaxed),
                bind: self.sessions_bind.load(Relaxed),
                udp_associate: self.sessions_udp_associate.load(Relaxed),
            },
            bytes_client_to_upstream: self.bytes_client_to_upstream.load(Relaxed),
            bytes_upstream_to_client: self.bytes_upstream_to_client.load(Relaxed),
            handshake_failures: self.handshake_failures.load(Relaxed),
            rejected_over_limit: self.rejected_over_limit.load(Relaxed),
            proxy_untrusted: self.proxy_untrusted.load(Relaxed),
            proxy_header_invalid: self.proxy_header_invalid.load(Relaxed),
            auth: self.auth.snapshot(),
            udp: self.udp.snapshot(),
            bind: self.bind.snapshot(),
        }
    }
}

/// Why a datagram was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// At the relay socket from anyone but the client; at an outbound socket from a sender the
    /// reply filter does not let through.
    ForeignSource,
    /// FRAG other than 0 (fragmentation is optional in RFC 1928; poolsocks does not reassemble).
    Fragment,
    /// Too short for its header, or an unknown address type.
    Malformed,
    /// Its destination (or a reply's sender) is denied by the access rules.
    Denied,
    /// Its destination name does not resolve (or resolves to no usable address).
    Unresolvable,
    /// Too large for the other side (with or without its header).
    TooLarge,
    /// The socket could not take it at once (send buffer full), or too many datagrams already
    /// wait for names being resolved.
    WouldBlock,
    /// Any other send error (network unreachable, say).
    SendError,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::ForeignSource,
        DropReason::Fragment,
        DropReason::Malformed,
        DropReason::Denied,
        DropReason::Unresolvable,
        DropReason::TooLarge,
        DropReason::WouldBlock,
        DropReason::SendError,
    ];

    /// The label used in JSON and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::ForeignSource => "foreign_source",
            DropReason::Fragment => "fragment",
            DropReason::Malformed => "malformed",
            DropReason::Denied => "denied",
            DropReason::Unresolvable => "unresolvable",
            DropReason::TooLarge => "too_large",
            DropReason::WouldBlock => "would_block",
            DropReason::SendError => "send_error",
        }
    }
}

/// Counters of UDP ASSOCIATE.
#[derive(Debug, Default)]
pub struct UdpMetrics {
    associations_active: AtomicU64,
    associations_total: AtomicU64,
    associations_refused: AtomicU64,
    datagrams_client_to_destination: AtomicU64,
    datagrams_destination_to_client: AtomicU64,
    bytes_client_to_destination: AtomicU64,
    bytes_destination_to_client: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct UdpSnapshot {
    pub associations_active: u64,
    pub associations_total: u64,
    /// Refused with `0x01` because the descriptors kept for them were all in use.
    pub associations_refused: u64,
    pub datagrams_client_to_destination: u64,
    pub datagrams_destination_to_client: u64,
    /// Payload bytes (without the SOCKS header).
    pub bytes_client_to_destination: u64,
    pub bytes_destination_to_client: u64,
    pub dropped: UdpDrops,
}

/// Datagrams dropped since start, by [`DropReason`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct UdpDrops {
    pub foreign_source: u64,
    pub fragment: u64,
    pub malformed: u64,
    pub denied: u64,
    pub unresolvable: u64,
    pub too_large: u64,
    pub would_block: u64,
    pub send_error: u64,
}

impl UdpDrops {
    pub fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::ForeignSource => self.foreign_source,
            DropReason::Fragment => self.fragment,
            DropReason::Malformed => self.malformed,
            DropReason::Denied => self.denied,
            DropReason::Unresolvable => self.unresolvable,
            DropReason::TooLarge => self.too_large,
            DropReason::WouldBlock => self.would_block,
            DropReason::SendError => self.send_error,
        }
    }

    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|reason| self.get(*reason)).sum()
    }
}

impl UdpMetrics {
    pub fn association_opened(&self) {
        self.associations_active.fetch_add(1, Relaxed);
        self.associations_total.fetch_add(1, Relaxed);
    }

    pub fn association_refused(&self) {
        self.associations_refused.fetch_add(1, Relaxed);
    }

    pub fn association_closed(&self) {
        self.associations_active.fetch_sub(1, Relaxed);
    }

    /// A datagram of `payload` bytes went from the client to a destination.
    pub fn sent_to_destination(&self, payload: usize) {
        self.datagrams_client_to_destination.fetch_add(1, Relaxed);
        self.bytes_client_to_destination.fetch_add(payload as u64, Relaxed);
    }

    /// A datagram of `payload` bytes went from a destination to the client.
    pub fn sent_to_client(&self, payload: usize) {
        self.datagrams_destination_to_client.fetch_add(1, Relaxed);
        self.bytes_destination_to_client.fetch_add(payload as u64, Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> UdpSnapshot {
        let dropped = |reason: DropReason| self.dropped[reason as usize].load(Relaxed);
        UdpSnapshot {
            associations_active: self.associations_active.load(Relaxed),
            associations_total: self.associations_total.load(Relaxed),
            associations_refused: self.associations_refused.load(Relaxed),
            datagrams_client_to_destination: self.datagrams_client_to_destination.load(Relaxed),
            datagrams_destination_to_client: self.datagrams_destination_to_client.load(Relaxed),
            bytes_client_to_destination: self.bytes_client_to_destination.load(Relaxed),
            bytes_destination_to_client: self.bytes_destination_to_client.load(Relaxed),
            dropped: UdpDrops {
                foreign_source: dropped(DropReason::ForeignSource),
                fragment: dropped(DropReason::Fragment),
                malformed: dropped(DropReason::Malformed),
                denied: dropped(DropReason::Denied),
                unresolvable: dropped(DropReason::Unresolvable),
                too_large: dropped(DropReason::TooLarge),
                would_block: dropped(DropReason::WouldBlock),
                send_error: dropped(DropReason::SendError),
            },
        }
    }
}

/// How a BIND ended before (or instead of) relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindOutcome {
    /// The expected peer connected: second reply sent, relaying.
    Connected,
    /// No expected peer within `bind_timeout_secs`: reply `0x06`.
    TimedOut,
    /// The client closed its control connection while waiting.
    ClientLeft,
    /// The named host is denied by the access rules: reply `0x02`, nothing listened.
    Denied,
    /// The named host does not resolve: reply `0x04`.
    Unresolvable,
    /// Cut at shutdown while waiting: reply `0x01`.
    Cut,
    /// Listening or accepting failed: reply `0x01`.
    Failed,
    /// Too many BINDs waiting from this client or in all, or no descriptor left: reply
    /// `0x01`, nothing listened.
    Limited,
}

impl BindOutcome {
    pub const ALL: [BindOutcome; 8] = [
        BindOutcome::Connected,
        BindOutcome::TimedOut,
        BindOutcome::ClientLeft,
        BindOutcome::Denied,
        BindOutcome::Unresolvable,
        BindOutcome::Cut,
        BindOutcome::Failed,
        BindOutcome::Limited,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BindOutcome::Connected => "connected",
            BindOutcome::TimedOut => "timed_out",
            BindOutcome::ClientLeft => "client_left",
            BindOutcome::Denied => "denied",
            BindOutcome::Unresolvable => "unresolvable",
            BindOutcome::Cut => "cut",
            BindOutcome::Failed => "failed",
            BindOutcome::Limited => "limited",
        }
    }
}

/// Counters of BIND.
#[derive(Debug, Default)]
pub struct BindMetrics {
    waits_active: AtomicU64,
    refused_peers: AtomicU64,
    outcomes: [AtomicU64; BindOutcome::ALL.len()],
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct BindSnapshot {
    /// BINDs listening for their peer now.
    pub waits_active: u64,
    /// Incoming connections refused because they came from another host than the one named.
    pub refused_peers: u64,
    pub outcomes: BindOutcomes,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct BindOutcomes {
    pub connected: u64,
    pub timed_out: u64,
    pub client_left: u64,
    pub denied: u64,
    pub unresolvable: u64,
    pub cut: u64,
    pub failed: u64,
    pub limited: u64,
}

impl BindOutcomes {
    pub fn get(&self, outcome: BindOutcome) -> u64 {
        match outcome {
            BindOutcome::Connected => self.connected,
            BindOutcome::TimedOut => self.timed_out,
            BindOutcome::ClientLeft => self.client_left,
            BindOutcome::Denied => self.denied,
            BindOutcome::Unresolvable => self.unresolvable,
            BindOutcome::Cut => self.cut,
            BindOutcome::Failed => self.failed,
            BindOutcome::Limited => self.limited,
        }
    }
}

impl BindMetrics {
    pub fn wait_started(&self) {
        self.waits_active.fetch_add(1, Relaxed);
    }

    pub fn wait_ended(&self) {
        self.waits_active.fetch_sub(1, Relaxed);
    }

    pub fn refused_peer(&self) {
        self.refused_peers.fetch_add(1, Relaxed);
    }

    pub fn outcome(&self, outcome: BindOutcome) {
        self.outcomes[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> BindSnapshot {
        let outcome = |o: BindOutcome| self.outcomes[o as usize].load(Relaxed);
        BindSnapshot {
            waits_active: self.waits_active.load(Relaxed),
            refused_peers: self.refused_peers.load(Relaxed),
            outcomes: BindOutcomes {
                connected: outcome(BindOutcome::Connected),
                timed_out: outcome(BindOutcome::TimedOut),
                client_left: outcome(BindOutcome::ClientLeft),
                denied: outcome(BindOutcome::Denied),
                unresolvable: outcome(BindOutcome::Unresolvable),
                cut: outcome(BindOutcome::Cut),
                failed: outcome(BindOutcome::Failed),
                limited: outcome(BindOutcome::Limited),
            },
        }
    }
}
