//! Result records shared by the load modes and the report writer, and latency summaries from
//! HDR histograms.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond histogram, 3 significant digits, up to one hour.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// (latency in microseconds, fraction of samples at or below it), for CDF plots.
    pub cdf: Vec<(u64, f64)>,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let mut quantiles: Vec<f64> = (0..=98).map(|i| f64::from(i) / 100.0).collect();
        quantiles.extend([0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]);
        let cdf = quantiles.into_iter().map(|q| (h.value_at_quantile(q), q)).collect();
        Some(Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            cdf,
        })
    }

    pub fn text(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (mean {}, n={})",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            ms(self.mean_us as u64),
            self.count
        )
    }
}

pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// What the upstream server saw: the proof of reuse from the server's side.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UpstreamCounts {
    /// TCP connections accepted (spares included, the harness's own stats requests excluded).
    pub connections: u64,
    /// Connections that carried at least one request.
    pub used: u64,
    pub requests: u64,
    /// Connections open when read.
    pub open: u64,
}

/// One measurement, whatever the mode; fields a mode does not produce stay empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    /// "run", "bulk", "hold" or "udp".
    pub mode: String,
    /// The configuration measured (e.g. "dante", "pool-tuned"); given by the caller.
    pub label: String,
    pub scenario: String,
    pub round: u32,
    pub route: String,
    pub concurrency: usize,
    pub duration_secs: f64,
    pub requests_per_session: u32,
    /// UDP payload bytes per datagram (mode "udp"); 0 otherwise.
    pub payload_bytes: usize,
    pub destinations: usize,
    pub sessions: u64,
    pub requests: u64,
    pub errors: BTreeMap<String, u64>,
    pub rps: f64,
    pub sessions_per_sec: f64,
    /// `loadgen run --rate`: the sessions per second offered (none for a closed loop).
    pub offered_rate: Option<f64>,
    pub session_latency: Option<Latency>,
    pub request_latency: Option<Latency>,
    /// Upstream counters during the measured window (after minus before).
    pub upstream: Option<UpstreamCounts>,
    pub bytes: u64,
    pub mib_per_sec: f64,
    pub held: u64,
    pub attempted: u64,
    pub still_alive: u64,
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    pub kib_per_session: f64,
    /// Samples of a stats endpoint taken while running (raw JSON).
    pub stats_samples: Vec<serde_json::Value>,
    /// Samples taken after the load stopped (for `linger_secs`).
    pub stats_after: Vec<serde_json::Value>,
    pub linger_secs: f64,
    pub warmup_secs: f64,
    /// Milliseconds between two stats samples (samples carry `t_ms` since the run began).
    pub sample_interval_ms: u64,
    /// `--phases`: clients over time (mode "step").
    pub phases: Vec<crate::run::Phase>,
    /// `--session-log`: (start in µs since the run began, latency in µs, 0 for a failure).
    pub session_log: Vec<(u64, u64)>,
    /// Sessions begun while `strace` counted (mode "syscalls").
    pub traced_sessions: u64,
    /// `strace -c` of the proxy over the run, by syscall.
    pub syscalls: BTreeMap<String, SyscallCount>,
    /// `--cpu-pid`: the proxy's CPU time over the measured window.
    pub proxy_cpu: Option<crate::cpu::CpuTime>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyscallCount {
    pub calls: u64,
    pub errors: u64,
}

impl RunRecord {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The proxy's CPU time (user and system) per measured session, in µs.
    pub fn cpu_us_per_session(&self) -> Option<f64> {
        let cpu = self.proxy_cpu?;
        (self.sessions > 0).then(|| (cpu.user_us + cpu.system_us) as f64 / self.sessions as f64)
    }
}
