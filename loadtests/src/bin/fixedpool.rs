//! `fixedpool`: the minimal fixed-stock pool baseline of issue 18 ("the least a pool can be"):
//! the `minirelay` SOCKS5 server plus a `Mutex<HashMap<dest, Vec<TcpStream>>>` of N spares per
//! destination, filled at first sight and refilled one dial per spare handed out. See
//! `loadgen::fixedpool` for the exact policy.
//!
//!   fixedpool --listen 127.0.0.1:14108 --stats 127.0.0.1:14118 [--spares 64] [--max-total 0]

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

use loadgen::baseline;
use loadgen::fixedpool::{serve_stats, FixedPool, PoolConnector};

#[derive(Parser)]
#[command(about = "Minimal tokio SOCKS5 proxy with a fixed stock of spares per destination")]
struct Args {
    #[command(flatten)]
    common: baseline::Common,
    /// Spares kept per destination.
    #[arg(long, default_value_t = 64)]
    spares: usize,
    /// Cap on spares held plus being dialed over all destinations (0: none).
    #[arg(long, default_value_t = 0)]
    max_total: usize,
    /// Answer any HTTP GET here with the counters as JSON (`total_idle`, `pool_hits`, ...).
    #[arg(long, value_parser = loadgen::targets::parse_addr)]
    stats: Option<SocketAddr>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // 10,000 held sessions need 20,000 descriptors, plus the spares.
    if let Err(e) = loadgen::limits::raise_nofile(65_536) {
        eprintln!("fixedpool: could not raise RLIMIT_NOFILE: {e}");
    }
    let pool = FixedPool::new(args.spares, args.max_total);
    if let Some(stats) = args.stats {
        tokio::spawn(serve_stats(baseline::listen_or_exit("fixedpool", stats), pool.clone()));
    }
    let listener = baseline::listen_or_exit("fixedpool", args.common.listen);
    eprintln!(
        "fixedpool: listening on {}, {} spares per destination, cap {} in all, for at most {:.0} s",
        args.common.listen,
        args.spares,
        if args.max_total == 0 { "none".to_string() } else { args.max_total.to_string() },
        args.common.duration
    );
    tokio::spawn(baseline::serve(listener, Arc::new(PoolConnector(pool))));
    if let Err(e) = baseline::run_until_stopped(args.common.duration).await {
        eprintln!("fixedpool: {e}");
    }
}
