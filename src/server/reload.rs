//! Reload: a new config applied to a running server without touching a session in flight.
//!
//! The running config's parts are swapped whole. Each session takes one snapshot of the
//! [`HandlerContext`] (authenticator, connector, timeouts) when it is accepted and keeps it to
//! its end; the next session takes the new one. The access rules are one shared
//! `ArcSwap<AccessPolicy>` read by the handler and the dialer at each check, so a new rule
//! holds for every connection made after the reload (a relay already running is never judged
//! again). The pool takes its new limits by message (`Pool::reconfigure`); turning it off
//! closes every spare and sends new sessions direct; turning it on starts one.
//!
//! A reload is applied whole or not at all. Refused, with the running config kept, when the
//! file cannot be read or is invalid (the same message `--check` prints), or when it changes a
//! key a reload does not apply (`config::RELOADABLE_KEYS`; the listener and stats sockets and
//! anything newer need a restart). Every outcome is logged, recorded as a telemetry event and
//! shown by the stats endpoint (`config_reload`, `poolsocks_config_last_reload_successful`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::auth::Authenticator;
use super::bind_waits::BindWaits;
use super::handler::HandlerContext;
use super::limit::ConnectionLimit;
use super::metrics::ServerMetrics;
use crate::access::{AccessPolicy, SharedPolicy};
use crate::config::{changed_keys, is_reloadable, loosenings, unconfirmed, Config, LiveConfig};
use crate::descriptors::DescriptorBudget;
use crate::logsafe::Escaped;
use crate::pool::{Pool, PoolOptions};
use crate::resolve::Resolver;
use crate::stats::LivePool;
use crate::telemetry::Telemetry;
use crate::upstream::{Connector, Dialer, DirectConnector};

/// Telemetry category of config loads.
pub const CATEGORY_CONFIG: &str = "config";

/// Applies a reloaded `logging.level` (a tracing filter directive); `main` owns the subscriber.
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Why a reload was refused. The message names the key (and the line, for an invalid file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{} changed, which a reload cannot apply (it needs a restart); nothing was applied",
        .0.join(", ")
    )]
    NeedsRestart(Vec<String>),
    #[error(
        "the new file opens the proxy up without saying so ({}): write {} in the file if that is \
         meant (a file cut short by a non-atomic write looks like this); nothing was applied",
        .what.join("; "),
        .keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
    )]
    Loosens { keys: Vec<&'static str>, what: Vec<String> },
    #[error("cannot start the connection pool: {0}")]
    Pool(String),
    #[error("the server is not running")]
    NotRunning,
}

/// What a reload that applied changed: the dotted keys, never their values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub changed: Vec<String>,
}

pub(super) enum Request {
    Config(Box<Config>),
    File(PathBuf),
}

type Reply = oneshot::Sender<Result<ReloadReport, ReloadError>>;
pub(super) type Requests = mpsc::UnboundedReceiver<(Request, Reply)>;

/// Asks a running server to reload. Cheap to clone; reloads are applied one at a time, in
/// the order asked.
#[derive(Clone)]
pub struct Reloader {
    requests: mpsc::UnboundedSender<(Request, Reply)>,
}

impl Reloader {
    pub(super) fn channel() -> (Reloader, Requests) {
        let (requests, receiver) = mpsc::unbounded_channel();
        (Reloader { requests }, receiver)
    }

    /// Applies `config` (already parsed and validated) if a reload may.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.ask(Request::Config(Box::new(config))).await
    }

    /// Reads, validates and applies the file at `path` (what SIGHUP does).
    pub async fn reload_file(&self, path: &Path) -> Result<ReloadReport, ReloadError> {
        self.ask(Request::File(path.to_path_buf())).await
    }

    async fn ask(&self, request: Request) -> Result<ReloadReport, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((request, reply)).map_err(|_| ReloadError::NotRunning)?;
        answer.await.unwrap_or(Err(ReloadError::NotRunning))
    }
}

/// Everything a reload swaps, owned by the server while it runs.
pub(super) struct Runtime {
    pub(super) config: Arc<LiveConfig>,
    pub(super) contexts: Arc<ArcSwap<HandlerContext>>,
    pub(super) limit: Arc<ConnectionLimit>,
    pub(super) pool: Arc<LivePool>,
    pub(super) access: SharedPolicy,
    pub(super) dialer: Arc<dyn Dialer>,
    pub(super) telemetry: Telemetry,
    pub(super) metrics: Arc<ServerMetrics>,
    pub(super) resolver: Arc<dyn Resolver>,
    pub(super) descriptors: Arc<DescriptorBudget>,
    pub(super) bind_waits: Arc<BindWaits>,
    /// A connector a harness injected: kept whatever a reload says about the pool.
    pub(super) injected: Option<Arc<dyn Connector>>,
    pub(super) log_level: Option<LogLevelHook>,
}

/// What every session's context shares, whatever the config says.
pub(super) struct Shared<'a> {
    pub(super) metrics: &'a Arc<ServerMetrics>,
    pub(super) telemetry: &'a Telemetry,
    pub(super) resolver: &'a Arc<dyn Resolver>,
    pub(super) descriptors: &'a Arc<DescriptorBudget>,
    pub(super) bind_waits: &'a Arc<BindWaits>,
}

/// The handler context a config describes.
pub(super) fn context(
    config: &Config,
    auth: Authenticator,
    access: SharedPolicy,
    connector: Arc<dyn Connector>,
    shared: Shared<'_>,
) -> HandlerContext {
    let server = &config.server;
    let Shared { metrics, telemetry, resolver, descriptors, bind_waits } = shared;
    HandlerContext {
        auth,
        access,
        connector,
        handshake_timeout: config.server.handshake_timeout(),
        session_idle_timeout: config.server.session_idle_timeout(),
        metrics: metrics.clone(),
        telemetry: telemetry.clone(),
        resolver: resolver.clone(),
        descriptors: descriptors.clone(),
        // These need a restart to change (they are not `RELOADABLE_KEYS`), so a reload builds
        // them as they were.
        udp: server.udp_associate.then(|| super::udp::UdpSettings {
            bind_address: server.udp_bind_address,
            idle_timeout: server.udp_idle_timeout(),
            reply_filter: server.udp_reply_filter,
        }),
        bind: server.bind.then(|| super::bind::BindSettings {
            timeout: server.bind_timeout(),
            waits: bind_waits.clone(),
        }),
        proxy_protocol: server.proxy_protocol.then(|| server.proxy_protocol_trusted.clone()),
    }
}

/// Reads and parses the file on the blocking pool: a slow disk or a large file never holds a
/// runtime worker that sessions and `/health` need.
async fn load_off_runtime(path: &Path) -> Result<(Config, String), String> {
    let path = path.to_path_buf();
    match tokio::task::spawn_blocking(move || Config::load_with_text(&path)).await {
        Ok(loaded) => loaded.map_err(|e| e.to_string()),
        Err(e) => Err(format!("reading the config file failed: {e}")),
    }
}

impl Runtime {
    /// Serves reload requests until every [`Reloader`] is gone or the server stops.
    pub(super) async fn serve(self, mut requests: Requests) {
        while let Some((request, reply)) = requests.recv().await {
            let outcome = match request {
                Request::Config(config) => self.apply(*config, "reload", None).await,
                Request::File(path) => match load_off_runtime(&path).await {
                    Ok((config, text)) => {
                        self.apply(config, &path.display().to_string(), Some(&text)).await
                    }
                    Err(e) => Err(self.refuse(ReloadError::Invalid(e))),
                },
            };
            let _ = reply.send(outcome);
        }
    }

    fn refuse(&self, error: ReloadError) -> ReloadError {
        let message = error.to_string();
        // Recorded before it is logged: whoever reads the log line finds the status set.
        self.config.refused(&message);
        self.telemetry.error(
            CATEGORY_CONFIG,
            "config reload refused; the running config stays",
            vec![("error", json!(message))],
        );
        // One line whatever the message holds (toml's errors quote the file over several).
        error!(error = %Escaped(&message), "config reload refused; the running config stays");
        error
    }

    /// Applies `new`. `text` is the file it came from, whose written keys confirm a loosening;
    /// a config handed over in code (`Reloader::reload`) is taken as meant.
    async fn apply(
        &self,
        new: Config,
        origin: &str,
        text: Option<&str>,
    ) -> Result<ReloadReport, ReloadError> {
        let started = Instant::now();
        let old = self.config.current();
        let changed = changed_keys(&old, &new);
        let fixed: Vec<String> = changed.iter().filter(|k| !is_reloadable(k)).cloned().collect();
        if !fixed.is_empty() {
            return Err(self.refuse(ReloadError::NeedsRestart(fixed)));
        }
        let opened = loosenings(&old, &new);
        let keys = text.map(|text| unconfirmed(&opened, text)).unwrap_or_default();
        if !keys.is_empty() {
            let what = opened.iter().map(|l| l.what.clone()).collect();
            return Err(self.refuse(ReloadError::Loosens { keys, what }));
        }

        // Everything that can fail comes first, so a refusal leaves nothing half applied.
        let options = PoolOptions::from_server_config(&new.server);
        let old_pool = self.pool.get();
        let new_pool = match (&old_pool, new.server.pool.enabled) {
            (Some(pool), true) => Some(pool.clone()),
            (None, true) => {
                let spawned =
                    Pool::spawn(options.clone(), self.dialer.clone(), self.telemetry.clone());
                match spawned.await {
                    Ok(pool) => Some(pool),
                    Err(e) => return Err(self.refuse(ReloadError::Pool(e.to_string()))),
                }
            }
            (_, false) => None,
        };

        // From here on nothing fails. Rules first: the dialer and the pool check them.
        self.access.store(Arc::new(AccessPolicy::from_config(&new)));
        self.telemetry.reconfigure(&new.telemetry);
        if let (Some(_), Some(pool)) = (&old_pool, &new_pool) {
            // The same pool: new limits by message (and a re-check of idle spares' peers).
            if let Err(e) = pool.reconfigure(options.clone()).await {
                warn!(error = %e, "the pool did not take its new limits; it keeps the old ones");
            }
        }
        let connector: Arc<dyn Connector> = match (&self.injected, &new_pool) {
            (Some(injected), _) => injected.clone(),
            (None, Some(pool)) => Arc::new(pool.clone()),
            (None, None) => {
                Arc::new(DirectConnector::with_dialer(self.dialer.clone(), options.dial_limits()))
            }
        };
        let auth = self.contexts.load().auth.reloaded(&old.auth, &new.auth);
        let shared = Shared {
            metrics: &self.metrics,
            telemetry: &self.telemetry,
            resolver: &self.resolver,
            descriptors: &self.descriptors,
            bind_waits: &self.bind_waits,
        };
        self.contexts.store(Arc::new(context(&new, auth, self.access.clone(), connector, shared)));
        self.pool.set(new_pool.clone());
        self.limit.resize(new.server.max_connections);
        if old.logging.level != new.logging.level {
            if let Some(hook) = &self.log_level {
                if let Err(e) = hook(&new.logging.level) {
                    warn!(error = %e, "logging.level not applied");
                }
            }
        }
        if let (Some(pool), None) = (old_pool, &new_pool) {
            // Sessions already on it keep their connections; its spares close now.
            tokio::spawn(async move { pool.shutdown().await });
        }
        self.config.applied(new);
        for loosening in &opened {
            warn!(origin, "config reload opens the proxy up: it {}", loosening.what);
            self.telemetry.warning(
                CATEGORY_CONFIG,
                "config reload opens the proxy up",
                vec![("what", json!(loosening.what))],
            );
        }
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        if changed.is_empty() {
            info!(origin, took_ms, "config reloaded: nothing changed");
        } else {
            info!(origin, changed = %changed.join(", "), took_ms, "config reloaded");
        }
        self.telemetry.info(CATEGORY_CONFIG, "config reloaded", vec![("changed", json!(changed))]);
        Ok(ReloadReport { changed })
    }
}
