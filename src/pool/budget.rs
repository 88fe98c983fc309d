//! The GlobalBudget: `max_total_idle` enforced exactly across all destinations.
//!
//! A connection may enter any pool only with a slot reserved here first (before the background
//! dial starts, or before an untouched connection is taken back), so idle connections can never
//! outnumber slots, even for an instant. When no slot is free, the least recently pooled spare of
//! another destination is evicted by message to its PoolManager, and the request waits until that
//! slot is released. Replies go back by message too: a manager never blocks on the budget.
//!
//! A spare handed out keeps its slot, lent to the session (`Lent`): if the connection comes
//! back untouched, its manager pools it again at once with that slot instead of asking for a
//! new one (two messages per checkout and return, instead of a reservation round trip). A
//! manager keeps no more lent slots than sessions out, and gives a lent slot to the background
//! dial that replaces the spare (`Claimed`). When room is needed, a lent slot of another
//! destination is taken back first (it holds no connection), before any spare is evicted.
//!
//! # Admission when full (in the spirit of TinyLFU)
//! Evicting a spare to make room is only worth it for a destination asked for more often than
//! the victim's: otherwise the newcomer's spare is just as likely to be evicted unused in turn,
//! and every miss would cost a second connection (1,000 destinations under the default limits
//! saw 1.9 upstream connections per session). So a reservation carries its destination's
//! checkout rate over 30 s (`refill::ADMISSION_WINDOW`), the budget remembers each
//! destination's latest (decayed with the same time constant), and when full it evicts the
//! least recently pooled spare only if the requester is at least [`ADMISSION_MARGIN`] times
//! hotter and has had at least [`MIN_CHECKOUTS_TO_EVICT`] checkouts in the window; else it
//! refuses. The long window, the margin and the minimum absorb the noise of two estimates:
//! with similar destinations nothing is evicted and the spares stay where they are, hit by
//! their own destinations; a destination much busier than the victim's wins at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use tokio::sync::watch;
use tokio::time::Instant;

use super::messages::{BudgetMsg, ManagerMsg, SlotId};
use super::refill::ADMISSION_WINDOW;
use super::stats::BudgetStats;

/// How much hotter a destination must be than a spare's to have that spare evicted for it
/// (the default of `PoolOptions::eviction_margin`).
pub const ADMISSION_MARGIN: f64 = 2.0;
/// Checkouts within `ADMISSION_WINDOW` a destination must have had before it may evict
/// another's spare: a handful of checkouts ranks nothing (their rate estimate is all noise).
pub const MIN_CHECKOUTS_TO_EVICT: f64 = 8.0;

pub struct GlobalBudget;

pub struct BudgetArgs {
    pub max_total_idle: usize,
    /// See [`ADMISSION_MARGIN`]; 0 evicts for anyone (harnesses of the eviction mechanics).
    pub eviction_margin: f64,
    pub stats: Arc<watch::Sender<BudgetStats>>,
}

#[derive(Clone, Copy)]
enum SlotState {
    Reserved,
    /// Kept by its manager for a session that took its spare (see the module docs).
    Lent,
    /// Idle in a pool since the given sequence number (lower = pooled earlier).
    Pooled(u64),
    Evicting,
}

struct Slot {
    owner: ActorRef<ManagerMsg>,
    state: SlotState,
}

pub struct BudgetState {
    max: usize,
    eviction_margin: f64,
    slots: HashMap<SlotId, Slot>,
    /// Pooled slots by the order they were pooled: the first entry is the eviction victim.
    pooled_order: BTreeMap<u64, SlotId>,
    /// Lent slots: taken back first when room is needed.
    lent: BTreeSet<SlotId>,
    waiters: VecDeque<(ActorRef<ManagerMsg>, u64)>,
    /// Each owner's checkout rate as of its latest reservation.
    rates: HashMap<ActorId, (f64, Instant)>,
    next_slot: SlotId,
    next_seq: u64,
    /// Kept up to date on every transition (not recounted), so publishing is O(1) however many
    /// slots are out.
    stats: BudgetStats,
    publish: Arc<watch::Sender<BudgetStats>>,
}

impl Actor for GlobalBudget {
    type Msg = BudgetMsg;
    type State = BudgetState;
    type Arguments = BudgetArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BudgetArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = BudgetState {
            max: args.max_total_idle,
            eviction_margin: args.eviction_margin,
            slots: HashMap::new(),
            pooled_order: BTreeMap::new(),
            lent: BTreeSet::new(),
            waiters: VecDeque::new(),
            rates: HashMap::new(),
            next_slot: 1,
            next_seq: 1,
            stats: BudgetStats { max_total_idle: args.max_total_idle, ..Default::default() },
            publish: args.stats,
        };
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: BudgetMsg,
        state: &mut BudgetState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BudgetMsg::Reserve { owner, tag, rate } => state.reserve(owner, tag, rate),
            BudgetMsg::Pooled { slot, rate } => {
                state.note_rate(slot, rate);
                state.pooled(slot)
            }
            BudgetMsg::Lent { slot, rate } => {
                state.note_rate(slot, rate);
                state.lent(slot)
            }
            BudgetMsg::Claimed { slot } => state.claimed(slot),
            BudgetMsg::Release { slot } => state.release(slot),
            BudgetMsg::ReleaseOwner(owner) => state.release_owner(owner),
            BudgetMsg::SetLimit { max_total_idle } => state.set_limit(max_total_idle),
            BudgetMsg::Stats(reply) => {
                let _ = reply.send(state.snapshot());
            }
        }
        state.publish();
        Ok(())
    }
}

impl BudgetState {
    /// Records the rate of the owner of `slot`, as its manager just reported it.
    fn note_rate(&mut self, slot: SlotId, rate: f64) {
        if let Some(owner) = self.slots.get(&slot).map(|s| s.owner.get_id()) {
            self.rates.insert(owner, (rate, Instant::now()));
        }
    }

    /// `owner`'s rate decayed to `now` (0 if it never said).
    fn rate_of(&self, owner: &ActorId, now: Instant) -> f64 {
        self.rates.get(owner).map_or(0.0, |&(rate, at)| {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            rate * (-elapsed / ADMISSION_WINDOW.as_secs_f64()).exp()
        })
    }

    fn reserve(&mut self, owner: ActorRef<ManagerMsg>, tag: u64, rate: f64) {
        let now = Instant::now();
        self.rates.insert(owner.get_id(), (rate, now));
        if self.slots.len() < self.max {
            self.grant(owner, tag);
            return;
        }
        // Full: take back a lent slot of another destination (no connection is lost), else
        // evict the least recently pooled spare of another destination (evicting the
        // requester's own spare to make room for the requester would only churn).
        let requester = owner.get_id();
        let other =
            |slot: &SlotId| self.slots.get(slot).is_some_and(|s| s.owner.get_id() != requester);
        let lent = self.lent.iter().copied().find(|slot| other(slot));
        let victim = match lent {
            Some(slot) => Some(slot),
            None => {
                let oldest = self.pooled_order.values().copied().find(|slot| other(slot));
                let victim_rate = oldest
                    .and_then(|slot| self.slots.get(&slot))
                    .map(|slot| self.rate_of(&slot.owner.get_id(), now));
                let proven = self.eviction_margin == 0.0
                    || rate * ADMISSION_WINDOW.as_secs_f64() >= MIN_CHECKOUTS_TO_EVICT;
                match victim_rate {
                    // A spare is evicted only for a destination clearly and steadily hotter
                    // than its own.
                    Some(victim_rate) if !proven || rate < victim_rate * self.eviction_margin => {
                        self.stats.denied_colder += 1;
                        let _ = owner.cast(ManagerMsg::SlotDenied { tag });
                        return;
                    }
                    _ => oldest,
                }
            }
        };
        match victim {
            Some(slot_id) => {
                match self.set_state(slot_id, SlotState::Evicting) {
                    Some(SlotState::Lent) => self.stats.lent_reclaimed += 1,
                    Some(SlotState::Pooled(_)) => self.stats.evictions += 1,
                    _ => {}
                }
                // The manager closes the spare (or gives the lent slot back) and releases.
                let evict = ManagerMsg::Evict { slot: slot_id };
                if self.slots.get(&slot_id).is_some_and(|slot| slot.owner.cast(evict).is_err()) {
                    // Its manager is gone; the slot is free right away.
                    self.release(slot_id);
                }
                self.waiters.push_back((owner, tag));
                self.grant_waiters();
            }
            None => {
                self.stats.denied += 1;
                let _ = owner.cast(ManagerMsg::SlotDenied { tag });
            }
        }
    }

    /// A new `max_total_idle`. Every slot over a lowered limit is asked back in this one
    /// message, so no published view shows more than the limit outside `evicting`, and since
    /// grants wait for `slots < max`, no reservation in flight can push the total back up.
    fn set_limit(&mut self, max_total_idle: usize) {
        self.max = max_total_idle;
        self.stats.max_total_idle = max_total_idle;
        let mut excess = (self.slots.len() - self.stats.evicting).saturating_sub(self.max);
        while excess > 0 {
            let victim = self
                .lent
                .iter()
                .next()
                .copied()
                .or_else(|| self.pooled_order.values().next().copied())
                .or_else(|| {
                    self.slots
                        .iter()
                        .find(|(_, slot)| matches!(slot.state, SlotState::Reserved))
                        .map(|(&id, _)| id)
                });
            let Some(slot_id) = victim else { break };
            match self.set_state(slot_id, SlotState::Evicting) {
                Some(SlotState::Lent) => self.stats.lent_reclaimed += 1,
                Some(SlotState::Pooled(_) | SlotState::Reserved) => self.stats.evictions += 1,
                _ => {}
            }
            let evict = ManagerMsg::Evict { slot: slot_id };
            if self.slots.get(&slot_id).is_some_and(|slot| slot.owner.cast(evict).is_err()) {
                self.release(slot_id);
            }
            excess -= 1;
        }
        self.grant_waiters();
    }

    fn grant(&mut self, owner: ActorRef<ManagerMsg>, tag: u64) {
        let slot = self.next_slot;
        self.next_slot += 1;
        if owner.cast(ManagerMsg::SlotGranted { tag, slot }).is_ok() {
            self.slots.insert(slot, Slot { owner, state: SlotState::Reserved });
            self.count(slot, SlotState::Reserved);
            self.stats.granted += 1;
            self.stats.high_water = self.stats.high_water.max(self.slots.len());
        }
    }

    /// Hands freed slots to queued requests, oldest first.
    fn grant_waiters(&mut self) {
        while self.slots.len() < self.max {
            let Some((owner, tag)) = self.waiters.pop_front() else {
                break;
            };
            self.grant(owner, tag);
        }
    }

    fn pooled(&mut self, slot_id: SlotId) {
        // Anything else stays as it is: being taken back (its manager will find the spare and
        // evict it), or pooled twice (a bug elsewhere, but never count it twice here).
        let state = self.slots.get(&slot_id).map(|slot| slot.state);
        if let Some(SlotState::Reserved | SlotState::Lent) = state {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.set_state(slot_id, SlotState::Pooled(seq));
        }
    }

    /// A lent slot now carries a background dial.
    fn claimed(&mut self, slot_id: SlotId) {
        // Anything but lent (being taken back: its manager closes the dial's connection when
        // it arrives) stays as it is.
        if matches!(self.slots.get(&slot_id).map(|slot| slot.state), Some(SlotState::Lent)) {
            self.set_state(slot_id, SlotState::Reserved);
        }
    }

    /// A pooled slot's spare was handed out; its manager keeps the slot for the session.
    fn lent(&mut self, slot_id: SlotId) {
        // Anything but pooled (being evicted, most likely) stays as it is.
        if matches!(self.slots.get(&slot_id).map(|slot| slot.state), Some(SlotState::Pooled(_))) {
            self.set_state(slot_id, SlotState::Lent);
        }
    }

    fn release(&mut self, slot_id: SlotId) {
        if let Some(slot) = self.slots.remove(&slot_id) {
            self.uncount(slot_id, slot.state);
        }
        self.grant_waiters();
    }

    /// Moves a slot to `to`, keeping the indexes and running counts in step; returns the state
    /// it left (`None`: no such slot).
    fn set_state(&mut self, slot_id: SlotId, to: SlotState) -> Option<SlotState> {
        let slot = self.slots.get_mut(&slot_id)?;
        let from = std::mem::replace(&mut slot.state, to);
        self.uncount(slot_id, from);
        self.count(slot_id, to);
        Some(from)
    }

    /// Index and count a slot entering `state`.
    fn count(&mut self, slot_id: SlotId, state: SlotState) {
        match state {
            SlotState::Reserved => self.stats.reserved += 1,
            SlotState::Lent => {
                self.lent.insert(slot_id);
                self.stats.lent += 1;
            }
            SlotState::Pooled(seq) => {
                self.pooled_order.insert(seq, slot_id);
                self.stats.pooled += 1;
            }
            SlotState::Evicting => self.stats.evicting += 1,
        }
    }

    /// Undo [`BudgetState::count`] for a slot leaving `state`.
    fn uncount(&mut self, slot_id: SlotId, state: SlotState) {
        match state {
            SlotState::Reserved => self.stats.reserved -= 1,
            SlotState::Lent => {
                self.lent.remove(&slot_id);
                self.stats.lent -= 1;
            }
            SlotState::Pooled(seq) => {
                self.pooled_order.remove(&seq);
                self.stats.pooled -= 1;
            }
            SlotState::Evicting => self.stats.evicting -= 1,
        }
    }

    fn release_owner(&mut self, owner: ActorId) {
        let gone: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.owner.get_id() == owner)
            .map(|(&id, _)| id)
            .collect();
        for slot in gone {
            self.release(slot);
        }
        self.waiters.retain(|(o, _)| o.get_id() != owner);
        self.rates.remove(&owner);
        // One entry per destination that ever reserved: shrunk once many were pruned.
        if crate::memory::oversized(self.rates.len(), self.rates.capacity()) {
            self.rates.shrink_to_fit();
        }
        self.grant_waiters();
    }

    fn snapshot(&self) -> BudgetStats {
        // Debug builds (every test) recount the slots to prove the running counts exact.
        #[cfg(debug_assertions)]
        {
            let mut counted = (0, 0, 0, 0);
            for slot in self.slots.values() {
                match slot.state {
                    SlotState::Reserved => counted.0 += 1,
                    SlotState::Lent => counted.1 += 1,
                    SlotState::Pooled(_) => counted.2 += 1,
                    SlotState::Evicting => counted.3 += 1,
                }
            }
            let kept =
                (self.stats.reserved, self.stats.lent, self.stats.pooled, self.stats.evicting);
            assert_eq!(counted.1, self.lent.len(), "lent slots drifted from their index");
            assert_eq!(counted, kept, "budget counts drifted from its slots");
            // The limit holds at every step: whatever is over it (after a lowered limit) is
            // already being evicted.
            assert!(
                counted.0 + counted.1 + counted.2 <= self.max,
                "slots not being evicted ({}) over max_total_idle ({})",
                counted.0 + counted.1 + counted.2,
                self.max
            );
        }
        BudgetStats { waiting: self.waiters.len(), ..self.stats.clone() }
    }

    fn publish(&self) {
        self.publish.send_replace(self.snapshot());
    }
}
