//! Operational events in a bounded ring buffer, served later by the stats endpoint.
//!
//! This is a log of notable things (a dial failed, a cap dropped a connection, an actor was
//! restarted), not a hot path: a short `std::sync::Mutex` around a `VecDeque` is enough, and the
//! handle is a cheap `Clone`. The buffer keeps at most `max_events` events and forgets events
//! older than `retention_hours`.
//!
//! Noise cannot push evidence out. Repeats of an event (same severity, category, message and
//! source, where the source is its `client` or `destination` detail) within
//! [`AGGREGATION_WINDOW`] become one event with a `count` and a `last_ms`; a kind seen from more
//! than [`SOURCES_PER_KIND`] sources in a window folds the rest into one event for the kind
//! (`source: "(others)"`, counting the sources). When the ring is full the oldest `info` event
//! goes first. 300 bare connects from outside `client_networks` used to push an auth warning
//! out of the 256-event ring; now they are one or a few events.

use std::collections::{HashMap, VecDeque};
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
    /// How many times it happened (repeats within the aggregation window are folded in).
    #[serde(default = "one")]
    pub count: u64,
    /// When it last happened (equal to `timestamp_ms` for a single occurrence).
    #[serde(default)]
    pub last_ms: u64,
}

fn one() -> u64 {
    1
}

/// Repeats within this window are folded into one event.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(60);
/// Distinct sources one kind of event may have in a window before the rest are folded.
pub const SOURCES_PER_KIND: usize = 8;
/// The source named by the event that stands for the sources beyond [`SOURCES_PER_KIND`].
pub const OTHER_SOURCES: &str = "(others)";

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
    /// Events ever recorded, including those pushed out since (repeats counted).
    recorded: u64,
    /// Sequence number of `events[0]`; an event's index is its sequence minus this.
    front_seq: u64,
    /// The event a repeat folds into, by (kind, source), while within the window.
    latest: HashMap<(Kind, String), u64>,
    /// Distinct sources seen per kind in the current window, and when that window began.
    sources: HashMap<Kind, (u64, usize)>,
}

/// What makes two events "the same kind".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    severity: Severity,
    category: String,
    message: String,
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
                front_seq: 0,
                latest: HashMap::new(),
                sources: HashMap::new(),
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
        let now = now_ms();
        let mut details: Map<String, Value> =
            details.into_iter().map(|(k, v)| (k.into(), v)).collect();
        let kind = Kind { severity, category: category.to_string(), message: message.into() };
        let mut ring = lock(inner);
        ring.prune(now);
        ring.recorded += 1;
        let source = source_of(&details);
        if ring.fold(&kind, &source, now) {
            return;
        }
        // A new source for this kind: beyond the allowance it joins the kind's "others" event.
        let window_ms = AGGREGATION_WINDOW.as_millis() as u64;
        let entry = ring.sources.entry(kind.clone()).or_insert((now, 0));
        if now.saturating_sub(entry.0) >= window_ms {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let source = if entry.1 > SOURCES_PER_KIND {
            if ring.fold(&kind, OTHER_SOURCES, now) {
                return;
            }
            details = Map::new();
            details.insert("source".into(), Value::from(OTHER_SOURCES));
            OTHER_SOURCES.to_string()
        } else {
            source
        };
        let event = Event {
            timestamp_ms: now,
            severity,
            category: kind.category.clone(),
            message: kind.message.clone(),
            details,
            count: 1,
            last_ms: now,
        };
        ring.push(event, (kind, source));
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

/// The source an event is about, for aggregation: its client, else its destination.
fn source_of(details: &Map<String, Value>) -> String {
    ["client", "destination", "source"]
        .iter()
        .find_map(|key| details.get(*key))
        .map(|value| match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

impl Ring {
    fn prune(&mut self, now_ms: u64) {
        let retention_ms = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        while self.events.front().is_some_and(|e| e.last_ms.max(e.timestamp_ms) < cutoff) {
            self.pop_front();
        }
        let window_ms = AGGREGATION_WINDOW.as_millis() as u64;
        if self.sources.len() > self.max_events {
            self.sources.retain(|_, (start, _)| now_ms.saturating_sub(*start) < window_ms);
        }
    }

    /// Folds a repeat into the latest event of its kind and source, if that one began within
    /// the aggregation window and is still held. True when folded.
    fn fold(&mut self, kind: &Kind, source: &str, now: u64) -> bool {
        let key = (kind.clone(), source.to_string());
        let Some(&seq) = self.latest.get(&key) else { return false };
        let window_ms = AGGREGATION_WINDOW.as_millis() as u64;
        let index = seq.checked_sub(self.front_seq).and_then(|i| usize::try_from(i).ok());
        match index.and_then(|i| self.events.get_mut(i)) {
            Some(event) if now.saturating_sub(event.timestamp_ms) < window_ms => {
                event.count += 1;
                event.last_ms = now;
                if source == OTHER_SOURCES {
                    let others = event.details.get("sources").and_then(Value::as_u64).unwrap_or(1);
                    event.details.insert("sources".into(), Value::from(others + 1));
                }
                true
            }
            _ => {
                self.latest.remove(&key);
                false
            }
        }
    }

    fn push(&mut self, event: Event, key: (Kind, String)) {
        if self.events.len() >= self.max_events {
            self.evict_one();
        }
        let seq = self.front_seq + self.events.len() as u64;
        self.events.push_back(event);
        self.latest.insert(key, seq);
    }

    /// Makes room: the oldest `info` event if there is one (warnings and errors are the
    /// evidence worth keeping), else the oldest event.
    fn evict_one(&mut self) {
        match self.events.iter().position(|e| e.severity == Severity::Info) {
            Some(0) | None => self.pop_front(),
            Some(index) => {
                // Removing from the middle shifts later events down by one: renumber them.
                self.events.remove(index);
                let removed_seq = self.front_seq + index as u64;
                self.latest.retain(|_, seq| *seq != removed_seq);
                for seq in self.latest.values_mut() {
                    if *seq > removed_seq {
                        *seq -= 1;
                    }
                }
            }
        }
    }

    fn pop_front(&mut self) {
        if self.events.pop_front().is_some() {
            let gone = self.front_seq;
            self.front_seq += 1;
            self.latest.retain(|_, seq| *seq != gone);
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
            let mut ring = lock(inner);
            ring.events[0].timestamp_ms -= 2 * 3_600_000;
            ring.events[0].last_ms -= 2 * 3_600_000;
        }
        t.info("new", "fresh", vec![]);
        let events = t.query(&EventQuery::default());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "fresh");
    }

    #[test]
    fn repeats_fold_into_one_event_and_a_flood_cannot_push_out_a_warning() {
        let t = telemetry(16);
        t.warning("auth", "login refused: too many failures", vec![("client", json!("192.0.2.9"))]);
        // 300 connects from 300 sources outside client_networks, and 300 repeats from one.
        for i in 0..300 {
            t.warning(
                "access",
                "client address not allowed",
                vec![("client", json!(format!("10.0.{}.{}", i / 256, i % 256)))],
            );
            t.warning("access", "client address not allowed", vec![("client", json!("10.9.9.9"))]);
        }
        let events = t.query(&EventQuery::default());
        assert!(events.len() <= SOURCES_PER_KIND + 3, "{} events", events.len());
        assert!(
            events.iter().any(|e| e.category == "auth"),
            "the auth warning survived: {events:#?}"
        );
        let repeated = events.iter().find(|e| e.details.get("client") == Some(&json!("10.9.9.9")));
        assert_eq!(repeated.map(|e| e.count), Some(300));
        let others = events.iter().find(|e| e.details.get("source") == Some(&json!(OTHER_SOURCES)));
        let others = others.expect("an event for the other sources");
        assert_eq!(others.count, 300 - (SOURCES_PER_KIND as u64 - 1));
        let total: u64 = events.iter().map(|e| e.count).sum();
        assert_eq!(total, 601, "every occurrence is counted somewhere");
        assert_eq!(t.counts().1, 601);
    }

    #[test]
    fn a_full_ring_drops_info_before_warnings() {
        let t = telemetry(4);
        t.warning("pool.limit", "evicted", vec![]);
        for i in 0..10 {
            t.info("pool", format!("info {i}"), vec![]);
        }
        let events = t.query(&EventQuery::default());
        assert_eq!(events.len(), 4);
        assert!(events.iter().any(|e| e.severity == Severity::Warning));
    }

    #[test]
    fn disabled_records_nothing() {
        let t = Telemetry::new(&TelemetryConfig { enabled: false, ..Default::default() });
        t.error("pool", "x", vec![]);
        assert!(t.query(&EventQuery::default()).is_empty());
    }
}
