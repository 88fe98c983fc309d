//! [`Pool`]: the handle a server or a harness holds. It implements `upstream::Connector`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};
use serde_json::json;
use tokio::sync::watch;

use super::admission::Admission;
use super::category;
use super::checkout_wait::CheckoutWaits;
use super::directory::{CheapRoute, Directory, DirectoryArgs, Route, Routes};
use super::messages::{Checkout, DirectoryMsg, ManagerMsg, OutsideDial, SweepReport};
use super::options::PoolOptions;
use super::stats::{BudgetStats, DestStats, PoolStats};
use crate::socks::TargetAddr;
use crate::telemetry::Telemetry;
use crate::upstream::{BoxFuture, ConnectError, Connector, DialLimits, Dialer, Origin, Upstream};

/// Why the pool could not do what a harness asked.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("could not start the pool: {0}")]
    Spawn(String),
    #[error("the pool did not answer: {0}")]
    Unavailable(String),
}

/// A running pool. Cheap to clone; every clone talks to the same actors.
#[derive(Clone)]
pub struct Pool {
    directory: ActorRef<DirectoryMsg>,
    routes: Routes,
    dialer: Arc<dyn Dialer>,
    /// Swapped whole by [`Pool::reconfigure`]; each checkout reads the current ones.
    options: Arc<ArcSwap<PoolOptions>>,
    telemetry: Telemetry,
    fallback_dials: Arc<AtomicU64>,
    /// Checkouts of destinations kept without spares, dialed without asking their manager.
    bypassed: Arc<AtomicU64>,
    /// How long each checkout waited for its manager's answer: the pool's cost on the path.
    checkout_waits: Arc<CheckoutWaits>,
}

/// Harness calls are not on a client's path; this only bounds a wedged pool.
const HARNESS_CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Pool {
    /// Starts the Directory (which starts the GlobalBudget, the Janitor, and PoolManagers on
    /// demand). `dialer` opens every upstream connection: background spares and misses alike.
    pub async fn spawn(
        options: PoolOptions,
        dialer: Arc<dyn Dialer>,
        telemetry: Telemetry,
    ) -> Result<Pool, PoolError> {
        let routes = Routes::default();
        let args = DirectoryArgs {
            options: Arc::new(options.clone()),
            dialer: Arc::clone(&dialer),
            telemetry: telemetry.clone(),
            routes: routes.clone(),
        };
        let (directory, _) = Actor::spawn(None, Directory, args)
            .await
            .map_err(|e| PoolError::Spawn(e.to_string()))?;
        Ok(Pool {
            directory,
            routes,
            dialer,
            options: Arc::new(ArcSwap::from_pointee(options)),
            telemetry,
            fallback_dials: Arc::new(AtomicU64::new(0)),
            bypassed: Arc::new(AtomicU64::new(0)),
            checkout_waits: Arc::default(),
        })
    }

    /// The options in force.
    pub fn options(&self) -> Arc<PoolOptions> {
        self.options.load_full()
    }

    /// Applies reloaded options by message (see [`DirectoryMsg::Reconfigure`]): the budget
    /// evicts down to a lowered `max_total_idle`, managers trim to a lowered
    /// `max_idle_per_dest` and close spares the rules in force no longer allow. New checkouts
    /// use the new timeouts at once. Returns once every actor has been sent its part.
    pub async fn reconfigure(&self, options: PoolOptions) -> Result<(), PoolError> {
        self.options.store(Arc::new(options.clone()));
        self.ask(|reply| DirectoryMsg::Reconfigure(Box::new(options), reply)).await
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The root actor, for harnesses that send [`DirectoryMsg`]s themselves.
    pub fn directory(&self) -> &ActorRef<DirectoryMsg> {
        &self.directory
    }

    async fn ask<T: Send + 'static>(
        &self,
        request: impl FnOnce(RpcReplyPort<T>) -> DirectoryMsg,
    ) -> Result<T, PoolError> {
        match self.directory.call(request, Some(HARNESS_CALL_TIMEOUT)).await {
            Ok(CallResult::Success(value)) => Ok(value),
            Ok(CallResult::Timeout) => Err(PoolError::Unavailable("timed out".into())),
            Ok(CallResult::SenderError) => Err(PoolError::Unavailable("no reply".into())),
            Err(e) => Err(PoolError::Unavailable(e.to_string())),
        }
    }

    /// The whole pool's counters, with a per-destination breakdown.
    pub async fn stats(&self) -> Result<PoolStats, PoolError> {
        let mut stats = self.ask(DirectoryMsg::Stats).await?;
        stats.fallback_dials = self.fallback_dials.load(Ordering::Relaxed);
        stats.bypassed += self.bypassed.load(Ordering::Relaxed);
        stats.checkout_wait = self.checkout_waits.snapshot();
        Ok(stats)
    }

    /// Runs one Janitor pass now (expiry and pruning) and reports what it did.
    pub async fn run_janitor(&self) -> Result<SweepReport, PoolError> {
        self.ask(DirectoryMsg::RunJanitor).await
    }

    /// The PoolManager of a destination, if it has one (to send it messages or faults).
    pub async fn manager_of(
        &self,
        target: &TargetAddr,
    ) -> Result<Option<ActorRef<ManagerMsg>>, PoolError> {
        let target = target.clone();
        self.ask(|reply| DirectoryMsg::ManagerOf(target, reply)).await
    }

    /// A live view of a destination's counters, updated after every message its manager
    /// handles; await changes with `wait_for`. Creates the destination's manager if needed.
    /// The view survives manager restarts (not pruning).
    pub async fn watch_destination(
        &self,
        target: &TargetAddr,
    ) -> Result<watch::Receiver<DestStats>, PoolError> {
        let target = target.clone();
        self.ask(|reply| DirectoryMsg::WatchDestination(target, reply)).await
    }

    /// A live view of the GlobalBudget.
    pub async fn watch_budget(&self) -> Result<watch::Receiver<BudgetStats>, PoolError> {
        self.ask(DirectoryMsg::WatchBudget).await
    }

    /// Checkouts answered by a direct dial because the pool failed or was too slow.
    pub fn fallback_dials(&self) -> u64 {
        self.fallback_dials.load(Ordering::Relaxed)
    }

    /// Stops every actor and closes every spare. Leases still out end harmlessly.
    pub async fn shutdown(&self) {
        let _ = self
            .directory
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10)))
            .await;
    }

    /// The pool's answer to a checkout, or why there is none. Straight to the destination's
    /// manager when the Directory has published its route; through the Directory when there
    /// is none (only harnesses that admit every destination ask before a first dial) and
    /// whenever the direct send fails (the manager died, is being restarted or was pruned),
    /// since the Directory knows what replaced it.
    async fn checkout(&self, target: &TargetAddr) -> Result<Checkout, String> {
        let checkout_timeout = self.options.load().checkout_timeout;
        if let Some(Route::Managed(route)) = self.routes.get(target) {
            let manager = route.manager;
            match manager.call(ManagerMsg::AcquireDirect, Some(checkout_timeout)).await {
                Ok(CallResult::Success(checkout)) => return Ok(checkout),
                // A wedged manager: the client has waited long enough, it dials directly.
                Ok(CallResult::Timeout) => {
                    return Err(format!("no answer within {checkout_timeout:?}"))
                }
                Ok(CallResult::SenderError) | Err(_) => {}
            }
        }
        let target_owned = target.clone();
        match self
            .directory
            .call(|reply| DirectoryMsg::Acquire(target_owned, reply), Some(checkout_timeout))
            .await
        {
            Ok(CallResult::Success(checkout)) => Ok(checkout),
            Ok(CallResult::Timeout) => Err(format!("no answer within {checkout_timeout:?}")),
            Ok(CallResult::SenderError) => Err("the pool dropped the request".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn dial(&self, target: &TargetAddr) -> Result<tokio::net::TcpStream, ConnectError> {
        let limits = self.options.load().dial_limits();
        dial_within(self.dialer.as_ref(), target, limits).await
    }
}

/// Dials through `dialer`, bounded by `limits.overall` even if an injected dialer ignores it,
/// so a client is never stuck and a pending create always ends.
pub(crate) async fn dial_within(
    dialer: &dyn Dialer,
    target: &TargetAddr,
    limits: DialLimits,
) -> Result<tokio::net::TcpStream, ConnectError> {
    match tokio::time::timeout(limits.overall, dialer.dial(target.clone(), limits)).await {
        Ok(result) => result,
        Err(_) => {
            Err(ConnectError::PhaseTimeout { target: target.clone(), timeout: limits.overall })
        }
    }
}

/// Spares one checkout may try and find stale before the client is dialed directly.
const STALE_SPARES_PER_CHECKOUT: usize = 2;

impl Pool {
    /// Whether `target` is one the pool keeps no spares for (`exclude_ports`, and
    /// `exclude_networks` for an address literal; a name's address is judged after its dial).
    fn excluded(&self, target: &TargetAddr) -> bool {
        let options = self.options.load();
        options.exclude_ports.iter().any(|range| range.contains(target.port()))
            || matches!(target, TargetAddr::Ip(addr) if options.excluded_address(addr.ip()))
    }

    /// A spare about to be handed to a client: still connected (a server's reset between the
    /// manager's check and now shows as no peer), and to a peer the rules still allow.
    fn usable(&self, target: &TargetAddr, stream: &tokio::net::TcpStream) -> bool {
        stream.peer_addr().is_ok_and(|peer| self.dialer.still_allowed(target, peer))
    }

    /// A destination with no route (not seen yet, seen once, or forgotten): dialed at once,
    /// and the Directory told afterwards how the dial went, by a message that needs no answer.
    /// It then counts a first sighting (a cheap one is routed as cheap, so its next checkouts
    /// need no message at all) or admits a second one (its new manager counts this dial as a
    /// miss), just as if the handle had asked first. Asking first cost every new destination
    /// an actor round trip before its dial, and on 10,000 loopback destinations a tenth of
    /// the sessions are new ones.
    async fn dial_unrouted(&self, target: &TargetAddr) -> Result<Upstream, ConnectError> {
        let started = tokio::time::Instant::now();
        let dialed = self.dial(target).await;
        let dial = OutsideDial {
            ok: dialed.is_ok(),
            took: started.elapsed(),
            excluded: self.landed_excluded(&dialed),
        };
        // Lost only while the pool stops: the destination is then simply judged again.
        let _ = self.directory.cast(DirectoryMsg::Dialed { target: target.clone(), dial });
        Ok(Upstream::dialed(dialed?))
    }

    /// Whether a dial landed on an `exclude_networks` address: only a name's address is
    /// unknown before its dial (a literal was judged already).
    fn landed_excluded(&self, dialed: &Result<tokio::net::TcpStream, ConnectError>) -> bool {
        let options = self.options.load();
        !options.exclude_networks.is_empty()
            && dialed.as_ref().is_ok_and(|stream| {
                stream.peer_addr().is_ok_and(|peer| options.excluded_address(peer.ip()))
            })
    }

    /// A destination routed as cheap: dialed without a message, its average dial time kept
    /// on the route; once that is no longer cheap the Directory is told to drop the route.
    async fn dial_cheap(
        &self,
        target: &TargetAddr,
        route: &CheapRoute,
    ) -> Result<Upstream, ConnectError> {
        self.bypassed.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let stream = self.dial(target).await?;
        if !route.observe(started.elapsed(), self.options.load().cheap_dial) {
            let _ = self.directory.cast(DirectoryMsg::NoLongerCheap(target.clone()));
        }
        Ok(Upstream::dialed(stream))
    }

    /// The caller's own dial after a miss, reported to the manager.
    async fn dial_for_miss(
        &self,
        target: &TargetAddr,
        mut lease: super::PoolLease,
    ) -> Result<Upstream, ConnectError> {
        let started = tokio::time::Instant::now();
        let dialed = self.dial(target).await;
        let dial = OutsideDial {
            ok: dialed.is_ok(),
            took: started.elapsed(),
            excluded: self.landed_excluded(&dialed),
        };
        lease.report_dial(dial);
        // On error the lease is dropped here, which ends it.
        Ok(Upstream::leased(dialed?, Origin::Dialed, Box::new(lease)))
    }
}

impl Connector for Pool {
    /// A pooled spare if there is a usable one; else a dial of our own, leased so that an
    /// untouched connection can still come back. A spare found dead or no longer allowed is
    /// closed and the next one (or a dial) is tried: the client never sees it. If the pool
    /// fails or is slow in any way, a plain direct dial: a client never fails because of the
    /// pool, and gets the reply its own dial earns.
    fn acquire<'a>(
        &'a self,
        target: &'a TargetAddr,
    ) -> BoxFuture<'a, Result<Upstream, ConnectError>> {
        Box::pin(async move {
            if self.excluded(target) {
                return Ok(Upstream::dialed(self.dial(target).await?));
            }
            match self.routes.get(target) {
                Some(Route::Cheap(route)) => return self.dial_cheap(target, &route).await,
                Some(Route::Managed(route)) if route.bypass() => {
                    self.bypassed.fetch_add(1, Ordering::Relaxed);
                    return Ok(Upstream::dialed(self.dial(target).await?));
                }
                Some(Route::Managed(_)) => {}
                // Admitted on a second sighting: nothing the Directory could answer now would
                // be a spare. (Harnesses that admit every destination still ask first.)
                None if self.options.load().admission != Admission::Always => {
                    return self.dial_unrouted(target).await;
                }
                None => {}
            }
            for _ in 0..=STALE_SPARES_PER_CHECKOUT {
                let asked = tokio::time::Instant::now();
                let answer = self.checkout(target).await;
                self.checkout_waits.record(asked.elapsed());
                match answer {
                    Ok(Checkout::Hit { stream, lease }) => {
                        if self.usable(target, &stream) {
                            return Ok(Upstream::leased(stream, Origin::Pooled, Box::new(lease)));
                        }
                        drop(stream);
                        lease.stale();
                    }
                    Ok(Checkout::Miss { lease }) => return self.dial_for_miss(target, lease).await,
                    // Not managed after all (pruned meanwhile, or a cheap destination whose
                    // route was being published): dialed, nothing to track.
                    Ok(Checkout::Pass) => return Ok(Upstream::dialed(self.dial(target).await?)),
                    Err(why) => {
                        self.fallback_dials.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%target, %why, "pool unavailable; dialing directly");
                        self.telemetry.warning(
                            category::POOL_FALLBACK,
                            format!("pool unavailable for {target} ({why}); dialed directly"),
                            vec![("destination", json!(target.to_string()))],
                        );
                        return Ok(Upstream::dialed(self.dial(target).await?));
                    }
                }
            }
            // Every spare tried was stale: this client dials for itself.
            self.fallback_dials.fetch_add(1, Ordering::Relaxed);
            Ok(Upstream::dialed(self.dial(target).await?))
        })
    }
}
