//! The Directory: maps each destination to its PoolManager and supervises the pool's actors.
//!
//! It spawns the GlobalBudget and the Janitor linked in `pre_start`, and PoolManagers linked on
//! first demand. It publishes its map as [`Routes`], so `Pool` handles send checkouts straight
//! to a known manager (one hop instead of two); only the first checkout to a destination, and
//! any checkout whose direct send failed, goes through the Directory. The Directory is the only
//! writer of the routes, so they never list a manager it dropped. Pruning stays race-free: a
//! manager that reported itself cold refuses direct checkouts (the caller then comes through
//! the Directory), and the Directory removes its route before stopping it. Restarts are
//! decided in `handle_supervisor_evt`:
//! - a PoolManager that fails, is killed or stops unasked is replaced at once (its spares die
//!   with it; the budget frees its slots; its counters carry over);
//! - a failed GlobalBudget takes all PoolManagers with it (their spares hold its slots), then
//!   everything starts afresh; a failed Janitor is simply restarted.

use std::collections::HashMap;
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
    BudgetMsg, Checkout, DirectoryMsg, JanitorMsg, ManagerMsg, ManagerSweep, SweepReport,
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

pub struct DirectoryArgs {
    pub options: Arc<PoolOptions>,
    pub dialer: Arc<dyn Dialer>,
    pub telemetry: Telemetry,
    pub routes: Routes,
}

/// Each destination's live PoolManager, written only by the Directory, read by `Pool` handles
/// so that a checkout needs no Directory hop. A read lock is held only for a map lookup.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<HashMap<TargetAddr, ActorRef<ManagerMsg>>>>);

impl Routes {
    pub fn get(&self, target: &TargetAddr) -> Option<ActorRef<ManagerMsg>> {
        // A poisoned lock (a panic mid-update, which these short sections cannot do) only
        // costs the shortcut: callers then go through the Directory.
        self.0.read().ok().and_then(|map| map.get(target).cloned())
    }

    fn set(&self, target: TargetAddr, manager: ActorRef<ManagerMsg>) {
        if let Ok(mut map) = self.0.write() {
            map.insert(target, manager);
        }
    }

    fn remove(&self, target: &TargetAddr) {
        if let Ok(mut map) = self.0.write() {
            map.remove(target);
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.0.write() {
            map.clear();
        }
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
        }
        Ok(())
    }
}

async fn spawn_budget(
    directory: &ActorRef<DirectoryMsg>,
    options: &PoolOptions,
    stats: &Arc<watch::Sender<BudgetStats>>,
) -> Result<ActorRef<BudgetMsg>, ActorProcessingErr> {
    let args = BudgetArgs { max_total_idle: options.max_total_idle, stats: Arc::clone(stats) };
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
                self.by_id.insert(manager.get_id(), target.clone());
                self.routes.set(target.clone(), manager.clone());
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
                report.pruned += 1;
                manager.stop(Some("cold destination pruned".into()));
                tracing::debug!(%target, "pruned a cold destination");
            }
        }
        report.destinations = self.managers.len();
        report
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
        stats.destinations_forgotten = self.forgotten;
        stats.first_sightings_remembered = self.doorkeeper.as_ref().map_or(0, Doorkeeper::len);
        stats
    }
}
