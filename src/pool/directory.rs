//! The Directory: maps each destination to its PoolManager and supervises the pool's actors.
//!
//! It spawns the GlobalBudget and the Janitor linked in `pre_start`, and PoolManagers linked on
//! demand. It publishes its map as [`Routes`], so `Pool` handles send checkouts straight to a
//! known manager (one hop instead of two). A destination with no route is dialed by the handle
//! at once and reported here afterwards (`DirectoryMsg::Dialed`, no answer awaited), which is
//! where first sightings are counted, cheap destinations routed and second sightings given a
//! manager; a checkout whose direct send failed comes through here too. The Directory is the only
//! writer of the routes, so they never list a manager it dropped. Pruning stays race-free: a
//! manager that reported itself cold refuses direct checkouts (the caller then comes through
//! the Directory), and the Directory removes its route before stopping it. Restarts are
//! decided in `handle_supervisor_evt`:
//! - a PoolManager that fails, is killed or stops unasked is replaced at once (its spares die
//!   with it; the budget frees its slots; its counters carry over);
//! - a failed GlobalBudget takes all PoolManagers with it (their spares hold its slots), then
//!   everything starts afresh; a failed Janitor is simply restarted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::admission::{Admission, Doorkeeper};
use super::budget::{BudgetArgs, GlobalBudget};
use super::category;
use super::janitor::{Janitor, JanitorArgs};
use super::manager::{ManagerArgs, PoolManager};
use super::messages::{
    BudgetMsg, Checkout, DirectoryMsg, JanitorMsg, ManagerMsg, ManagerSweep, OutsideDial,
    SweepReport,
};
use super::options::PoolOptions;
use super::stats::{BudgetStats, DestCounters, DestStats, PoolStats};
use crate::socks::TargetAddr;
use crate::telemetry::Telemetry;
use crate::upstream::Dialer;

pub struct Directory;

/// Destinations sampled when one must be forgotten (an approximate LRU, as Redis does): enough
/// to find a cold one almost always, without a scan of every destination per new name.
const EVICTION_SAMPLE: usize = 16;

/// Pruned destinations after which the allocator is asked to give free memory back, once the
/// last of their managers has stopped: each held about 12 KiB, so a few hundred are worth a
/// trim. Once a sweep prunes none, whatever was pruned since the last trim is given back too,
/// or the tail of a burst (fewer than this many) would stay resident.
const TRIM_AFTER_PRUNED: usize = 256;

pub struct DirectoryArgs {
    pub options: Arc<PoolOptions>,
    pub dialer: Arc<dyn Dialer>,
    pub telemetry: Telemetry,
    pub routes: Routes,
}

/// Each destination's route, written only by the Directory, read by `Pool` handles so that a
/// checkout needs no Directory hop. A read lock is held only for a map lookup.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<HashMap<TargetAddr, Route>>>);

/// Where a handle sends a destination's checkouts, and what it may skip.
#[derive(Clone)]
pub enum Route {
    /// A PoolManager keeps this destination's spares (or decided it gets none).
    Managed(ManagedRoute),
    /// A destination whose dials cost less than `cheap_dial`, measured by the handles that
    /// dialed it: it gets no manager at all, and handles dial it without any message.
    Cheap(CheapRoute),
}

#[derive(Clone)]
pub struct ManagedRoute {
    pub manager: ActorRef<ManagerMsg>,
    /// The manager's published view: a destination it keeps no spares for, for a reason that
    /// lasts (cheap dials, excluded), is dialed by the handle without a message (see `Pool`).
    view: watch::Receiver<DestStats>,
    /// Checkouts seen for this route, so that one in [`BYPASS_SAMPLE`] still goes to the
    /// manager and keeps its measurements (dial time, rate) current.
    seen: Arc<AtomicU32>,
}

/// One checkout in this many of a bypassed destination still goes through its manager.
pub const BYPASS_SAMPLE: u32 = 16;

impl ManagedRoute {
    /// Whether this checkout may skip the manager: the destination gets no spares for a
    /// lasting reason, and this is not a sampled checkout.
    pub fn bypass(&self) -> bool {
        let lasting = matches!(
            self.view.borrow().policy.reason,
            super::stats::TargetReason::CheapDial | super::stats::TargetReason::Excluded
        );
        lasting && self.seen.fetch_add(1, Ordering::Relaxed) % BYPASS_SAMPLE != 0
    }
}

/// A cheap destination's dial time, a moving average the handles keep by themselves: every
/// dial is timed anyway, so none needs sampling through an actor.
#[derive(Clone)]
pub struct CheapRoute {
    dial_us: Arc<AtomicU32>,
}

/// Weight of a new dial in a cheap route's average (the managers' own, see `refill`).
const CHEAP_DIAL_WEIGHT: f64 = 0.2;

impl CheapRoute {
    fn new(first_dial: Duration) -> Self {
        CheapRoute { dial_us: Arc::new(AtomicU32::new(micros(first_dial))) }
    }

    /// Folds in one dial's time; false once the average is no longer under `cheap_dial`.
    /// Concurrent updates may lose one another's sample, which only slows the average.
    pub fn observe(&self, took: Duration, cheap_dial: Duration) -> bool {
        let old = f64::from(self.dial_us.load(Ordering::Relaxed));
        let new = old + CHEAP_DIAL_WEIGHT * (f64::from(micros(took)) - old);
        // In range by construction: between two u32 values.
        let new = new.round() as u32;
        self.dial_us.store(new, Ordering::Relaxed);
        u128::from(new) < cheap_dial.as_micros()
    }
}

fn micros(took: Duration) -> u32 {
    u32::try_from(took.as_micros()).unwrap_or(u32::MAX)
}

impl Routes {
    pub fn get(&self, target: &TargetAddr) -> Option<Route> {
        // A poisoned lock (a panic mid-update, which these short sections cannot do) only
        // costs the shortcut: callers then go through the Directory.
        self.0.read().ok().and_then(|map| map.get(target).cloned())
    }

    fn set(
        &self,
        target: TargetAddr,
        manager: ActorRef<ManagerMsg>,
        view: watch::Receiver<DestStats>,
    ) {
        if let Ok(mut map) = self.0.write() {
            let route = ManagedRoute { manager, view, seen: Arc::default() };
            map.insert(target, Route::Managed(route));
        }
    }

    fn set_cheap(&self, target: TargetAddr, first_dial: Duration) {
        if let Ok(mut map) = self.0.write() {
            map.insert(target, Route::Cheap(CheapRoute::new(first_dial)));
        }
    }

    fn remove(&self, target: &TargetAddr) {
        if let Ok(mut map) = self.0.write() {
            map.remove(target);
        }
    }

    /// Removes a destination's route only if it is a cheap one (a manager may stand there now).
    fn remove_cheap(&self, target: &TargetAddr) {
        if let Ok(mut map) = self.0.write() {
            if matches!(map.get(target), Some(Route::Cheap(_))) {
                map.remove(target);
            }
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.0.write() {
            map.clear();
        }
    }

    /// Gives back the room of routes removed (see `memory::oversized`).
    fn shrink_if_oversized(&self) {
        let oversized =
            self.0.read().is_ok_and(|map| crate::memory::oversized(map.len(), map.capacity()));
        if oversized {
            if let Ok(mut map) = self.0.write() {
                map.shrink_to_fit();
            }
        }
    }
}

/// Destinations routed as cheap, at most `max_destinations` of them, the oldest forgotten
/// first (forgetting one costs only a Directory hop at its next checkout).
#[derive(Default)]
struct CheapDestinations {
    listed: HashMap<TargetAddr, u64>,
    order: VecDeque<(TargetAddr, u64)>,
    next: u64,
}

impl CheapDestinations {
    fn contains(&self, target: &TargetAddr) -> bool {
        self.listed.contains_key(target)
    }

    fn len(&self) -> usize {
        self.listed.len()
    }

    /// Lists `target`; returns the destination forgotten to stay within `capacity`, if any.
    fn insert(&mut self, target: TargetAddr, capacity: usize) -> Option<TargetAddr> {
        let mut forgotten = None;
        if self.listed.len() >= capacity.max(1) {
            while let Some((oldest, seq)) = self.order.pop_front() {
                if self.listed.get(&oldest) == Some(&seq) {
                    self.listed.remove(&oldest);
                    forgotten = Some(oldest);
                    break;
                }
            }
        }
        self.next += 1;
        self.listed.insert(target.clone(), self.next);
        self.order.push_back((target, self.next));
        // Removed entries leave stale queue entries behind; keep the queue near the map's size.
        if self.order.len() > 2 * self.listed.len().max(16) {
            let listed = &self.listed;
            self.order.retain(|(target, seq)| listed.get(target) == Some(seq));
        }
        forgotten
    }

    fn remove(&mut self, target: &TargetAddr) -> bool {
        self.listed.remove(target).is_some()
    }

    fn clear(&mut self) {
        self.listed.clear();
        self.order.clear();
    }
}

struct Entry {
    manager: ActorRef<ManagerMsg>,
    stats: Arc<watch::Sender<DestStats>>,
}

pub struct DirectoryState {
    options: Arc<PoolOptions>,
    dialer: Arc<dyn Dialer>,
    telemetry: Telemetry,
    budget: ActorRef<BudgetMsg>,
    budget_stats: Arc<watch::Sender<BudgetStats>>,
    janitor: ActorRef<JanitorMsg>,
    managers: HashMap<TargetAddr, Entry>,
    routes: Routes,
    by_id: HashMap<ActorId, TargetAddr>,
    /// History of destinations pruned or lost with a failed budget.
    retired: DestCounters,
    manager_restarts: u64,
    pruned: u64,
    /// First sightings not yet admitted (see `admission`).
    doorkeeper: Option<Doorkeeper>,
    /// Checkouts answered `Pass` (a destination's first sighting).
    passes: u64,
    /// Destinations forgotten to stay within `max_destinations`.
    forgotten: u64,
    /// Destinations routed as cheap, without a manager.
    cheap: CheapDestinations,
    /// Checkouts of a cheap destination that still reached the Directory (a race with its
    /// route being published), answered `Pass`.
    cheap_passes: u64,
    /// Destinations pruned since the allocator was last asked to give free memory back.
    pruned_since_trim: usize,
    /// Destinations the latest sweep pruned.
    pruned_last_sweep: u64,
    /// Pruned managers not yet stopped. A manager's state reaches the Directory with its
    /// termination and is freed there: only once the last is in is a trim worth it (a pass
    /// later was too early when thousands stop at once).
    stopping: HashSet<ActorId>,
}

impl Actor for Directory {
    type Msg = DirectoryMsg;
    type State = DirectoryState;
    type Arguments = DirectoryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DirectoryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let budget_stats = Arc::new(watch::Sender::new(BudgetStats::default()));
        let budget = spawn_budget(&myself, &args.options, &budget_stats).await?;
        let janitor = spawn_janitor(&myself, &args.options).await?;
        Ok(DirectoryState {
            dialer: args.dialer,
            telemetry: args.telemetry,
            budget,
            budget_stats,
            janitor,
            managers: HashMap::new(),
            routes: args.routes,
            by_id: HashMap::new(),
            retired: DestCounters::default(),
            manager_restarts: 0,
            pruned: 0,
            doorkeeper: match args.options.admission {
                Admission::Always => None,
                Admission::SecondSighting { window } => {
                    Some(Doorkeeper::new(window, args.options.max_destinations))
                }
            },
            passes: 0,
            forgotten: 0,
            cheap: CheapDestinations::default(),
            cheap_passes: 0,
            pruned_since_trim: 0,
            pruned_last_sweep: 0,
            stopping: HashSet::new(),
            options: args.options,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        // Stopping the linked children closes every spare with the pool, before shutdown returns.
        state.routes.clear();
        myself
            .stop_children_and_wait(Some("pool shut down".into()), Some(Duration::from_secs(5)))
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: DirectoryMsg,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DirectoryMsg::Acquire(target, reply) => {
                if state.cheap.contains(&target) {
                    state.cheap_passes += 1;
                    let _ = reply.send(Checkout::Pass);
                    return Ok(());
                }
                if !state.managers.contains_key(&target) && !state.admits(&target) {
                    state.passes += 1;
                    let _ = reply.send(Checkout::Pass);
                    return Ok(());
                }
                let mut request = ManagerMsg::Acquire(reply);
                // Two tries: a manager that died a moment ago (its supervision event not seen
                // yet) is replaced and asked again.
                for _ in 0..2 {
                    let Some(manager) = state.manager_for(&myself, &target).await else {
                        return Ok(()); // dropping the reply makes the caller dial directly
                    };
                    match manager.cast(request) {
                        Ok(()) => return Ok(()),
                        Err(ractor::MessagingErr::SendErr(returned)) => {
                            state.replace_dead(&myself, manager.get_id(), "was found dead").await;
                            request = returned;
                        }
                        Err(_) => return Ok(()),
                    }
                }
            }
            DirectoryMsg::Dialed { target, dial } => state.dialed(&myself, target, dial).await,
            DirectoryMsg::NoLongerCheap(target) => {
                if state.cheap.remove(&target) {
                    state.routes.remove_cheap(&target);
                }
            }
            DirectoryMsg::Stats(reply) => {
                let _ = reply.send(state.stats());
            }
            DirectoryMsg::Sweep(reply) => {
                let report = state.sweep().await;
                let _ = reply.send(report);
            }
            DirectoryMsg::RunJanitor(reply) => {
                if let Err(ractor::MessagingErr::SendErr(JanitorMsg::Tick(Some(reply)))) =
                    state.janitor.cast(JanitorMsg::Tick(Some(reply)))
                {
                    // Janitor restarting: sweep directly rather than leave the caller waiting.
                    let report = state.sweep().await;
                    let _ = reply.send(report);
                }
            }
            DirectoryMsg::ManagerOf(target, reply) => {
                let _ = reply.send(state.managers.get(&target).map(|e| e.manager.clone()));
            }
            DirectoryMsg::WatchDestination(target, reply) => {
                if state.manager_for(&myself, &target).await.is_some() {
                    if let Some(entry) = state.managers.get(&target) {
                        let _ = reply.send(entry.stats.subscribe());
                    }
                }
            }
            DirectoryMsg::WatchBudget(reply) => {
                let _ = reply.send(state.budget_stats.subscribe());
            }
            DirectoryMsg::Reconfigure(options, reply) => {
                state.reconfigure(&myself, *options).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        let (who, why) = match &event {
            SupervisionEvent::ActorFailed(who, error) => (who.clone(), format!("failed: {error}")),
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                (who.clone(), format!("stopped ({})", reason.as_deref().unwrap_or("no reason")))
            }
            _ => return Ok(()),
        };
        let id = who.get_id();
        if id == state.budget.get_id() {
            state.restart_budget(&myself, &why).await?;
        } else if id == state.janitor.get_id() {
            state.telemetry.error(
                category::POOL_SUPERVISOR,
                format!("janitor {why}; restarted"),
                vec![],
            );
            state.janitor = spawn_janitor(&myself, &state.options).await?;
        } else if state.by_id.contains_key(&id) {
            state.replace_dead(&myself, id, &why).await;
        } else {
            // A manager pruned on purpose, or already replaced: its slots are freed for sure.
            let _ = state.budget.cast(BudgetMsg::ReleaseOwner(id));
            if state.stopping.remove(&id) && state.stopping.is_empty() {
                // The manager's state came with the event: freed before the trim.
                drop(event);
                state.stopping.shrink_to_fit();
                if state.pruned_since_trim >= TRIM_AFTER_PRUNED {
                    state.give_back_memory();
                }
            }
        }
        Ok(())
    }
}

async fn spawn_budget(
    directory: &ActorRef<DirectoryMsg>,
    options: &PoolOptions,
    stats: &Arc<watch::Sender<BudgetStats>>,
) -> Result<ActorRef<BudgetMsg>, ActorProcessingErr> {
    let args = BudgetArgs {
        max_total_idle: options.max_total_idle,
        eviction_margin: options.eviction_margin,
        stats: Arc::clone(stats),
    };
    let (budget, _) = Actor::spawn_linked(None, GlobalBudget, args, directory.get_cell()).await?;
    Ok(budget)
}

async fn spawn_janitor(
    directory: &ActorRef<DirectoryMsg>,
    options: &PoolOptions,
) -> Result<ActorRef<JanitorMsg>, ActorProcessingErr> {
    let args = JanitorArgs { directory: directory.clone(), period: options.janitor_period };
    let (janitor, _) = Actor::spawn_linked(None, Janitor, args, directory.get_cell()).await?;
    Ok(janitor)
}

impl DirectoryState {
    /// A reloaded config, by message to every actor that keeps a copy of the options.
    async fn reconfigure(&mut self, myself: &ActorRef<DirectoryMsg>, options: PoolOptions) {
        let options = Arc::new(options);
        let janitor_changed = options.janitor_period != self.options.janitor_period;
        if options.cheap_dial != self.options.cheap_dial {
            // Judged against the old threshold: each is measured again on its next dial.
            for target in self.cheap.listed.keys() {
                self.routes.remove_cheap(target);
            }
            self.cheap.clear();
        }
        self.options = Arc::clone(&options);
        let _ = self.budget.cast(BudgetMsg::SetLimit { max_total_idle: options.max_total_idle });
        for entry in self.managers.values() {
            let _ = entry.manager.cast(ManagerMsg::Reconfigure { options: Arc::clone(&options) });
        }
        if let (Some(doorkeeper), Admission::SecondSighting { window }) =
            (&mut self.doorkeeper, options.admission)
        {
            doorkeeper.set_window(window);
        }
        if janitor_changed {
            // The new one is in place before the old one stops, so its end is no failure.
            match spawn_janitor(myself, &options).await {
                Ok(janitor) => {
                    let old = std::mem::replace(&mut self.janitor, janitor);
                    old.stop(Some("reconfigured".into()));
                }
                Err(error) => tracing::warn!(%error, "could not restart the janitor; keeping it"),
            }
        }
    }

    /// A handle's own dial of a destination it had no route for. Counted and judged as a
    /// checkout through here was before (when handles asked first and dialed after): a first
    /// sighting is counted as such (`passes`) and, if its dial was cheap, routed as cheap; a
    /// second gets a manager, which hears of the dial as its first miss.
    async fn dialed(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        target: TargetAddr,
        dial: OutsideDial,
    ) {
        if self.cheap.contains(&target) {
            // Dialed while its cheap route was being published.
            self.cheap_passes += 1;
            return;
        }
        if !self.managers.contains_key(&target) {
            if dial.ok && dial.took < self.options.cheap_dial {
                self.passes += 1;
                self.route_cheap(target, dial.took);
                return;
            }
            if !self.admits(&target) {
                self.passes += 1;
                return;
            }
        }
        if let Some(manager) = self.manager_for(myself, &target).await {
            // Lost only if the manager died this instant; its replacement starts from demand.
            let _ = manager.cast(ManagerMsg::DialedOutside(dial));
        }
    }

    /// A destination without a manager whose first dial took less than `cheap_dial`: from now
    /// on handles dial it without a message (see `Route::Cheap`).
    fn route_cheap(&mut self, target: TargetAddr, took: Duration) {
        if let Some(forgotten) = self.cheap.insert(target.clone(), self.options.max_destinations) {
            self.routes.remove_cheap(&forgotten);
        }
        self.routes.set_cheap(target, took);
    }

    /// Whether a destination without a manager gets one now (its second sighting).
    fn admits(&mut self, target: &TargetAddr) -> bool {
        match &mut self.doorkeeper {
            None => true,
            Some(doorkeeper) => doorkeeper.admit(target, Instant::now()),
        }
    }

    /// The destination's manager, spawned on first demand. `None` only if spawning failed.
    async fn manager_for(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        target: &TargetAddr,
    ) -> Option<ActorRef<ManagerMsg>> {
        if let Some(entry) = self.managers.get(target) {
            return Some(entry.manager.clone());
        }
        if self.managers.len() >= self.options.max_destinations {
            self.forget_one();
        }
        let stats = Arc::new(watch::Sender::new(DestStats {
            destination: target.to_string(),
            ..Default::default()
        }));
        self.spawn_manager(myself, target.clone(), stats, DestCounters::default()).await
    }

    async fn spawn_manager(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        target: TargetAddr,
        stats: Arc<watch::Sender<DestStats>>,
        counters: DestCounters,
    ) -> Option<ActorRef<ManagerMsg>> {
        let args = ManagerArgs {
            destination: target.clone(),
            options: Arc::clone(&self.options),
            dialer: Arc::clone(&self.dialer),
            budget: self.budget.clone(),
            telemetry: self.telemetry.clone(),
            stats: Arc::clone(&stats),
            counters,
        };
        match Actor::spawn_linked(None, PoolManager, args, myself.get_cell()).await {
            Ok((manager, _)) => {
                // A harness's watch may give a cheap destination a manager: it routes there now.
                self.cheap.remove(&target);
                self.by_id.insert(manager.get_id(), target.clone());
                self.routes.set(target.clone(), manager.clone(), stats.subscribe());
                self.managers.insert(target, Entry { manager: manager.clone(), stats });
                Some(manager)
            }
            Err(error) => {
                tracing::error!(%target, %error, "could not start a pool manager");
                self.telemetry.error(
                    category::POOL_SUPERVISOR,
                    format!("could not start the pool manager for {target}: {error}"),
                    vec![("destination", json!(target.to_string()))],
                );
                None
            }
        }
    }

    /// Replaces a manager that died without being asked to; its counters carry over.
    async fn replace_dead(&mut self, myself: &ActorRef<DirectoryMsg>, id: ActorId, why: &str) {
        let Some(target) = self.by_id.remove(&id) else {
            return;
        };
        let _ = self.budget.cast(BudgetMsg::ReleaseOwner(id));
        let Some(entry) = self.managers.remove(&target) else {
            return;
        };
        self.routes.remove(&target);
        self.manager_restarts += 1;
        let counters = entry.stats.borrow().counters;
        tracing::warn!(%target, why, "pool manager died; restarting it");
        self.telemetry.error(
            category::POOL_SUPERVISOR,
            format!("pool manager for {target} {why}; restarted"),
            vec![
                ("destination", json!(target.to_string())),
                ("restarts", json!(self.manager_restarts)),
            ],
        );
        // Gauges restart from zero: the dead manager's spares are gone, and sessions it leased
        // are no longer counted by anyone.
        entry.stats.send_modify(|s| {
            s.idle = 0;
            s.in_use = 0;
            s.pending_creates = 0;
            s.awaiting_slots = 0;
        });
        self.spawn_manager(myself, target, entry.stats, counters).await;
    }

    async fn restart_budget(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        self.telemetry.error(
            category::POOL_SUPERVISOR,
            format!("global budget {why}; restarting it and every pool manager"),
            vec![("destinations", json!(self.managers.len()))],
        );
        // Every spare holds a slot of the dead budget: stop all managers before a new budget
        // hands out slots, so the global limit holds throughout.
        self.routes.clear();
        self.cheap.clear();
        for (target, entry) in self.managers.drain() {
            self.by_id.remove(&entry.manager.get_id());
            self.retired.add(&entry.stats.borrow().counters);
            if let Err(error) = entry
                .manager
                .stop_and_wait(Some("budget restart".into()), Some(Duration::from_secs(5)))
                .await
            {
                tracing::warn!(%target, ?error, "pool manager did not stop in time; killing it");
                entry.manager.kill();
            }
        }
        self.budget = spawn_budget(myself, &self.options, &self.budget_stats).await?;
        Ok(())
    }

    async fn sweep(&mut self) -> SweepReport {
        if self.pruned_last_sweep == 0 && self.pruned_since_trim > 0 && self.stopping.is_empty() {
            // The tail of a burst, fewer than TRIM_AFTER_PRUNED: pruning has stopped.
            self.give_back_memory();
        }
        let now = Instant::now();
        let mut report = SweepReport::default();
        let targets: Vec<TargetAddr> = self.managers.keys().cloned().collect();
        for target in targets {
            let Some(entry) = self.managers.get(&target) else {
                continue;
            };
            let manager = entry.manager.clone();
            let answer = manager
                .call(
                    |reply| ManagerMsg::Sweep {
                        now,
                        idle_timeout: self.options.idle_timeout,
                        cold_after: self.options.cold_after,
                        reply,
                    },
                    Some(self.options.sweep_call_timeout),
                )
                .await;
            let Ok(ractor::rpc::CallResult::Success(ManagerSweep {
                expired,
                retired,
                trimmed,
                cold,
                stats,
            })) = answer
            else {
                report.unresponsive += 1;
                continue;
            };
            report.expired += expired;
            report.retired += retired;
            report.trimmed += trimmed;
            if cold {
                // Removed before it stops, so its termination is not taken for a failure, and
                // no handle routes a checkout to it any more.
                self.managers.remove(&target);
                self.routes.remove(&target);
                self.by_id.remove(&manager.get_id());
                self.retired.add(&stats.counters);
                self.pruned += 1;
                self.pruned_since_trim += 1;
                self.stopping.insert(manager.get_id());
                report.pruned += 1;
                manager.stop(Some("cold destination pruned".into()));
                tracing::debug!(%target, "pruned a cold destination");
            }
        }
        if report.pruned > 0 {
            self.shrink_tables();
        }
        if let Some(doorkeeper) = &mut self.doorkeeper {
            doorkeeper.expire(now);
        }
        self.pruned_last_sweep = report.pruned;
        report.destinations = self.managers.len();
        report
    }

    /// Asks the allocator to give free memory back, off the actor, which it would otherwise
    /// hold up for milliseconds.
    fn give_back_memory(&mut self) {
        self.pruned_since_trim = 0;
        let destinations = self.managers.len();
        tokio::task::spawn_blocking(move || {
            crate::memory::give_back_free_memory();
            // Under memory's target: watched without the per-destination lines.
            tracing::debug!(
                target: "poolsocks::memory",
                destinations,
                "gave free memory back after pruning"
            );
        });
    }

    /// The per-destination tables keep their largest capacity when entries leave: after a
    /// burst of destinations is pruned, they are shrunk to what is left (see
    /// `memory::oversized`), so the trim that follows can give their room back.
    fn shrink_tables(&mut self) {
        use crate::memory::oversized;
        if oversized(self.managers.len(), self.managers.capacity()) {
            self.managers.shrink_to_fit();
        }
        if oversized(self.by_id.len(), self.by_id.capacity()) {
            self.by_id.shrink_to_fit();
        }
        self.routes.shrink_if_oversized();
    }

    /// Makes room for a new destination: of a few destinations sampled (the map's iteration
    /// order is random per process), stops the least recently active, preferring one with
    /// nothing idle or in use. Its spares close with it before the budget frees their slots.
    fn forget_one(&mut self) {
        let victim = self
            .managers
            .iter()
            .take(EVICTION_SAMPLE)
            .min_by_key(|(_, entry)| {
                let stats = entry.stats.borrow();
                (stats.idle > 0 || stats.in_use > 0, stats.last_activity_ms)
            })
            .map(|(target, _)| target.clone());
        let Some(target) = victim else { return };
        if let Some(entry) = self.managers.remove(&target) {
            self.routes.remove(&target);
            self.by_id.remove(&entry.manager.get_id());
            self.retired.add(&entry.stats.borrow().counters);
            self.forgotten += 1;
            entry.manager.stop(Some("max_destinations reached".into()));
            tracing::debug!(%target, "forgot a destination to stay within max_destinations");
        }
    }

    fn stats(&self) -> PoolStats {
        let per_destination = self.managers.values().map(|e| e.stats.borrow().clone()).collect();
        let mut stats = PoolStats::assemble(
            per_destination,
            &self.retired,
            self.budget_stats.borrow().clone(),
            self.manager_restarts,
            self.pruned,
        );
        stats.first_sightings = self.passes;
        stats.cheap_destinations = self.cheap.len();
        stats.bypassed = self.cheap_passes;
        stats.destinations_forgotten = self.forgotten;
        stats.first_sightings_remembered = self.doorkeeper.as_ref().map_or(0, Doorkeeper::len);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: u32) -> TargetAddr {
        TargetAddr::Domain(format!("n{n}.example"), 443)
    }

    #[test]
    fn cheap_destinations_stay_within_capacity_whatever_the_names() {
        let mut cheap = CheapDestinations::default();
        for n in 0..50_000 {
            let full = cheap.len() == 1_000;
            let forgotten = cheap.insert(name(n), 1_000);
            assert_eq!(forgotten.is_some(), full, "one is forgotten only when full: {n}");
            assert!(cheap.len() <= 1_000);
            assert!(cheap.order.len() <= 2_000 + 1, "the queue is bounded too");
            // Some drop out as they turn distant, which must not unbound the queue either.
            if n % 3 == 0 {
                cheap.remove(&name(n));
            }
        }
        // The oldest goes first.
        let mut cheap = CheapDestinations::default();
        cheap.insert(name(1), 2);
        cheap.insert(name(2), 2);
        assert_eq!(cheap.insert(name(3), 2), Some(name(1)));
        assert!(cheap.contains(&name(2)) && cheap.contains(&name(3)));
    }

    #[test]
    fn a_cheap_route_turns_distant_on_its_average_not_one_slow_dial() {
        let cheap_dial = Duration::from_micros(1_000);
        let route = CheapRoute::new(Duration::from_micros(100));
        // One 3 ms hiccup (a busy CPU) moves the average to 680 us: still cheap.
        assert!(route.observe(Duration::from_micros(3_000), cheap_dial));
        // A path that really moved (20 ms dials) crosses at once.
        assert!(!route.observe(Duration::from_millis(20), cheap_dial));
    }
}
