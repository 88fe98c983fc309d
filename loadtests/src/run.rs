//! `loadgen run`: closed-loop clients, each unit of work one full SOCKS5 session (greeting,
//! CONNECT, N keep-alive requests, close).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::net::TcpStream;

use crate::client::{open_from, Route};
use crate::http::{self, ReadBuf};
use crate::stats::{new_histogram, Latency, RunRecord, UpstreamCounts};
use crate::upstream::fetch_json;

#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// SOCKS5 proxy address (loopback only).
    #[arg(long, value_parser = crate::targets::parse_addr, conflicts_with = "direct")]
    pub proxy: Option<SocketAddr>,
    /// Connect to the destinations without a proxy (the baseline).
    #[arg(long)]
    pub direct: bool,
    /// RFC 1929 username (with --socks-pass).
    #[arg(long, requires = "socks_pass")]
    pub socks_user: Option<String>,
    #[arg(long, requires = "socks_user")]
    pub socks_pass: Option<String>,
}

impl RouteArgs {
    pub fn route(&self) -> Result<Route, String> {
        match (self.proxy, self.direct) {
            (Some(proxy), false) => Ok(Route::Socks {
                proxy,
                auth: self.socks_user.clone().zip(self.socks_pass.clone()),
            }),
            (None, true) => Ok(Route::Direct),
            _ => Err("give --proxy ADDR or --direct".into()),
        }
    }

    pub fn describe(&self) -> String {
        match self.proxy {
            Some(proxy) => format!("socks5://{proxy}"),
            None => "direct".into(),
        }
    }
}

/// Labels that tie a record to a configuration and a round of run.sh.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordArgs {
    /// Name of the configuration measured, used by `loadgen report`.
    #[arg(long, default_value = "unlabelled")]
    pub label: String,
    #[arg(long, default_value = "adhoc")]
    pub scenario: String,
    #[arg(long, default_value_t = 1)]
    pub round: u32,
    /// Write the full record (including the latency CDF) as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Exit non-zero if any unit of work failed (smoke runs); by default only if all did.
    #[arg(long)]
    pub fail_on_errors: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    /// Destinations: IP:PORT or IP:FIRST-LAST, repeatable or comma-separated.
    #[arg(long, required = true)]
    pub target: Vec<String>,
    /// Clients running at once, each starting its next session when the last ends.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, short = 'd', default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before measuring, so pools and caches reach their steady state.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    #[arg(long, short = 'n', default_value_t = 1)]
    pub requests_per_session: u32,
    /// Path requested on each destination.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Limit on one whole session, after which it counts as a timeout error.
    #[arg(long, default_value_t = 10.0)]
    pub session_timeout: f64,
    /// Pick destinations at random (default when there are several) instead of in turn.
    #[arg(long)]
    pub in_turn: bool,
    /// Client i always uses destination i (mod the number of destinations): each client has
    /// its own destination, as an application server has its own database.
    #[arg(long, conflicts_with = "in_turn")]
    pub pin_targets: bool,
    /// Client i connects from this loopback address plus i (e.g. 127.0.0.10: clients from
    /// 127.0.0.10, .11, ...), so a balancer sees many clients, not one.
    #[arg(long, value_parser = parse_source_base)]
    pub source_base: Option<std::net::Ipv4Addr>,
    /// Upstream servers whose /__stats to read before and after (proof of reuse).
    #[arg(long)]
    pub upstream_stats: Vec<String>,
    /// An HTTP URL path on loopback to sample once a second while running, e.g.
    /// 127.0.0.1:9090/api/pool/stats (the proxy's stats endpoint). Repeatable (one per
    /// instance of a fleet): each sample then carries the URL it came from as `sampled_url`.
    #[arg(long)]
    pub sample_url: Vec<String>,
    /// Keep sampling --sample-url this many seconds after the load stops (cold destinations
    /// should be pruned); those samples are recorded apart.
    #[arg(long, default_value_t = 0.0)]
    pub linger: f64,
    #[command(flatten)]
    pub record: RecordArgs,
}

struct Shared {
    sessions: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

struct WorkerResult {
    session_hist: Histogram<u64>,
    request_hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    sessions: u64,
    requests: u64,
}

pub async fn run(args: RunArgs) -> Result<RunRecord, String> {
    let route = args.route.route()?;
    let targets = Arc::new(crate::targets::parse_set(&args.target.join(","))?);
    let upstream_addrs = parse_stats_addrs(&args.upstream_stats)?;
    if args.concurrency == 0 || args.duration <= 0.0 || args.warmup < 0.0 {
        return Err("concurrency and duration must be positive".into());
    }
    let shared = Arc::new(Shared {
        sessions: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_secs_f64(args.session_timeout);
    let random = targets.len() > 1 && !args.in_turn && !args.pin_targets;
    if let Some(base) = args.source_base {
        if u32::from(base).checked_add(args.concurrency as u32).map(|last| last >> 24) != Some(127)
        {
            return Err(format!(
                "--source-base {base} + {} clients leaves 127.0.0.0/8",
                args.concurrency
            ));
        }
    }

    let mut workers = Vec::with_capacity(args.concurrency);
    for index in 0..args.concurrency {
        let worker = Worker {
            route: route.clone(),
            targets: targets.clone(),
            shared: shared.clone(),
            requests_per_session: args.requests_per_session,
            path: args.path.clone(),
            timeout,
            measure_from,
            end,
            random,
            pinned: args.pin_targets.then_some(index % targets.len()),
            source: args.source_base.map(|base| {
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from(base) + index as u32))
            }),
            next: index,
        };
        workers.push(tokio::spawn(worker.run()));
    }

    let label = args.record.label.clone();
    let progress = tokio::spawn(progress(label, shared.clone(), t0, end));
    let linger = Duration::from_secs_f64(args.linger.max(0.0));
    let several = args.sample_url.len() > 1;
    let samplers: Vec<_> = args
        .sample_url
        .iter()
        .map(|url| (url.clone(), tokio::spawn(sample(url.clone(), end, linger))))
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let before = upstream_counts(&upstream_addrs).await;
    let measure_started = Instant::now();

    let mut session_hist = new_histogram();
    let mut request_hist = new_histogram();
    let mut errors = BTreeMap::new();
    let (mut sessions, mut requests) = (0, 0);
    for worker in workers {
        let result = worker.await.map_err(|e| format!("worker failed: {e}"))?;
        session_hist.add(&result.session_hist).map_err(|e| e.to_string())?;
        request_hist.add(&result.request_hist).map_err(|e| e.to_string())?;
        for (kind, count) in result.errors {
            *errors.entry(kind).or_insert(0) += count;
        }
        sessions += result.sessions;
        requests += result.requests;
    }
    let elapsed = measure_started.elapsed().as_secs_f64();
    let after = upstream_counts(&upstream_addrs).await;
    progress.abort();
    let (mut stats_samples, mut stats_after) = (Vec::new(), Vec::new());
    for (url, handle) in samplers {
        let (mut during, mut after) = handle.await.unwrap_or_default();
        if several {
            for sample in during.iter_mut().chain(after.iter_mut()) {
                if let Some(object) = sample.as_object_mut() {
                    object.insert("sampled_url".into(), url.clone().into());
                }
            }
        }
        stats_samples.append(&mut during);
        stats_after.append(&mut after);
    }

    let upstream = match (before, after) {
        (Some(b), Some(a)) => Some(UpstreamCounts {
            connections: a.connections.saturating_sub(b.connections),
            used: a.used.saturating_sub(b.used),
            requests: a.requests.saturating_sub(b.requests),
            open: a.open,
        }),
        _ => None,
    };
    Ok(RunRecord {
        mode: "run".into(),
        label: args.record.label,
        scenario: args.record.scenario,
        round: args.record.round,
        route: args.route.describe(),
        concurrency: args.concurrency,
        duration_secs: elapsed,
        requests_per_session: args.requests_per_session,
        destinations: targets.len(),
        sessions,
        requests,
        errors,
        rps: requests as f64 / elapsed,
        sessions_per_sec: sessions as f64 / elapsed,
        session_latency: Latency::from_histogram(&session_hist),
        request_latency: Latency::from_histogram(&request_hist),
        upstream,
        stats_samples,
        stats_after,
        linger_secs: args.linger,
        ..RunRecord::default()
    })
}

struct Worker {
    route: Route,
    targets: Arc<Vec<SocketAddr>>,
    shared: Arc<Shared>,
    requests_per_session: u32,
    path: String,
    timeout: Duration,
    measure_from: Instant,
    end: Instant,
    random: bool,
    /// `--pin-targets`: this client's only destination.
    pinned: Option<usize>,
    /// `--source-base`: this client's source address.
    source: Option<std::net::IpAddr>,
    next: usize,
}

impl Worker {
    async fn run(mut self) -> WorkerResult {
        let mut result = WorkerResult {
            session_hist: new_histogram(),
            request_hist: new_histogram(),
            errors: BTreeMap::new(),
            sessions: 0,
            requests: 0,
        };
        let mut buf = ReadBuf::default();
        // Bounded: no session starts after `end`, and each is cut off at `timeout`.
        while Instant::now() < self.end {
            let target = self.pick();
            let started = Instant::now();
            let measured = started >= self.measure_from;
            let mut request_times = Vec::with_capacity(self.requests_per_session as usize);
            let outcome = tokio::time::timeout(
                self.timeout,
                self.session(target, &mut buf, &mut request_times),
            )
            .await;
            let outcome = match outcome {
                Ok(inner) => inner,
                Err(_) => Err("timeout".to_string()),
            };
            let done = request_times.len() as u64;
            self.shared.requests.fetch_add(done, Ordering::Relaxed);
            match outcome {
                Ok(()) => {
                    self.shared.sessions.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        let _ = result.session_hist.record(micros(started.elapsed()));
                        result.sessions += 1;
                    }
                }
                Err(kind) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        *result.errors.entry(kind).or_insert(0) += 1;
                    }
                    // A buffer may hold part of a broken response; start clean.
                    buf = ReadBuf::default();
                    // Without a pause a refusing proxy would turn the loop into a busy spin.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            if measured {
                result.requests += done;
                for us in request_times {
                    let _ = result.request_hist.record(us);
                }
            }
        }
        result
    }

    fn pick(&mut self) -> SocketAddr {
        let index = if let Some(pinned) = self.pinned {
            pinned
        } else if self.random {
            fastrand::usize(..self.targets.len())
        } else {
            self.next = (self.next + 1) % self.targets.len();
            self.next
        };
        self.targets[index]
    }

    async fn session(
        &self,
        target: SocketAddr,
        buf: &mut ReadBuf,
        request_times: &mut Vec<u64>,
    ) -> Result<(), String> {
        let mut stream: TcpStream =
            open_from(&self.route, target, self.source).await.map_err(|e| e.kind())?;
        for _ in 0..self.requests_per_session {
            let sent = Instant::now();
            http::write_get(&mut stream, &self.path).await.map_err(|_| "http_write".to_string())?;
            http::read_response(&mut stream, buf).await.map_err(|e| e.kind().to_string())?;
            request_times.push(micros(sent.elapsed()));
        }
        Ok(())
    }
}

fn parse_source_base(text: &str) -> Result<std::net::Ipv4Addr, String> {
    let ip: std::net::Ipv4Addr = text.parse().map_err(|e| format!("bad address {text:?}: {e}"))?;
    if !ip.is_loopback() {
        return Err(format!("{ip} is not loopback: client sources must be 127.x addresses"));
    }
    Ok(ip)
}

pub fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

/// One line a second on stderr, so long runs show they are alive and how they are doing.
async fn progress(label: String, shared: Arc<Shared>, t0: Instant, end: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_sessions, mut last_requests) = (0, 0);
    let total = end.saturating_duration_since(t0).as_secs_f64();
    loop {
        tick.tick().await;
        let sessions = shared.sessions.load(Ordering::Relaxed);
        let requests = shared.requests.load(Ordering::Relaxed);
        let errors = shared.errors.load(Ordering::Relaxed);
        eprintln!(
            "[{label}] {:>4.0}/{total:.0}s  {} sessions/s  {} req/s  errors so far {errors}",
            t0.elapsed().as_secs_f64(),
            sessions - last_sessions,
            requests - last_requests,
        );
        last_sessions = sessions;
        last_requests = requests;
    }
}

type Samples = Vec<serde_json::Value>;

/// Samples a JSON endpoint once a second until `end` and then for `linger` more; failures are
/// skipped, not fatal. Returns (samples under load, samples after it).
async fn sample(url: String, end: Instant, linger: Duration) -> (Samples, Samples) {
    let (mut during, mut after) = (Vec::new(), Vec::new());
    let Some((addr, path)) = split_url(&url) else {
        eprintln!("--sample-url {url:?}: expected HOST:PORT/PATH on loopback; not sampling");
        return (during, after);
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stop = end + linger;
    // Bounded by `stop`; the first tick fires at once, so even a short run gets a sample.
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= stop {
            break;
        }
        if let Ok(value) = fetch_json(addr, &path).await {
            if now < end {
                during.push(value);
            } else {
                after.push(value);
            }
        }
    }
    if !linger.is_zero() {
        eprintln!("sampled {} after the load stopped", after.len());
    }
    (during, after)
}

fn split_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    crate::targets::parse_addr(host).ok().map(|addr| (addr, path))
}

fn parse_stats_addrs(items: &[String]) -> Result<Vec<SocketAddr>, String> {
    items
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(crate::targets::parse_addr)
        .collect()
}

/// Sums the counters of several upstream servers; `None` if any cannot be read.
pub async fn upstream_counts(addrs: &[SocketAddr]) -> Option<UpstreamCounts> {
    if addrs.is_empty() {
        return None;
    }
    let mut total = UpstreamCounts::default();
    for addr in addrs {
        let value = fetch_json(*addr, "/__stats").await.ok()?;
        let counts: UpstreamCounts = serde_json::from_value(value).ok()?;
        total.connections += counts.connections;
        total.used += counts.used;
        total.requests += counts.requests;
        total.open += counts.open;
    }
    Some(total)
}

pub fn print_summary(record: &RunRecord) {
    println!(
        "{} [{}] {} clients, {} dest, {} req/session, {:.1} s: {:.0} req/s, {:.0} sessions/s, {} errors",
        record.label,
        record.route,
        record.concurrency,
        record.destinations,
        record.requests_per_session,
        record.duration_secs,
        record.rps,
        record.sessions_per_sec,
        record.error_total()
    );
    if let Some(lat) = &record.session_latency {
        println!("  session latency: {}", lat.text());
    }
    if let Some(lat) = &record.request_latency {
        println!("  request latency: {}", lat.text());
    }
    for (kind, count) in &record.errors {
        println!("  error {kind}: {count}");
    }
    if let Some(up) = &record.upstream {
        println!(
            "  upstream saw {} new connections for {} requests ({:.2} connections per session)",
            up.connections,
            up.requests,
            up.connections as f64 / (record.sessions.max(1)) as f64
        );
    }
}
