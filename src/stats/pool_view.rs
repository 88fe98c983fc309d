//! Reading the pool's counters: with a timeout, and shared between requests for a short time,
//! so however many HTTP clients poll, the actors see at most one stats call per period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::source::PoolStatsSource;
use crate::pool::PoolStats;

/// The pool as one request sees it.
#[derive(Debug, Clone)]
pub(super) enum PoolView {
    /// No pool is configured.
    Disabled,
    Up(Arc<PoolStats>),
    /// The pool did not answer in time, or failed.
    Unavailable(String),
}

pub(super) struct PoolReader {
    source: Option<Arc<dyn PoolStatsSource>>,
    timeout: Duration,
    ttl: Duration,
    /// Held across the actor call on purpose: concurrent requests wait for the one call in
    /// flight and share its answer instead of each sending their own.
    last: Mutex<Option<(Instant, PoolView)>>,
}

impl PoolReader {
    pub(super) fn new(
        source: Option<Arc<dyn PoolStatsSource>>,
        timeout: Duration,
        ttl: Duration,
    ) -> Self {
        PoolReader { source, timeout, ttl, last: Mutex::new(None) }
    }

    pub(super) fn enabled(&self) -> bool {
        self.source.as_ref().is_some_and(|source| source.enabled())
    }

    pub(super) async fn read(&self) -> PoolView {
        let Some(source) = self.source.as_ref().filter(|source| source.enabled()) else {
            return PoolView::Disabled;
        };
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((at, view)) = last.as_ref() {
            // An answer fetched while this request waited for the lock is as fresh as a new
            // call, and reusing it keeps a queue of requests from paying one timeout each.
            if *at >= arrived || at.elapsed() < self.ttl {
                return view.clone();
            }
        }
        let view = match tokio::time::timeout(self.timeout, source.stats()).await {
            Ok(Ok(stats)) => PoolView::Up(Arc::new(stats)),
            Ok(Err(why)) => PoolView::Unavailable(why),
            Err(_) => {
                PoolView::Unavailable(format!("the pool did not answer within {:?}", self.timeout))
            }
        };
        *last = Some((Instant::now(), view.clone()));
        view
    }
}
