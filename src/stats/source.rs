//! Where pool stats come from: anything that can answer "what are your counters?" in time.
//!
//! A trait rather than the concrete [`Pool`] so the endpoint can be wired to a pool built
//! elsewhere, and so a harness can stand in a pool that never answers.

use crate::pool::{Pool, PoolStats};
use crate::upstream::BoxFuture;

pub trait PoolStatsSource: Send + Sync + 'static {
    /// The pool's counters. The endpoint bounds this call with its own timeout.
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>>;
}

impl PoolStatsSource for Pool {
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>> {
        Box::pin(async move { Pool::stats(self).await.map_err(|e| e.to_string()) })
    }
}
