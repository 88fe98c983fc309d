//! Counters of the pool, exact and cheap: each actor owns its own and publishes a snapshot
//! after every message it handles, so reading them never waits on a busy actor.

use serde::Serialize;

use super::checkout_wait::CheckoutWaitStats;
use super::refill::RefillStats;

/// Counters that only grow. Kept separately so a restarted PoolManager continues from its
/// predecessor's numbers and a pruned destination's history stays in the totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DestCounters {
    /// Connections opened: background spares plus dials for misses.
    pub created: u64,
    /// Spares handed out by a checkout.
    pub reused: u64,
    /// Sessions served on a spare: the client got a success reply on it.
    pub hits: u64,
    pub misses: u64,
    /// Untouched connections not pooled because a per-destination or the global cap was full.
    pub dropped_full: u64,
    /// Spares closed for being older than `idle_timeout`.
    pub expired: u64,
    /// Surplus spares closed after demand fell below what they were dialed for.
    pub trimmed: u64,
    /// Spares closed by the GlobalBudget to make room elsewhere.
    pub evicted: u64,
    /// Failed dials (background and for misses).
    pub connect_failures: u64,
    /// Spares found closed or reset by their server at checkout (greeting or not) and
    /// discarded before anyone saw them.
    pub validation_drops: u64,
    /// Spares handed out and found unusable before the client's reply (the server had just
    /// reset it, or the rules no longer allow its peer): the client got another connection.
    pub stale_checkouts: u64,
    /// Spares closed before their server's learned idle limit would have closed them.
    pub retired_early: u64,
    /// Idle spares whose peer closed them (noticed while idle).
    pub peer_closed: u64,
    /// Connections handed back without a byte moved, and pooled again.
    pub returned_untouched: u64,
    /// Background dials not started because the GlobalBudget had no room.
    pub refill_denied: u64,
    /// Checkouts whose caller had given up (timed out) before the manager got to them; they
    /// were skipped, so no spare was lost to them.
    pub abandoned: u64,
    /// Spares closed because a reloaded config no longer allows their peer (access rules,
    /// `exclude_ports`, `exclude_networks`).
    pub closed_by_rules: u64,
}

impl DestCounters {
    pub fn add(&mut self, other: &DestCounters) {
        self.created += other.created;
        self.reused += other.reused;
        self.hits += other.hits;
        self.misses += other.misses;
        self.dropped_full += other.dropped_full;
        self.expired += other.expired;
        self.trimmed += other.trimmed;
        self.evicted += other.evicted;
        self.connect_failures += other.connect_failures;
        self.validation_drops += other.validation_drops;
        self.stale_checkouts += other.stale_checkouts;
        self.retired_early += other.retired_early;
        self.peer_closed += other.peer_closed;
        self.returned_untouched += other.returned_untouched;
        self.refill_denied += other.refill_denied;
        self.abandoned += other.abandoned;
        self.closed_by_rules += other.closed_by_rules;
    }
}

/// One destination's state and history.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DestStats {
    /// The destination as clients named it.
    pub destination: String,
    /// Spares held now.
    pub idle: usize,
    /// The most spares ever held at once (never above `max_idle_per_dest`).
    pub idle_high_water: usize,
    /// Leases outstanding: sessions using a connection from this manager (hit or miss), and
    /// untouched returns waiting for a budget slot.
    pub in_use: u64,
    /// Background dials in flight.
    pub pending_creates: u64,
    /// Budget reservations asked for and not answered yet.
    pub awaiting_slots: u64,
    /// Background dials are paused after failures.
    pub backing_off: bool,
    /// Wall-clock time of the last checkout or return, milliseconds since the Unix epoch.
    pub last_activity_ms: u64,
    /// The refill target and the demand it was sized from (`refill_target`,
    /// `checkouts_per_sec`, `dial_time_ms`, `demand_spares`).
    #[serde(flatten)]
    pub refill: RefillStats,
    /// How many spares the destination gets and why (`spare_target`, `spare_target_reason`,
    /// `speaks_first`, `server_idle_limit_ms`).
    #[serde(flatten)]
    pub policy: SparePolicy,
    #[serde(flatten)]
    pub counters: DestCounters,
}

/// Why a destination has the spare target it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetReason {
    /// Sized from its demand (see `refill`).
    #[default]
    Demand,
    /// `[server.pool] exclude_ports` or `exclude_networks` cover it: no spares.
    Excluded,
    /// Its server drops idle connections sooner than a spare waits for a client there.
    ServerIdleLimit,
    /// Its dials take less than `cheap_dial_us` (same host or LAN): a spare would save less
    /// than it costs.
    CheapDial,
    /// Its clients come further apart than a spare lives (`idle_timeout`).
    RarelyUsed,
}

/// The spare policy's view of one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SparePolicy {
    /// Spares (idle plus dialing) wanted now, after every rule below.
    #[serde(rename = "spare_target")]
    pub target: usize,
    #[serde(rename = "spare_target_reason")]
    pub reason: TargetReason,
    /// A spare received bytes before any client: the server sends a greeting first.
    pub speaks_first: bool,
    /// The idle time after which its server was seen to drop spares, if it does.
    pub server_idle_limit_ms: Option<u64>,
}

impl DestStats {
    /// Nothing held, used or in flight.
    pub fn is_quiet(&self) -> bool {
        self.in_use == 0 && self.pending_creates == 0 && self.awaiting_slots == 0
    }
}

/// The GlobalBudget's slots. `reserved + lent + pooled + evicting` never exceeds
/// `max_total_idle`, except just after a reload lowered it: then the slots over the new limit
/// are all `evicting` at once (`reserved + lent + pooled` is within it) and no slot is granted
/// until the evictions have brought the total under the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BudgetStats {
    pub max_total_idle: usize,
    /// Slots granted for a connection on its way into a pool (dialing or being returned).
    pub reserved: usize,
    /// Slots kept by a manager for sessions out, so an untouched return is pooled again at
    /// once (never more than that manager's sessions; taken back first when room is needed).
    pub lent: usize,
    /// Slots whose connection sits idle in a pool.
    pub pooled: usize,
    /// Pooled or lent slots asked back and not released yet.
    pub evicting: usize,
    /// Reservations queued behind an eviction.
    pub waiting: usize,
    /// The most slots ever in use at once (never above `max_total_idle`).
    pub high_water: usize,
    pub granted: u64,
    /// Reservations refused: nothing could be taken back or evicted.
    pub denied: u64,
    /// Reservations refused because the requester was not clearly hotter than the spare that
    /// would have been evicted (see `budget`, admission when full).
    pub denied_colder: u64,
    pub evictions: u64,
    /// Lent slots taken back to make room elsewhere (no connection closed).
    pub lent_reclaimed: u64,
}

impl BudgetStats {
    pub fn in_use(&self) -> usize {
        self.reserved + self.lent + self.pooled + self.evicting
    }
}

/// The whole pool. The first eleven fields are the seed's; the rest explain them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolStats {
    pub total_idle: usize,
    pub destinations: usize,
    pub total_created: u64,
    pub total_reused: u64,
    pub pool_hits: u64,
    pub pool_misses: u64,
    pub dropped_full: u64,
    pub expired: u64,
    pub evicted: u64,
    pub connections_in_use: u64,
    pub pending_creates: u64,
    pub connect_failures: u64,
    pub validation_drops: u64,
    pub stale_checkouts: u64,
    pub retired_early: u64,
    pub peer_closed: u64,
    pub returned_untouched: u64,
    pub refill_denied: u64,
    /// Surplus spares closed after demand fell.
    pub trimmed: u64,
    /// Checkouts whose caller had given up (timed out and dialed directly) before the manager
    /// got to them: a sign of an overloaded or stalled PoolManager.
    pub abandoned: u64,
    /// Spares closed because a reloaded config no longer allows their peer.
    pub closed_by_rules: u64,
    /// PoolManagers restarted after a failure.
    pub manager_restarts: u64,
    /// Cold destinations whose PoolManager was stopped.
    pub destinations_pruned: u64,
    /// Checkouts the pool did not answer in time (or at all): the handler dialed directly.
    pub fallback_dials: u64,
    /// Checkouts of destinations that get no spares for a lasting reason, dialed by the handle
    /// without a message: cheap destinations (no manager at all), and those whose manager
    /// keeps none (cheap dials, excluded; all but one checkout in 16).
    pub bypassed: u64,
    /// Checkouts of a destination seen for the first time (within the admission window):
    /// dialed directly, no manager, no spare.
    pub first_sightings: u64,
    /// First sightings remembered now, waiting for a second.
    pub first_sightings_remembered: usize,
    /// Destinations routed as cheap to dial (under `cheap_dial_us`): no manager, no spare,
    /// dialed by the handles without a message.
    pub cheap_destinations: usize,
    /// Destinations forgotten to stay within `max_destinations`.
    pub destinations_forgotten: u64,
    /// How long checkouts waited for their manager's answer (see `checkout_wait`).
    pub checkout_wait: CheckoutWaitStats,
    pub budget: BudgetStats,
    /// Sorted by destination.
    pub per_destination: Vec<DestStats>,
}

impl PoolStats {
    /// Totals from live destinations plus the history of pruned ones.
    pub fn assemble(
        mut per_destination: Vec<DestStats>,
        retired: &DestCounters,
        budget: BudgetStats,
        manager_restarts: u64,
        destinations_pruned: u64,
    ) -> Self {
        per_destination.sort_by(|a, b| a.destination.cmp(&b.destination));
        let mut counters = *retired;
        let mut stats = PoolStats {
            destinations: per_destination.len(),
            manager_restarts,
            destinations_pruned,
            budget,
            ..Default::default()
        };
        for dest in &per_destination {
            counters.add(&dest.counters);
            stats.total_idle += dest.idle;
            stats.connections_in_use += dest.in_use;
            stats.pending_creates += dest.pending_creates;
        }
        stats.total_created = counters.created;
        stats.total_reused = counters.reused;
        stats.pool_hits = counters.hits;
        stats.pool_misses = counters.misses;
        stats.dropped_full = counters.dropped_full;
        stats.expired = counters.expired;
        stats.evicted = counters.evicted;
        stats.connect_failures = counters.connect_failures;
        stats.validation_drops = counters.validation_drops;
        stats.stale_checkouts = counters.stale_checkouts;
        stats.retired_early = counters.retired_early;
        stats.peer_closed = counters.peer_closed;
        stats.returned_untouched = counters.returned_untouched;
        stats.refill_denied = counters.refill_denied;
        stats.trimmed = counters.trimmed;
        stats.abandoned = counters.abandoned;
        stats.closed_by_rules = counters.closed_by_rules;
        stats.per_destination = per_destination;
        stats
    }
}
