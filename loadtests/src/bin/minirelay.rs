//! `minirelay`: the "minimal tokio relay" baseline of issue 18 (the fast path): accept, parse
//! the SOCKS5 greeting and CONNECT, dial, reply, `tokio::io::copy_bidirectional`. No pool, no
//! limits, no logging; the multi-threaded runtime with one worker per core, as poolsocks runs.
//!
//!   minirelay --listen 127.0.0.1:14107 [--duration 3600]

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

use loadgen::baseline::{self, Dialer};

#[derive(Parser)]
#[command(about = "Minimal tokio SOCKS5 relay (baseline): CONNECT, copy_bidirectional")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, value_parser = loadgen::targets::parse_addr)]
    listen: SocketAddr,
    /// Exit after this many seconds (everything the harness starts stops by itself).
    #[arg(long, default_value_t = 3600.0)]
    duration: f64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // 10,000 held sessions need 20,000 descriptors.
    if let Err(e) = loadgen::limits::raise_nofile(65_536) {
        eprintln!("minirelay: could not raise RLIMIT_NOFILE: {e}");
    }
    let listener = match baseline::listen(args.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("minirelay: listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    eprintln!("minirelay: listening on {} for at most {:.0} s", args.listen, args.duration);
    tokio::spawn(baseline::serve(listener, Arc::new(Dialer)));
    if let Err(e) = baseline::run_until_stopped(args.duration).await {
        eprintln!("minirelay: {e}");
    }
}
