//! Figures over time from one record: the proxy's counters as sampled (`--sample-url`, each
//! sample stamped `t_ms`) and, with `--session-log`, each session's start and latency.
//!
//! Checkouts are `pool_hits + pool_misses + first_sightings` (a first sighting is a checkout
//! the pool answers with "dial it yourself", not counted as a miss by poolsocks). The samples
//! of several instances (`sampled_url`) are summed.

use std::collections::BTreeMap;

use crate::stats::RunRecord;

/// The counters at one instant, summed over instances.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Point {
    pub t_ms: f64,
    pub hits: f64,
    pub checkouts: f64,
    pub idle: f64,
}

fn field(sample: &serde_json::Value, key: &str) -> Option<f64> {
    sample.get(key)?.as_f64()
}

/// The samples of one record as points in time, oldest first, under load and after it. A
/// sample repeating the previous one's counters exactly is left out: poolsocks serves its pool
/// counters from a cache (up to 250 ms old), so a repeat tells nothing new and its time stamp
/// would be wrong. Samples without `t_ms` (older records) are taken one interval apart.
pub fn points(record: &RunRecord) -> Vec<Point> {
    let interval =
        if record.sample_interval_ms == 0 { 1000.0 } else { record.sample_interval_ms as f64 };
    let mut by_url: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for (i, sample) in record.stats_samples.iter().chain(record.stats_after.iter()).enumerate() {
        let Some(hits) = field(sample, "pool_hits") else { continue };
        let url = sample.get("sampled_url").and_then(|u| u.as_str()).unwrap_or("").to_string();
        let misses = field(sample, "pool_misses").unwrap_or(0.0);
        let first = field(sample, "first_sightings").unwrap_or(0.0);
        let point = Point {
            t_ms: field(sample, "t_ms").unwrap_or(i as f64 * interval),
            hits,
            checkouts: hits + misses + first,
            idle: field(sample, "total_idle").unwrap_or(0.0),
        };
        let list = by_url.entry(url).or_default();
        if list.last().is_some_and(|last| {
            last.hits == point.hits && last.checkouts == point.checkouts && last.idle == point.idle
        }) {
            continue;
        }
        list.push(point);
    }
    let mut lists: Vec<Vec<Point>> = by_url.into_values().collect();
    if lists.len() == 1 {
        return lists.pop().unwrap_or_default();
    }
    // Several instances: at each instant where one was sampled, the sum of each instance's
    // latest sample (instances not sampled yet count as zero).
    let mut times: Vec<f64> = lists.iter().flatten().map(|p| p.t_ms).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    times
        .into_iter()
        .map(|t| {
            let mut sum = Point { t_ms: t, ..Point::default() };
            for list in &lists {
                if let Some(p) = list.iter().rev().find(|p| p.t_ms <= t) {
                    sum.hits += p.hits;
                    sum.checkouts += p.checkouts;
                    sum.idle += p.idle;
                }
            }
            sum
        })
        .collect()
}

/// Hits and checkouts between two points.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub hits: f64,
    pub checkouts: f64,
}

impl Window {
    pub fn between(a: &Point, b: &Point) -> Window {
        Window { hits: b.hits - a.hits, checkouts: b.checkouts - a.checkouts }
    }

    pub fn rate(&self) -> Option<f64> {
        (self.checkouts > 0.0).then(|| self.hits / self.checkouts)
    }
}

/// The end of the load in ms since the run began.
pub fn load_end_ms(record: &RunRecord) -> f64 {
    let total = if record.phases.is_empty() {
        record.warmup_secs + record.duration_secs
    } else {
        record.phases.iter().map(|p| p.secs).sum()
    };
    total * 1000.0
}

/// The cold ramp (from the first sample to the first one at or after 1 s) and the rest of
/// the load (from there to the first sample after the load, or the last one under it).
pub fn ramp_and_rest(record: &RunRecord) -> Option<(Window, Window)> {
    let points = points(record);
    let first = points.first()?;
    let split = points.iter().find(|p| p.t_ms >= 1000.0)?;
    let end_ms = load_end_ms(record);
    let last = points
        .iter()
        .find(|p| p.t_ms >= end_ms)
        .or_else(|| points.iter().rev().find(|p| p.t_ms < end_ms))?;
    let rest =
        if last.t_ms > split.t_ms { Window::between(split, last) } else { Window::default() };
    Some((Window::between(first, split), rest))
}

/// Mean idle spares over the samples taken under load after the first second.
pub fn mean_idle(record: &RunRecord) -> Option<f64> {
    let end_ms = load_end_ms(record);
    let idle: Vec<f64> = points(record)
        .iter()
        .filter(|p| p.t_ms >= 1000.0 && p.t_ms < end_ms)
        .map(|p| p.idle)
        .collect();
    (!idle.is_empty()).then(|| idle.iter().sum::<f64>() / idle.len() as f64)
}

/// The step of a `--phases` run: (when the clients first rise, when they next fall), in ms.
pub fn step_times(record: &RunRecord) -> Option<(f64, f64)> {
    let mut at = 0.0;
    let mut up = None;
    let mut previous: Option<usize> = None;
    for phase in &record.phases {
        if let Some(before) = previous {
            match up {
                None if phase.clients > before => up = Some(at),
                Some(up) if phase.clients < before => return Some((up * 1000.0, at * 1000.0)),
                _ => {}
            }
        }
        previous = Some(phase.clients);
        at += phase.secs;
    }
    up.map(|up| (up * 1000.0, at * 1000.0))
}

/// The first start of a run of windows from which `rate` holds both in that window and over
/// everything up to the end: the time hits reach `rate` and stay there, with one slow window
/// later not undoing it. `windows` are (start ms, window), in order.
pub fn settled_from(windows: &[(f64, Window)], rate: f64) -> Option<f64> {
    for (k, (start, window)) in windows.iter().enumerate() {
        let rest = windows[k..].iter().fold(Window::default(), |sum, (_, w)| Window {
            hits: sum.hits + w.hits,
            checkouts: sum.checkouts + w.checkouts,
        });
        if window.rate().is_some_and(|r| r >= rate) && rest.rate().is_some_and(|r| r >= rate) {
            return Some(*start);
        }
    }
    None
}

/// Proxy side: ms from `from` until hits reach `rate` and stay there until `to`, by the
/// windows between successive samples from the first sample at or after `from` (the window
/// under way at `from` is left out: it mixes in checkouts from before the step, so the figure
/// errs late, by less than one sample interval).
pub fn time_to_rate_proxy(record: &RunRecord, from: f64, to: f64, rate: f64) -> Option<f64> {
    let points = points(record);
    let begin = points.iter().position(|p| p.t_ms >= from)?;
    let windows: Vec<(f64, Window)> = points[begin..]
        .windows(2)
        .take_while(|pair| pair[0].t_ms < to)
        .map(|pair| (pair[0].t_ms, Window::between(&pair[0], &pair[1])))
        .filter(|(_, w)| w.checkouts > 0.0)
        .collect();
    settled_from(&windows, rate).map(|t| t - from)
}

/// Client side (`--session-log`): sessions that took less than `fast_us` count as hits (on the
/// delay line a session through a spare costs ~1 RTT, one that dials ~2 RTT), binned by start
/// time into `bin_ms` bins; ms from `from` until the fast share reaches `rate` and stays.
pub fn time_to_rate_client(
    record: &RunRecord,
    from: f64,
    to: f64,
    fast_us: f64,
    bin_ms: f64,
    rate: f64,
) -> Option<f64> {
    let windows = client_bins(record, from, to, fast_us, bin_ms);
    settled_from(&windows, rate).map(|t| t - from)
}

/// Fast sessions per bin of start time, failures counted as slow.
pub fn client_bins(
    record: &RunRecord,
    from: f64,
    to: f64,
    fast_us: f64,
    bin_ms: f64,
) -> Vec<(f64, Window)> {
    let bins = ((to - from) / bin_ms).ceil().max(0.0) as usize;
    let mut out: Vec<(f64, Window)> =
        (0..bins).map(|i| (from + i as f64 * bin_ms, Window::default())).collect();
    for (start_us, latency_us) in &record.session_log {
        let t = *start_us as f64 / 1000.0;
        if t < from || t >= to {
            continue;
        }
        let Some((_, bin)) = out.get_mut(((t - from) / bin_ms) as usize) else { continue };
        bin.checkouts += 1.0;
        if *latency_us > 0 && (*latency_us as f64) < fast_us {
            bin.hits += 1.0;
        }
    }
    out.retain(|(_, w)| w.checkouts > 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Phase;
    use serde_json::json;

    fn record(samples: Vec<serde_json::Value>) -> RunRecord {
        RunRecord {
            stats_samples: samples,
            sample_interval_ms: 100,
            phases: vec![
                Phase { clients: 2, secs: 1.0 },
                Phase { clients: 32, secs: 1.0 },
                Phase { clients: 2, secs: 1.0 },
            ],
            ..RunRecord::default()
        }
    }

    fn sample(t: f64, hits: u64, misses: u64, first: u64, idle: u64) -> serde_json::Value {
        json!({"t_ms": t, "pool_hits": hits, "pool_misses": misses, "first_sightings": first, "total_idle": idle})
    }

    #[test]
    fn step_found_and_time_to_hits_measured_from_it() {
        let r = record(vec![
            sample(0.0, 0, 0, 0, 0),
            sample(500.0, 40, 9, 1, 2),
            sample(1000.0, 90, 9, 1, 2),
            sample(1100.0, 100, 59, 1, 2),  // step: misses
            sample(1200.0, 150, 79, 1, 30), // 50 of 70 hits
            sample(1300.0, 250, 81, 1, 32), // 100 of 102 hits
            sample(1400.0, 350, 82, 1, 32),
            sample(2000.0, 950, 90, 1, 32),
            sample(3000.0, 1050, 90, 1, 4),
        ]);
        assert_eq!(step_times(&r), Some((1000.0, 2000.0)));
        assert_eq!(time_to_rate_proxy(&r, 1000.0, 2000.0, 0.95), Some(200.0));
        // A step between two samples is measured from the step to the next sample's window.
        assert_eq!(time_to_rate_proxy(&r, 950.0, 2000.0, 0.95), Some(250.0));
        let (ramp, rest) = ramp_and_rest(&r).expect("windows");
        assert_eq!(ramp, Window { hits: 90.0, checkouts: 100.0 });
        assert_eq!(rest.hits, 960.0);
        assert_eq!(rest.checkouts, 1041.0);
    }

    #[test]
    fn repeated_cached_samples_are_dropped() {
        let r = record(vec![
            sample(0.0, 0, 0, 0, 0),
            sample(100.0, 10, 1, 1, 3),
            sample(200.0, 10, 1, 1, 3),
            sample(300.0, 20, 1, 1, 3),
        ]);
        let t: Vec<f64> = points(&r).iter().map(|p| p.t_ms).collect();
        assert_eq!(t, [0.0, 100.0, 300.0]);
    }

    #[test]
    fn client_bins_count_fast_sessions() {
        let mut r = record(Vec::new());
        r.session_log =
            vec![(1_000_000, 25_000), (1_010_000, 11_000), (1_060_000, 11_000), (1_070_000, 0)];
        let bins = client_bins(&r, 1000.0, 2000.0, 15_000.0, 50.0);
        assert_eq!(
            bins,
            [
                (1000.0, Window { hits: 1.0, checkouts: 2.0 }),
                (1050.0, Window { hits: 1.0, checkouts: 2.0 })
            ]
        );
        assert_eq!(time_to_rate_client(&r, 1000.0, 2000.0, 15_000.0, 50.0, 0.95), None);
    }

    #[test]
    fn several_instances_are_summed() {
        let mut a = sample(0.0, 10, 0, 0, 1);
        a["sampled_url"] = json!("a");
        let mut b = sample(10.0, 5, 5, 0, 2);
        b["sampled_url"] = json!("b");
        let r = record(vec![a, b]);
        let p = points(&r);
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], Point { t_ms: 10.0, hits: 15.0, checkouts: 20.0, idle: 3.0 });
    }
}
