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
    /// Address to listen on (loopback only).
    #[arg(long, value_parser = loadgen::targets::parse_addr)]
    listen: SocketAddr,
    /// Spares kept per destination.
    #[arg(long, default_value_t = 64)]
    spares: usize,
    /// Cap on spares held plus being dialed over all destinations (0: none).
    #[arg(long, default_value_t = 0)]
    max_total: usize,
    /// Answer any HTTP GET here with the counters as JSON (`total_idle`, `pool_hits`, ...).
    #[arg(long, value_parser = loadgen::targets::parse_addr)]
    stats: Option<SocketAddr>,
    /// Exit after this many seconds (everything the harness starts stops by itself).
    #[arg(long, default_value_t = 3600.0)]
    duration: f64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // 10,000 held sessions need 20,000 descriptors, plus the spares.
    if let Err(e) = loadgen::limits::raise_nofile(65_536) {
        eprintln!("fixedpool: could not raise RLIMIT_NOFILE: {e}");
    }
    let pool = FixedPool::new(args.spares, args.max_total);
    let bind = |addr: SocketAddr| match baseline::listen(addr) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fixedpool: listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    if let Some(stats) = args.stats {
        tokio::spawn(serve_stats(bind(stats), pool.clone()));
    }
    let listener = bind(args.listen);
    eprintln!(
        "fixedpool: listening on {}, {} spares per destination, cap {} in all, for at most {:.0} s",
        args.listen,
        args.spares,
        if args.max_total == 0 { "none".to_string() } else { args.max_total.to_string() },
        args.duration
    );
    tokio::spawn(baseline::serve(listener, Arc::new(PoolConnector(pool))));
    if let Err(e) = baseline::run_until_stopped(args.duration).await {
        eprintln!("fixedpool: {e}");
    }
}
