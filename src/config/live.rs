//! The config in force and how its last (re)load went, swapped whole on each reload.
//!
//! Readers take a snapshot (`current()`), never a lock: a request or a session reads one
//! config from start to end even if a reload lands meanwhile.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::{config_hash, Config};

/// How the config in force came to be, for `/api/pool/stats` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadStatus {
    /// When the config in force was loaded (at start or by the last reload that applied),
    /// milliseconds since the Unix epoch.
    pub loaded_at_ms: u64,
    /// When a reload was last tried, if ever.
    pub last_reload_attempt_ms: Option<u64>,
    /// False when the last reload was refused (the previous config is still in force).
    pub last_reload_successful: bool,
    /// Why the last reload was refused (the same text as logged; never a secret).
    pub last_reload_error: Option<String>,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
    /// BLAKE2s-256 of the effective config (see `config::config_hash`).
    pub config_hash: String,
}

/// The running config and its load status.
#[derive(Debug)]
pub struct LiveConfig {
    config: ArcSwap<Config>,
    status: ArcSwap<LoadStatus>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl LiveConfig {
    pub fn new(config: Config) -> Arc<Self> {
        let status = LoadStatus {
            loaded_at_ms: now_ms(),
            last_reload_attempt_ms: None,
            last_reload_successful: true,
            last_reload_error: None,
            reloads_applied: 0,
            reloads_refused: 0,
            config_hash: config_hash(&config),
        };
        Arc::new(LiveConfig {
            config: ArcSwap::from_pointee(config),
            status: ArcSwap::from_pointee(status),
        })
    }

    /// The config in force now.
    pub fn current(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn status(&self) -> Arc<LoadStatus> {
        self.status.load_full()
    }

    /// A reload applied `config`.
    pub fn applied(&self, config: Config) {
        let now = now_ms();
        let previous = self.status();
        let status = LoadStatus {
            loaded_at_ms: now,
            last_reload_attempt_ms: Some(now),
            last_reload_successful: true,
            last_reload_error: None,
            reloads_applied: previous.reloads_applied + 1,
            reloads_refused: previous.reloads_refused,
            config_hash: config_hash(&config),
        };
        self.config.store(Arc::new(config));
        self.status.store(Arc::new(status));
    }

    /// A reload was refused; the config in force stays.
    pub fn refused(&self, why: &str) {
        let previous = self.status();
        self.status.store(Arc::new(LoadStatus {
            last_reload_attempt_ms: Some(now_ms()),
            last_reload_successful: false,
            last_reload_error: Some(why.to_string()),
            reloads_refused: previous.reloads_refused + 1,
            ..(*previous).clone()
        }));
    }
}
