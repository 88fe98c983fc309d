//! `loadgen hold`: open N SOCKS sessions, keep them idle, and report how many were served and
//! what they cost the proxy in memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::client::open;
use crate::http::{self, ReadBuf};
use crate::limits;
use crate::run::{RecordArgs, RouteArgs};
use crate::stats::RunRecord;

#[derive(Debug, Clone, clap::Args)]
pub struct HoldArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub target: std::net::SocketAddr,
    /// Sessions to hold open at once.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Seconds to keep them all idle once opened.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Sessions being opened at once (the rest wait), so the proxy's backlog is not flooded.
    #[arg(long, default_value_t = 256)]
    pub open_parallelism: usize,
    /// The proxy's process id, to read its RSS before and while holding.
    #[arg(long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub record: RecordArgs,
}

pub async fn hold(args: HoldArgs) -> Result<RunRecord, String> {
    let route = args.route.route()?;
    // Each session is one descriptor here; leave room for the runtime's own.
    let limit = limits::raise_nofile(args.sessions as u64 + 256)?;
    eprintln!("hold: RLIMIT_NOFILE is now {limit}");
    let rss_before = args.pid.and_then(limits::tree_rss_kib).unwrap_or(0);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.open_parallelism.max(1)));
    let mut tasks = Vec::with_capacity(args.sessions);
    for _ in 0..args.sessions {
        let route = route.clone();
        let gate = gate.clone();
        let target = args.target;
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
            let open = async {
                let mut stream = open(&route, target).await.map_err(|e| e.kind())?;
                // One request proves the session really reaches the destination.
                let mut buf = ReadBuf::default();
                http::write_get(&mut stream, "/").await.map_err(|_| "http_write".to_string())?;
                http::read_response(&mut stream, &mut buf)
                    .await
                    .map_err(|e| e.kind().to_string())?;
                Ok::<TcpStream, String>(stream)
            };
            tokio::time::timeout(Duration::from_secs(30), open)
                .await
                .map_err(|_| "timeout".to_string())?
        }));
    }
    let mut streams = Vec::with_capacity(args.sessions);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_report = Instant::now();
    for task in tasks {
        match task.await {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(kind)) => *errors.entry(kind).or_insert(0) += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_insert(0) += 1,
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("[hold] {} sessions open", streams.len());
            last_report = Instant::now();
        }
    }
    let opened_in = started.elapsed().as_secs_f64();
    eprintln!(
        "[hold] {} of {} sessions open after {opened_in:.1} s; holding {:.0} s",
        streams.len(),
        args.sessions,
        args.hold
    );
    // Let the proxy settle (buffers, allocator) before reading its memory.
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let rss_held = args.pid.and_then(limits::tree_rss_kib).unwrap_or(0);
    // A session still alive answers a request after the idle period.
    let mut alive = 0u64;
    let mut buf = ReadBuf::default();
    for stream in &mut streams {
        let check = async {
            http::write_get(stream, "/").await.ok()?;
            http::read_response(stream, &mut buf).await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(Some(_)) => alive += 1,
            _ => buf = ReadBuf::default(),
        }
    }
    let held = streams.len() as u64;
    drop(streams);
    let kib_per_session = if held > 0 && rss_held > 0 {
        rss_held.saturating_sub(rss_before) as f64 / held as f64
    } else {
        0.0
    };
    Ok(RunRecord {
        mode: "hold".into(),
        label: args.record.label,
        scenario: args.record.scenario,
        round: args.record.round,
        route: args.route.describe(),
        concurrency: args.sessions,
        duration_secs: started.elapsed().as_secs_f64(),
        destinations: 1,
        attempted: args.sessions as u64,
        held,
        still_alive: alive,
        rss_before_kib: rss_before,
        rss_held_kib: rss_held,
        kib_per_session,
        errors,
        ..RunRecord::default()
    })
}
