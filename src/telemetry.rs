//! Operational events in a bounded ring buffer, served later by the stats endpoint.
//!
//! This is a log of notable things (a dial failed, a cap dropped a connection, an actor was
//! restarted), not a hot path: a short `std::sync::Mutex` around a `VecDeque` is enough, and the
//! handle is a cheap `Clone`. The buffer keeps at most `max_events` events and forgets events
//! older than `retention_hours`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::TelemetryConfig;

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    /// Parses the names used in the JSON form (`info`, `warning`, `error`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "info" => Some(Severity::Info),
            "warning" | "warn" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub severity: Severity,
    /// A dotted area name, e.g. `pool.dial` (see the `category` constants in `crate::pool`).
    pub category: String,
    pub message: String,
    pub details: Map<String, Value>,
}

/// A filter over recorded events. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct EventQuery {
    /// Only events from the last N minutes.
    pub since_minutes: Option<u64>,
    /// At most this many events (the newest).
    pub limit: Option<usize>,
    /// Only this severity.
    pub severity: Option<Severity>,
    /// Only this category.
    pub category: Option<String>,
}

/// A shareable handle on the event buffer. A disabled handle records nothing.
#[derive(Debug, Clone)]
pub struct Telemetry {
    inner: Option<Arc<Mutex<Ring>>>,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Event>,
    max_events: usize,
    retention: Duration,
    /// Events ever recorded, including those pushed out since.
    recorded: u64,
}

impl Telemetry {
    pub fn new(config: &TelemetryConfig) -> Self {
        if !config.enabled || config.max_events == 0 {
            return Self::disabled();
        }
        Telemetry {
            inner: Some(Arc::new(Mutex::new(Ring {
                events: VecDeque::with_capacity(config.max_events.min(4096)),
                max_events: config.max_events,
                retention: Duration::from_secs(config.retention_hours.saturating_mul(3600)),
                recorded: 0,
            }))),
        }
    }

    pub fn disabled() -> Self {
        Telemetry { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Records an event now. `details` are small key/value facts (destination, error, counts).
    pub fn record<I, K>(
        &self,
        severity: Severity,
        category: &str,
        message: impl Into<String>,
        details: I,
    ) where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        let Some(inner) = &self.inner else { return };
        let event = Event {
            timestamp_ms: now_ms(),
            severity,
            category: category.to_string(),
            message: message.into(),
            details: details.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        };
        let mut ring = lock(inner);
        ring.prune(event.timestamp_ms);
        if ring.events.len() >= ring.max_events {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
        ring.recorded += 1;
    }

    pub fn info(&self, category: &str, message: impl Into<String>, details: Vec<(&str, Value)>) {
        self.record(Severity::Info, category, message, details);
    }

    pub fn warning(&self, category: &str, message: impl Into<String>, details: Vec<(&str, Value)>) {
        self.record(Severity::Warning, category, message, details);
    }

    pub fn error(&self, category: &str, message: impl Into<String>, details: Vec<(&str, Value)>) {
        self.record(Severity::Error, category, message, details);
    }

    /// Matching events, newest first.
    pub fn query(&self, query: &EventQuery) -> Vec<Event> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let now = now_ms();
        let mut ring = lock(inner);
        ring.prune(now);
        let oldest_wanted =
            query.since_minutes.map(|m| now.saturating_sub(m.saturating_mul(60_000)));
        ring.events
            .iter()
            .rev()
            .filter(|e| oldest_wanted.map_or(true, |t| e.timestamp_ms >= t))
            .filter(|e| query.severity.map_or(true, |s| e.severity == s))
            .filter(|e| query.category.as_deref().map_or(true, |c| e.category == c))
            .take(query.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    /// Events held now (after retention), and events ever recorded.
    pub fn counts(&self) -> (usize, u64) {
        match &self.inner {
            Some(inner) => {
                let mut ring = lock(inner);
                ring.prune(now_ms());
                (ring.events.len(), ring.recorded)
            }
            None => (0, 0),
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new(&TelemetryConfig::default())
    }
}

impl Ring {
    fn prune(&mut self, now_ms: u64) {
        let retention_ms = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        while self.events.front().is_some_and(|e| e.timestamp_ms < cutoff) {
            self.events.pop_front();
        }
    }
}

/// A panic while holding the lock cannot leave the ring inconsistent (every mutation is a
/// single push or pop), so a poisoned lock is still usable.
fn lock(inner: &Mutex<Ring>) -> MutexGuard<'_, Ring> {
    inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn telemetry(max_events: usize) -> Telemetry {
        Telemetry::new(&TelemetryConfig { enabled: true, max_events, retention_hours: 1 })
    }

    #[test]
    fn keeps_only_the_newest_max_events() {
        let t = telemetry(3);
        for i in 0..5 {
            t.info("test", format!("event {i}"), vec![("i", json!(i))]);
        }
        let events = t.query(&EventQuery::default());
        let messages: Vec<_> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["event 4", "event 3", "event 2"]);
        assert_eq!(t.counts(), (3, 5));
    }

    #[test]
    fn filters_by_severity_category_and_limit() {
        let t = telemetry(10);
        t.info("pool", "a", vec![]);
        t.warning("pool", "b", vec![]);
        t.error("pool.dial", "c", vec![("dest", json!("x:1"))]);
        t.warning("pool.dial", "d", vec![]);
        let warnings =
            t.query(&EventQuery { severity: Some(Severity::Warning), ..Default::default() });
        assert_eq!(warnings.iter().map(|e| &e.message[..]).collect::<Vec<_>>(), ["d", "b"]);
        let dial = t.query(&EventQuery {
            category: Some("pool.dial".into()),
            limit: Some(1),
            ..Default::default()
        });
        assert_eq!(dial.len(), 1);
        assert_eq!(dial[0].message, "d");
        let json = serde_json::to_value(&t.query(&EventQuery::default())[1]).unwrap();
        assert_eq!(json["severity"], "error");
        assert_eq!(json["details"]["dest"], "x:1");
    }

    #[test]
    fn drops_events_older_than_retention() {
        let t = telemetry(10);
        t.info("old", "stale", vec![]);
        if let Some(inner) = &t.inner {
            // Age the event artificially: retention is hours, a test cannot wait for it.
            lock(inner).events[0].timestamp_ms -= 2 * 3_600_000;
        }
        t.info("new", "fresh", vec![]);
        let events = t.query(&EventQuery::default());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "fresh");
    }

    #[test]
    fn disabled_records_nothing() {
        let t = Telemetry::new(&TelemetryConfig { enabled: false, ..Default::default() });
        t.error("pool", "x", vec![]);
        assert!(t.query(&EventQuery::default()).is_empty());
    }
}
