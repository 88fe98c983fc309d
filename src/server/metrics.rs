//! Process-level counters of the SOCKS server (sessions, bytes, handshake failures, PROXY
//! protocol refusals).
//!
//! Plain atomics: these are independent tallies read by the stats endpoint, not pool state.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

use super::auth::{AuthCounters, AuthCountersSnapshot};

#[derive(Debug, Default)]
pub struct ServerMetrics {
    sessions_active: AtomicU64,
    sessions_total: AtomicU64,
    bytes_client_to_upstream: AtomicU64,
    bytes_upstream_to_client: AtomicU64,
    handshake_failures: AtomicU64,
    rejected_over_limit: AtomicU64,
    proxy_untrusted: AtomicU64,
    proxy_header_invalid: AtomicU64,
    auth: Arc<AuthCounters>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ServerMetricsSnapshot {
    pub sessions_active: u64,
    pub sessions_total: u64,
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
}

impl ServerMetrics {
    pub fn session_started(&self) {
        self.sessions_active.fetch_add(1, Relaxed);
        self.sessions_total.fetch_add(1, Relaxed);
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
            bytes_client_to_upstream: self.bytes_client_to_upstream.load(Relaxed),
            bytes_upstream_to_client: self.bytes_upstream_to_client.load(Relaxed),
            handshake_failures: self.handshake_failures.load(Relaxed),
            rejected_over_limit: self.rejected_over_limit.load(Relaxed),
            proxy_untrusted: self.proxy_untrusted.load(Relaxed),
            proxy_header_invalid: self.proxy_header_invalid.load(Relaxed),
            auth: self.auth.snapshot(),
        }
    }
}
