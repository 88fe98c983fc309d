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
    /// Clients over time instead of -c/-d: CLIENTS:SECONDS,... from the start (warm-up
    /// included), e.g. `2:5,32:10,2:35` (5 s at 2 clients, 10 s at 32, 35 s at 2). Client i runs
    /// while the phase has more than i clients; a session under way when its phase ends
    /// finishes.
    #[arg(long, value_parser = parse_phases)]
    pub phases: Option<Phases>,
    /// Offered load instead of a closed loop: sessions per second over all clients, client i
    /// starting its k-th session at (k + i / c) * c / RATE s. Latencies at one rate that every
    /// configuration can carry compare what each adds to a session, not how deep its queue is
    /// at saturation (where latency is clients / throughput). A client that falls behind
    /// starts its next session at once; the rate reached is in the record.
    #[arg(long, conflicts_with = "phases")]
    pub rate: Option<f64>,
    /// Stop after this many sessions in all (warm-up included), e.g. for a syscall count per
    /// session; -d still bounds the run.
    #[arg(long)]
    pub sessions: Option<u64>,
    /// Record each session's start (since the run began) and latency in the JSON record.
    #[arg(long)]
    pub session_log: bool,
    /// Count the syscalls of this process (and its threads) with `strace -c -f -p PID` while the
    /// sessions run; the counts go into the record (mode "syscalls").
    #[arg(long)]
    pub strace_pid: Option<u32>,
    /// Read this process's CPU time (user and system, all its threads, from /proc/PID/stat)
    /// when the measured window starts and ends: the record then carries the proxy's CPU per
    /// session, a cost that moves far less with a noisy host than rps does.
    #[arg(long)]
    pub cpu_pid: Option<u32>,
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
    /// Milliseconds between two samples of --sample-url. Each sample carries `t_ms`, when it
    /// was asked for, in ms since the run began. (poolsocks serves its pool counters from a
    /// cache refreshed at most every 250 ms, so finer sampling repeats figures.)
    #[arg(long, default_value_t = 1000)]
    pub sample_interval_ms: u64,
    #[command(flatten)]
    pub record: RecordArgs,
}

struct Shared {
    /// Sessions begun (warm-up included), for --sessions.
    started: AtomicU64,
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
    /// (start in µs since the run began, latency in µs or 0 for a failure), with --session-log.
    log: Vec<(u64, u64)>,
}

pub async fn run(args: RunArgs) -> Result<RunRecord, String> {
    let route = args.route.route()?;
    let targets = Arc::new(crate::targets::parse_set(&args.target.join(","))?);
    let upstream_addrs = parse_stats_addrs(&args.upstream_stats)?;
    let schedule = args.phases.clone().map(|phases| Schedule::new(phases.0));
    let concurrency = schedule.as_ref().map_or(args.concurrency, Schedule::max_clients);
    let total_secs = schedule.as_ref().map_or(args.warmup + args.duration, |s| s.total_secs);
    if concurrency == 0 || total_secs <= args.warmup || args.warmup < 0.0 {
        return Err("concurrency and duration must be positive".into());
    }
    if args.rate.is_some_and(|rate| !(rate > 0.0 && rate.is_finite())) {
        return Err("--rate must be a positive number of sessions per second".into());
    }
    if args.sample_interval_ms == 0 {
        return Err("--sample-interval-ms must be positive".into());
    }
    let mut strace = match args.strace_pid {
        Some(pid) => Some(crate::strace::Strace::attach(pid).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        started: AtomicU64::new(0),
        sessions: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = t0 + Duration::from_secs_f64(total_secs);
    let timeout = Duration::from_secs_f64(args.session_timeout);
    let random = targets.len() > 1 && !args.in_turn && !args.pin_targets;
    if let Some(base) = args.source_base {
        if u32::from(base).checked_add(concurrency as u32).map(|last| last >> 24) != Some(127) {
            return Err(format!("--source-base {base} + {concurrency} clients leaves 127.0.0.0/8"));
        }
    }

    let schedule = schedule.map(Arc::new);
    let mut workers = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
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
            index,
            t0,
            schedule: schedule.clone(),
            session_limit: args.sessions,
            log: args.session_log,
            pace: args.rate.map(|rate| {
                let interval = concurrency as f64 / rate;
                Pace {
                    first: Duration::from_secs_f64(interval * index as f64 / concurrency as f64),
                    interval: Duration::from_secs_f64(interval),
                }
            }),
        };
        workers.push(tokio::spawn(worker.run()));
    }

    let label = args.record.label.clone();
    let progress = tokio::spawn(progress(label, shared.clone(), t0, end));
    let linger = Duration::from_secs_f64(args.linger.max(0.0));
    let several = args.sample_url.len() > 1;
    // Tells the samplers the load is over when the clients stop before `end` (--sessions).
    let (load_done, load_done_rx) = tokio::sync::watch::channel(false);
    let samplers: Vec<_> = args
        .sample_url
        .iter()
        .map(|url| {
            let every = Duration::from_millis(args.sample_interval_ms);
            let done = load_done_rx.clone();
            (url.clone(), tokio::spawn(sample(url.clone(), t0, every, end, linger, done)))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let before = upstream_counts(&upstream_addrs).await;
    let cpu_before = args.cpu_pid.and_then(crate::cpu::process_cpu);
    let measure_started = Instant::now();

    let mut session_hist = new_histogram();
    let mut request_hist = new_histogram();
    let mut errors = BTreeMap::new();
    let (mut sessions, mut requests) = (0, 0);
    let mut session_log = Vec::new();
    for worker in workers {
        let result = worker.await.map_err(|e| format!("worker failed: {e}"))?;
        session_hist.add(&result.session_hist).map_err(|e| e.to_string())?;
        request_hist.add(&result.request_hist).map_err(|e| e.to_string())?;
        for (kind, count) in result.errors {
            *errors.entry(kind).or_insert(0) += count;
        }
        sessions += result.sessions;
        requests += result.requests;
        session_log.extend(result.log);
    }
    let elapsed = measure_started.elapsed().as_secs_f64();
    let proxy_cpu = match (cpu_before, args.cpu_pid.and_then(crate::cpu::process_cpu)) {
        (Some(before), Some(after)) => Some(after.since(before)),
        _ => None,
    };
    let _ = load_done.send(true);
    let traced = match strace.take() {
        Some(strace) => Some(strace.finish().await?),
        None => None,
    };
    session_log.sort_unstable();
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
    let mode = if traced.is_some() {
        "syscalls"
    } else if schedule.is_some() {
        "step"
    } else {
        "run"
    };
    Ok(RunRecord {
        mode: mode.into(),
        label: args.record.label,
        scenario: args.record.scenario,
        round: args.record.round,
        route: args.route.describe(),
        concurrency,
        duration_secs: elapsed,
        requests_per_session: args.requests_per_session,
        destinations: targets.len(),
        sessions,
        requests,
        errors,
        rps: requests as f64 / elapsed,
        sessions_per_sec: sessions as f64 / elapsed,
        offered_rate: args.rate,
        session_latency: Latency::from_histogram(&session_hist),
        request_latency: Latency::from_histogram(&request_hist),
        upstream,
        stats_samples,
        stats_after,
        linger_secs: args.linger,
        warmup_secs: args.warmup,
        sample_interval_ms: args.sample_interval_ms,
        phases: args.phases.map(|phases| phases.0).unwrap_or_default(),
        session_log,
        traced_sessions: {
            let started = shared.started.load(Ordering::Relaxed);
            args.sessions.map_or(started, |limit| started.min(limit))
        },
        syscalls: traced.unwrap_or_default(),
        proxy_cpu,
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
    index: usize,
    t0: Instant,
    /// `--phases`: when this client runs.
    schedule: Option<Arc<Schedule>>,
    /// `--sessions`: sessions in all, over every client.
    session_limit: Option<u64>,
    /// `--session-log`.
    log: bool,
    /// `--rate`: this client's own timetable.
    pace: Option<Pace>,
}

/// When one client of `--rate` starts its sessions: at `first`, then every `interval`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    first: Duration,
    interval: Duration,
}

impl Worker {
    async fn run(mut self) -> WorkerResult {
        let mut result = WorkerResult {
            session_hist: new_histogram(),
            request_hist: new_histogram(),
            errors: BTreeMap::new(),
            sessions: 0,
            requests: 0,
            log: Vec::new(),
        };
        let mut buf = ReadBuf::default();
        let mut due = self.pace.map(|pace| self.t0 + pace.first);
        // Bounded: no session starts after `end`, and each is cut off at `timeout`.
        while Instant::now() < self.end {
            if let (Some(at), Some(pace)) = (due.as_mut(), self.pace) {
                if *at >= self.end {
                    break;
                }
                tokio::time::sleep_until((*at).into()).await;
                // Behind schedule (a slow session): start now, and never burst to catch up.
                *at = (*at + pace.interval).max(Instant::now());
            }
            if let Some(schedule) = &self.schedule {
                let now = self.t0.elapsed().as_secs_f64();
                match schedule.next_turn(self.index, now) {
                    Some(at) if at <= now => {}
                    Some(at) => {
                        let wake = (self.t0 + Duration::from_secs_f64(at)).min(self.end);
                        tokio::time::sleep_until(wake.into()).await;
                        continue;
                    }
                    None => break,
                }
            }
            if let Some(limit) = self.session_limit {
                if self.shared.started.fetch_add(1, Ordering::Relaxed) >= limit {
                    break;
                }
            } else {
                self.shared.started.fetch_add(1, Ordering::Relaxed);
            }
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
            if self.log {
                let latency = if outcome.is_ok() { micros(started.elapsed()) } else { 0 };
                result.log.push((micros(started - self.t0), latency));
            }
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

/// One step of `--phases`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Phase {
    pub clients: usize,
    pub secs: f64,
}

/// `--phases` as given (a newtype: clap would take a bare `Vec` for a repeatable option).
#[derive(Debug, Clone, PartialEq)]
pub struct Phases(pub Vec<Phase>);

fn parse_phases(text: &str) -> Result<Phases, String> {
    let phases = text
        .split(',')
        .map(|item| {
            let (clients, secs) = item
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("bad phase {item:?}: expected CLIENTS:SECONDS"))?;
            let clients: usize =
                clients.parse().map_err(|e| format!("bad client count in {item:?}: {e}"))?;
            let secs: f64 = secs.parse().map_err(|e| format!("bad seconds in {item:?}: {e}"))?;
            if !(secs > 0.0 && secs.is_finite()) || clients > 10_000 {
                return Err(format!("bad phase {item:?}: seconds > 0, at most 10,000 clients"));
            }
            Ok(Phase { clients, secs })
        })
        .collect::<Result<Vec<_>, String>>()?;
    if phases.iter().all(|p| p.clients == 0) {
        return Err("--phases: no phase has a client".into());
    }
    Ok(Phases(phases))
}

/// `--phases` as start times.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// (start in seconds since the run began, clients).
    starts: Vec<(f64, usize)>,
    pub total_secs: f64,
}

impl Schedule {
    pub fn new(phases: Vec<Phase>) -> Self {
        let mut at = 0.0;
        let starts = phases
            .iter()
            .map(|p| {
                let start = at;
                at += p.secs;
                (start, p.clients)
            })
            .collect();
        Schedule { starts, total_secs: at }
    }

    pub fn max_clients(&self) -> usize {
        self.starts.iter().map(|(_, c)| *c).max().unwrap_or(0)
    }

    /// When client `index` may start a session at or after `now`: `now` itself if its phase
    /// runs it, else the start of the next phase that does, or `None` if none does.
    pub fn next_turn(&self, index: usize, now: f64) -> Option<f64> {
        let current = self.starts.iter().rposition(|(start, _)| *start <= now).unwrap_or(0);
        if now < self.total_secs && self.starts[current].1 > index {
            return Some(now);
        }
        self.starts[current + 1..].iter().find(|(_, clients)| *clients > index).map(|(s, _)| *s)
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

/// Samples a JSON endpoint every `every` until `end` and then for `linger` more; failures are
/// skipped, not fatal. Each sample gets `t_ms`, when it was asked for, in ms since `t0`. The
/// load ends at `end` or when `load_done` says so; one sample is taken then and counted with
/// those under load. Returns (samples under load, samples after it).
async fn sample(
    url: String,
    t0: Instant,
    every: Duration,
    mut end: Instant,
    linger: Duration,
    mut load_done: tokio::sync::watch::Receiver<bool>,
) -> (Samples, Samples) {
    let (mut during, mut after) = (Vec::new(), Vec::new());
    let Some((addr, path)) = split_url(&url) else {
        eprintln!("--sample-url {url:?}: expected HOST:PORT/PATH on loopback; not sampling");
        return (during, after);
    };
    let mut tick = tokio::time::interval(every);
    // A slow answer delays the next sample rather than bunching the ones after it.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = end + linger;
    let mut ended_early = false;
    // The sample at the end of the load: the counters of the last partial interval.
    let mut final_taken = false;
    // Bounded by `stop`; the first tick fires at once, so even a short run gets a sample.
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = load_done.changed(), if !ended_early => {
                // The clients stopped (at `end`, or earlier with --sessions): sample now, then
                // linger from now.
                ended_early = true;
                if changed.is_err() || !*load_done.borrow() {
                    continue;
                }
                end = end.min(Instant::now());
                stop = end + linger;
            }
        }
        let now = Instant::now();
        let last = now >= end && !final_taken;
        if now >= stop && !last {
            break;
        }
        final_taken |= last;
        if let Ok(mut value) = fetch_json(addr, &path).await {
            if let Some(object) = value.as_object_mut() {
                let t_ms = now.saturating_duration_since(t0).as_secs_f64() * 1000.0;
                object.insert("t_ms".into(), serde_json::json!((t_ms * 10.0).round() / 10.0));
            }
            if now < end || last {
                during.push(value);
            } else {
                after.push(value);
            }
        }
        if now >= stop {
            break;
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
    if !record.syscalls.is_empty() {
        let total: u64 = record.syscalls.values().map(|c| c.calls).sum();
        println!(
            "  syscalls: {total} over {} sessions ({:.1} per session)",
            record.traced_sessions,
            total as f64 / record.traced_sessions.max(1) as f64
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_and_schedule_clients() {
        let phases = parse_phases("2:5,32:10,2:35").expect("phases").0;
        assert_eq!(phases[1], Phase { clients: 32, secs: 10.0 });
        assert!(parse_phases("2:0").is_err());
        assert!(parse_phases("0:1").is_err());
        let schedule = Schedule::new(phases);
        assert_eq!(schedule.max_clients(), 32);
        assert_eq!(schedule.total_secs, 50.0);
        // Client 0 always runs; client 5 only from 5 s to 15 s.
        assert_eq!(schedule.next_turn(0, 1.0), Some(1.0));
        assert_eq!(schedule.next_turn(5, 1.0), Some(5.0));
        assert_eq!(schedule.next_turn(5, 7.0), Some(7.0));
        assert_eq!(schedule.next_turn(5, 15.0), None);
        assert_eq!(schedule.next_turn(0, 50.0), None);
    }
}
