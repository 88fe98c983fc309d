//! `socksfloor`: the floor under any SOCKS5 proxy's latency on this machine (issue 18, goal 4:
//! "p99 <= 2x direct's"). It plays a proxy's part towards the client and nothing more: it
//! answers the greeting and the CONNECT at once, then answers the HTTP requests itself, as the
//! destination would. No upstream connection, no second hop, no wake-up of another process. A
//! real proxy does all this and connects and relays besides, so none measures below it here;
//! where the floor's tail is already more than 2x direct's, that target is out of any proxy's
//! reach on this machine. Only meaningful against a destination that answers at once (the
//! fast-local scenarios); early data behind the request is not supported (the load generator
//! sends none) and ends the session.
//!
//!   socksfloor --listen 127.0.0.1:14109 [--duration 3600]

use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use loadgen::baseline;

#[derive(Parser)]
#[command(about = "The floor under a SOCKS5 proxy's latency: handshake, then answers itself")]
struct Args {
    #[command(flatten)]
    common: baseline::Common,
}

#[tokio::main]
async fn main() {
    let args = Args::parse().common;
    let listener = baseline::listen_or_exit("socksfloor", args.listen);
    eprintln!("socksfloor: listening on {} for at most {:.0} s", args.listen, args.duration);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    tokio::spawn(session(client));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
    if let Err(e) = baseline::run_until_stopped(args.duration).await {
        eprintln!("socksfloor: {e}");
    }
}

async fn session(mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let handshake =
        tokio::time::timeout(baseline::HANDSHAKE_TIMEOUT, baseline::handshake(&mut client));
    let Ok(Ok((_, early))) = handshake.await else { return };
    if !early.is_empty() {
        return;
    }
    // BND: this socket's own address, as a proxy gives the one it connected from.
    let Ok(bound) = client.local_addr() else { return };
    if client.write_all(&baseline::success(bound)).await.is_err() {
        return;
    }
    loadgen::upstream::answer_requests(client).await;
}
