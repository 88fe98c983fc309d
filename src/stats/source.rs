//! Where pool stats come from: anything that can answer "what are your counters?" in time.
//!
//! A trait rather than the concrete [`Pool`] so the endpoint can be wired to a pool built
//! elsewhere, and so a harness can stand in a pool that never answers.

use crate::pool::{Pool, PoolStats};
use crate::upstream::BoxFuture;

pub trait PoolStatsSource: Send + Sync + 'static {
    /// The pool's counters. The endpoint bounds this call with its own timeout.
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>>;

    /// Whether there is a pool now (a reload may turn it on or off).
    fn enabled(&self) -> bool {
        true
    }
}

/// The daemon's pool as a reload leaves it: there or not, swapped whole.
#[derive(Default)]
pub struct LivePool(arc_swap::ArcSwapOption<Pool>);

impl LivePool {
    pub fn new(pool: Option<Pool>) -> Self {
        LivePool(arc_swap::ArcSwapOption::from(pool.map(std::sync::Arc::new)))
    }

    pub fn set(&self, pool: Option<Pool>) {
        self.0.store(pool.map(std::sync::Arc::new));
    }

    pub fn get(&self) -> Option<Pool> {
        self.0.load_full().map(|pool| (*pool).clone())
    }
}

impl PoolStatsSource for LivePool {
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>> {
        Box::pin(async move {
            match self.get() {
                Some(pool) => pool.stats().await.map_err(|e| e.to_string()),
                None => Err("the pool is off".into()),
            }
        })
    }

    fn enabled(&self) -> bool {
        self.0.load().is_some()
    }
}

impl PoolStatsSource for Pool {
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>> {
        Box::pin(async move { Pool::stats(self).await.map_err(|e| e.to_string()) })
    }
}
