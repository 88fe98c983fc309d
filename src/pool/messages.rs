//! The messages the pool's actors understand. Request variants end in an `RpcReplyPort`.

use std::time::Duration;

use ractor::{ActorId, ActorRef, RpcReplyPort};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::lease::PoolLease;
use super::stats::{DestStats, PoolStats};
use crate::socks::TargetAddr;
use crate::upstream::ConnectError;

/// Identifies one budget slot: the right for one connection to sit idle in the pool.
pub type SlotId = u64;
/// Identifies one idle spare inside its PoolManager.
pub type SpareId = u64;

/// The answer to a checkout.
pub enum Checkout {
    /// A spare: open, validated, never used. Any greeting the server sent is still unread in it.
    Hit { stream: TcpStream, lease: PoolLease },
    /// Nothing usable is pooled: the caller dials itself (outside the actor) and keeps the lease.
    Miss { lease: PoolLease },
    /// The destination is not (yet) one the pool keeps spares for: the caller dials itself, and
    /// nothing is tracked (see `admission`).
    Pass,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checkout::Hit { .. } => f.write_str("Checkout::Hit"),
            Checkout::Miss { .. } => f.write_str("Checkout::Miss"),
            Checkout::Pass => f.write_str("Checkout::Pass"),
        }
    }
}

/// A never-used connection coming back from a session, with the time it was dialed (its age
/// counts from there, not from its return).
pub struct Returned {
    pub stream: TcpStream,
    pub born: Instant,
}

/// A client's own dial, made outside the pool's actors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideDial {
    pub ok: bool,
    pub took: Duration,
    /// It landed on an `exclude_networks` address (a name's address is known only now).
    pub excluded: bool,
}

/// How a lease's session went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The client got a success reply on the connection.
    Served,
    /// It did not (the dial failed, the client left first).
    NotServed,
    /// The spare handed out was found unusable before the reply (its server had closed it, or
    /// the rules no longer allow its peer); the client was given another connection.
    Stale,
}

/// Faults a harness can inject into a PoolManager.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The handler returns an error, as a bug would: the actor fails and is restarted.
    Fail(String),
    /// The handler panics: the actor fails and is restarted.
    Panic(String),
    /// The handler blocks its mailbox for this long, as a wedged actor would.
    Stall(Duration),
}

/// What a PoolManager reports to a sweep.
#[derive(Debug, Clone)]
pub struct ManagerSweep {
    pub expired: u64,
    /// Spares closed before their server's learned idle limit (see `server_limit`).
    pub retired: u64,
    /// Surplus spares closed because demand fell (see `refill`).
    pub trimmed: u64,
    /// Nothing idle, in use or pending, and no traffic for `cold_after`.
    pub cold: bool,
    pub stats: DestStats,
}

/// What one Janitor pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// Spares closed because they were older than `idle_timeout`.
    pub expired: u64,
    /// Spares closed before their server's learned idle limit.
    pub retired: u64,
    /// Surplus spares closed because demand fell below what they were dialed for.
    pub trimmed: u64,
    /// Cold destinations whose PoolManager was stopped.
    pub pruned: u64,
    /// Destinations with a PoolManager after the pass.
    pub destinations: usize,
    /// PoolManagers that did not answer in time (left alone until the next pass).
    pub unresponsive: u64,
}

/// Messages to one destination's PoolManager.
pub enum ManagerMsg {
    /// A client session wants a stream (routed by the Directory).
    Acquire(RpcReplyPort<Checkout>),
    /// A client session wants a stream, sent straight from a [`Pool`](super::Pool) handle's
    /// copy of the route. Refused (the reply port is dropped, so the caller asks the Directory
    /// instead) once this manager has reported itself cold to a sweep: it may be stopping.
    AcquireDirect(RpcReplyPort<Checkout>),
    /// A lease ended: how, whether it was a hit, the stream back if it is still a spare, and
    /// how long the session held it.
    Release { returned: Option<Returned>, hit: bool, outcome: LeaseOutcome, held: Duration },
    /// The caller of a `Miss` finished its own dial (its time is a measure of the path for the
    /// refill target; one on an excluded network means this destination gets no spares).
    MissDialed(OutsideDial),
    /// A checkout the Directory admitted after its handle had already dialed (the
    /// destination's second sighting, see `DirectoryMsg::Dialed`): a miss, with its dial.
    DialedOutside(OutsideDial),
    /// A background dial finished.
    DialDone { slot: SlotId, result: Result<TcpStream, ConnectError>, took: Duration },
    /// The GlobalBudget granted a reservation requested with `tag`.
    SlotGranted { tag: u64, slot: SlotId },
    /// The GlobalBudget refused the reservation requested with `tag`.
    SlotDenied { tag: u64 },
    /// The GlobalBudget wants this slot back to make room elsewhere: the lent slot given back,
    /// or its idle spare closed.
    Evict { slot: SlotId },
    /// An idle spare's socket became readable: its peer closed it, or sent a greeting.
    SpareReadable { spare: SpareId },
    /// Expire spares older than `idle_timeout`, close surplus spares, and report whether the
    /// destination is cold.
    Sweep {
        now: Instant,
        idle_timeout: Duration,
        cold_after: Duration,
        reply: RpcReplyPort<ManagerSweep>,
    },
    /// A snapshot of this destination's counters.
    Stats(RpcReplyPort<DestStats>),
    /// A reloaded config: new limits and timeouts from now on. Idle spares over the new
    /// per-destination limit are closed (oldest first), and so are those whose peer the access
    /// rules (asked through the dialer's `still_allowed`) or the exclusions no longer allow.
    Reconfigure { options: std::sync::Arc<super::options::PoolOptions> },
    /// Fault injection for harnesses.
    InjectFault(Fault),
}

/// Messages to the GlobalBudget.
pub enum BudgetMsg {
    /// Asks for a slot; answered later by `ManagerMsg::SlotGranted`/`SlotDenied` with `tag`.
    /// Asynchronous on purpose: the budget may first have to evict a spare from another
    /// manager, and a manager must never block waiting on the budget. `rate` is the owner's
    /// checkouts per second: when full, the budget evicts only for a hotter destination.
    Reserve { owner: ActorRef<ManagerMsg>, tag: u64, rate: f64 },
    /// The slot's connection now sits idle in its pool (so it may be evicted). `rate`: the
    /// owner's checkouts per second now (what admission compares).
    Pooled { slot: SlotId, rate: f64 },
    /// The slot's spare was handed out; its manager keeps the slot for that session, in case
    /// the connection comes back untouched.
    Lent { slot: SlotId, rate: f64 },
    /// A lent slot now carries a background dial (the replacement of the spare handed out).
    Claimed { slot: SlotId },
    /// The slot is free again (its spare was handed out, closed, or its dial failed).
    Release { slot: SlotId },
    /// An owner died: free everything it held or waited for.
    ReleaseOwner(ActorId),
    /// A snapshot of the budget.
    Stats(RpcReplyPort<super::stats::BudgetStats>),
    /// A reloaded `max_total_idle`. Lowered: the slots over it are asked back at once (lent
    /// first, then the least recently pooled, then dials in flight), and nothing is granted
    /// until the total is under the new limit. Raised: waiting requests are granted.
    SetLimit { max_total_idle: usize },
}

/// Messages to the Directory (the supervisor and router).
pub enum DirectoryMsg {
    /// Forwarded to the destination's PoolManager, created on first demand.
    Acquire(TargetAddr, RpcReplyPort<Checkout>),
    /// A handle dialed a destination it had no route for, without asking first (see
    /// `Pool::dial_unrouted`), and tells how it went: a dial under `cheap_dial` routes it as
    /// cheap (no manager, no message on its checkouts); otherwise a first sighting is only
    /// remembered, and a second one gets a manager, which counts this dial as its first miss.
    Dialed { target: TargetAddr, dial: OutsideDial },
    /// A cheap destination's dials became slower than `cheap_dial` on average: its route is
    /// dropped, and its next checkouts go through admission again.
    NoLongerCheap(TargetAddr),
    /// The whole pool's counters.
    Stats(RpcReplyPort<PoolStats>),
    /// One Janitor pass: expire old spares, prune cold destinations.
    Sweep(RpcReplyPort<SweepReport>),
    /// Asks the Janitor to run a pass now and reply with what it did.
    RunJanitor(RpcReplyPort<SweepReport>),
    /// The PoolManager of a destination, if there is one.
    ManagerOf(TargetAddr, RpcReplyPort<Option<ActorRef<ManagerMsg>>>),
    /// A live view of one destination's counters (creates its PoolManager if needed).
    WatchDestination(TargetAddr, RpcReplyPort<tokio::sync::watch::Receiver<DestStats>>),
    /// A live view of the GlobalBudget.
    WatchBudget(RpcReplyPort<tokio::sync::watch::Receiver<super::stats::BudgetStats>>),
    /// A reloaded config: the Directory keeps the new options, sends the budget its new limit
    /// and every PoolManager the new options, then replies (the managers apply them in their
    /// own time; await their published views to see it done).
    Reconfigure(Box<super::options::PoolOptions>, RpcReplyPort<()>),
}

/// Messages to the Janitor.
pub enum JanitorMsg {
    /// Run one pass; the reply (if any) gets the report.
    Tick(Option<RpcReplyPort<SweepReport>>),
}
