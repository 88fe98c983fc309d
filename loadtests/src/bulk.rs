//! `loadgen bulk`: one large download through the proxy (or direct), in MiB/s.

use std::time::Instant;

use crate::client::open;
use crate::http::{self, ReadBuf};
use crate::run::{RecordArgs, RouteArgs};
use crate::stats::RunRecord;

#[derive(Debug, Clone, clap::Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    /// The upstream to download from (its /bytes/N path).
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub target: std::net::SocketAddr,
    /// MiB to download.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Downloads at once, each of --mib.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    #[command(flatten)]
    pub record: RecordArgs,
}

pub async fn bulk(args: BulkArgs) -> Result<RunRecord, String> {
    let route = args.route.route()?;
    let bytes = args.mib << 20;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.streams.max(1) {
        let route = route.clone();
        let target = args.target;
        tasks.push(tokio::spawn(async move {
            let mut stream = open(&route, target).await.map_err(|e| e.to_string())?;
            http::write_get(&mut stream, &format!("/bytes/{bytes}"))
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = ReadBuf::default();
            http::read_response(&mut stream, &mut buf).await.map_err(|e| e.to_string())
        }));
    }
    let progress = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("[bulk] {:.0} s", started.elapsed().as_secs_f64());
        }
    });
    let mut total = 0;
    let mut errors = std::collections::BTreeMap::new();
    for task in tasks {
        match task.await {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => {
                eprintln!("bulk download failed: {e}");
                *errors.entry("download".to_string()).or_insert(0) += 1;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(RunRecord {
        mode: "bulk".into(),
        label: args.record.label,
        scenario: args.record.scenario,
        round: args.record.round,
        route: args.route.describe(),
        concurrency: args.streams,
        duration_secs: elapsed,
        destinations: 1,
        bytes: total,
        mib_per_sec: total as f64 / (1u64 << 20) as f64 / elapsed,
        errors,
        ..RunRecord::default()
    })
}
