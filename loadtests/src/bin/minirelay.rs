//! `minirelay`: the "minimal tokio relay" baseline of issue 18 (the fast path): accept, parse
//! the SOCKS5 greeting and CONNECT, dial, reply, `tokio::io::copy_bidirectional`. No pool, no
//! limits, no logging; the multi-threaded runtime with one worker per core, as poolsocks runs.
//!
//!   minirelay --listen 127.0.0.1:14107 [--duration 3600]

use std::sync::Arc;

use clap::Parser;

use loadgen::baseline::{self, Dialer};

#[derive(Parser)]
#[command(about = "Minimal tokio SOCKS5 relay (baseline): CONNECT, copy_bidirectional")]
struct Args {
    #[command(flatten)]
    common: baseline::Common,
}

#[tokio::main]
async fn main() {
    let args = Args::parse().common;
    // 10,000 held sessions need 20,000 descriptors.
    if let Err(e) = loadgen::limits::raise_nofile(65_536) {
        eprintln!("minirelay: could not raise RLIMIT_NOFILE: {e}");
    }
    let listener = baseline::listen_or_exit("minirelay", args.listen);
    eprintln!("minirelay: listening on {} for at most {:.0} s", args.listen, args.duration);
    tokio::spawn(baseline::serve(listener, Arc::new(Dialer)));
    if let Err(e) = baseline::run_until_stopped(args.duration).await {
        eprintln!("minirelay: {e}");
    }
}
