//! The upstream connection pool, as ractor actors.
//!
//! A SOCKS proxy cannot see message boundaries, so a connection that carried any byte of one
//! client's session is never given to another. The pool holds **spares**: open upstream
//! connections no client has used yet.
//! - A spare is handed out LIFO, after a non-blocking check (`poll(2)` with `POLLRDHUP`: a
//!   spare its server closed or reset is discarded even behind a greeting; unread bytes on a
//!   live one are a server greeting and stay there for the client). Its age counts from its
//!   dial.
//! - A spare pays only where it saves a round trip a client would wait for, and is used before
//!   it dies; everywhere else the pool keeps none (see README, "When a spare pays"):
//!   - a destination gets a manager on its second checkout within `idle_timeout`
//!     ([`admission`]); the first is dialed directly and only remembered;
//!   - a destination whose dial is cheaper than `cheap_dial` (same host, LAN) gets no spares:
//!     measured cheap on its first dial, it gets no manager at all and handles dial it without
//!     a message ([`Route::Cheap`](directory::Route), dropped once its average dial is no
//!     longer cheap); measured cheap by its manager, its checkouts skip that manager (but one
//!     in 16, which keeps it measured);
//!   - a destination whose server drops idle connections sooner than a spare would wait there
//!     ([`server_limit`]), or whose clients come further apart than a spare lives, gets none;
//!   - when the budget is full, a spare is evicted only for a destination clearly and steadily
//!     busier than its own ([`budget`]: TinyLFU-style admission), else the request is refused.
//! - Where spares pay, a hit and a successful miss start background dials up to a target sized
//!   from the demand (Little's law on the checkout rate, or on the sessions in use for a fast
//!   response to a step; see [`refill`]), within the per-destination limit, the global budget
//!   and the failure backoff; a failed CONNECT starts none. When demand falls, surplus spares
//!   are not replaced and the Janitor closes them.
//! - A connection goes back only if not a byte moved either way and its client is really gone
//!   (reset, not a half-close); it is pooled as a spare again. A used connection is closed.
//!
//! The actors:
//! - [`Directory`](directory::Directory): routes checkouts to the destination's PoolManager
//!   (spawned linked on first demand), supervises and restarts, and prunes cold destinations;
//! - [`PoolManager`](manager::PoolManager): one per destination, owner of its spares;
//! - [`GlobalBudget`](budget::GlobalBudget): `max_total_idle`, by reservation before a
//!   connection may enter a pool (a spare handed out lends its slot to the session, for an
//!   untouched return or the replacement dial), taking lent slots back first and then evicting
//!   the least recently pooled spare when full;
//! - [`Janitor`](janitor::Janitor): a timer that expires old spares and prunes cold
//!   destinations.
//!
//! Client handlers use [`Pool`] through [`Connector`](crate::upstream::Connector): one call
//! with a timeout per checkout of a managed destination, and on any failure of the pool a
//! direct dial. A destination without a manager costs no wait at all: it is dialed at once and
//! the Directory hears of it afterwards by a message that needs no answer; a cheap one not
//! even that. Bytes never pass through an actor.
//!
//! # Harnesses
//! Everything is public so a test can script the pool without the SOCKS server: inject a
//! [`Dialer`](crate::upstream::Dialer) that fails, hangs or counts; watch counters change;
//! run the Janitor by hand (with `tokio::time::pause()` and `advance()` for time); inject faults
//! with [`ManagerMsg::InjectFault`].
//!
//! ```
//! use std::sync::Arc;
//! use poolsocks::config::PoolConfig;
//! use poolsocks::pool::{Pool, PoolOptions};
//! use poolsocks::socks::TargetAddr;
//! use poolsocks::telemetry::Telemetry;
//! use poolsocks::upstream::{Connector, Origin, TcpDialer};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let target = TargetAddr::Ip(upstream.local_addr()?);
//! tokio::spawn(async move {
//!     let mut held = Vec::new();
//!     while let Ok((socket, _)) = upstream.accept().await {
//!         held.push(socket);
//!     }
//! });
//!
//! let config = PoolConfig { enabled: true, ..PoolConfig::default() };
//! let mut options = PoolOptions::from_config(&config);
//! options.janitor_period = None; // the harness runs the Janitor itself
//! options.cheap_dial = std::time::Duration::ZERO; // spares even for this loopback upstream
//! let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled()).await?;
//!
//! // First sighting of a destination: dialed for us, only remembered (no manager, no spare).
//! let first = pool.acquire(&target).await?;
//! assert_eq!(first.origin, Origin::Dialed);
//! first.finish(false); // it carried traffic: closed, never pooled
//!
//! // Second: admitted (a miss, dialed for us); its new manager starts a background dial.
//! let second = pool.acquire(&target).await?;
//! assert_eq!(second.origin, Origin::Dialed);
//! second.finish(false);
//!
//! // Await the spare (an event, not a sleep), then the third client gets it.
//! let mut dest = pool.watch_destination(&target).await?;
//! dest.wait_for(|s| s.idle == 1).await?;
//! let third = pool.acquire(&target).await?;
//! assert_eq!(third.origin, Origin::Pooled);
//! third.finish(false);
//!
//! dest.wait_for(|s| s.idle == 1 && s.is_quiet()).await?; // its replacement
//! let stats = pool.stats().await?;
//! assert_eq!((stats.first_sightings, stats.pool_misses, stats.pool_hits), (1, 1, 1));
//! assert_eq!(stats.connections_in_use, 0);
//!
//! let report = pool.run_janitor().await?; // nothing is 90 s old yet
//! assert_eq!(report.expired, 0);
//! pool.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod budget;
pub mod checkout_wait;
pub mod directory;
pub mod handle;
pub mod janitor;
pub mod lease;
pub mod manager;
pub mod messages;
pub mod options;
pub mod refill;
pub mod server_limit;
pub mod spare;
pub mod stats;

pub use admission::Admission;
pub use checkout_wait::CheckoutWaitStats;
pub use handle::{Pool, PoolError};
pub use lease::PoolLease;
pub use messages::{
    BudgetMsg, Checkout, DirectoryMsg, Fault, JanitorMsg, LeaseOutcome, ManagerMsg, ManagerSweep,
    OutsideDial, Returned, SweepReport,
};
pub use options::PoolOptions;
pub use refill::{RefillMode, RefillStats};
pub use stats::{BudgetStats, DestCounters, DestStats, PoolStats, SparePolicy, TargetReason};

/// Telemetry categories the pool records under.
pub mod category {
    /// A cap closed a connection or forced an eviction (warning).
    pub const POOL_LIMIT: &str = "pool.limit";
    /// A background dial failed (error).
    pub const POOL_DIAL: &str = "pool.dial";
    /// An actor failed and was restarted (error).
    pub const POOL_SUPERVISOR: &str = "pool.supervisor";
    /// A checkout fell back to a direct dial (warning).
    pub const POOL_FALLBACK: &str = "pool.fallback";
}
