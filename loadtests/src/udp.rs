//! UDP load: `loadgen udp` (closed-loop datagram round trips, direct or through a SOCKS5 UDP
//! association), `loadgen udp-hold` (N idle associations: the proxy's memory per association)
//! and `loadgen udp-echo` (the echo server they talk to).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use poolsocks::socks::{
    Command, Greeting, MethodSelection, Reply, ReplyCode, Request, TargetAddr, UdpDatagram,
    METHOD_NO_AUTH,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::limits;
use crate::run::{micros, RecordArgs, RouteArgs};
use crate::stats::{new_histogram, Latency, RunRecord};

#[derive(Debug, Clone, clap::Args)]
pub struct UdpArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    /// The UDP echo server (loopback or 198.18.0.0/15).
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub target: SocketAddr,
    /// Clients at once, each with its own association (or socket, direct), each sending its
    /// next datagram when the last one's echo came back.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, short = 'd', default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Payload bytes per datagram (without the SOCKS header).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// A datagram whose echo has not come back after this long counts as lost.
    #[arg(long, default_value_t = 1.0)]
    pub loss_timeout: f64,
    #[command(flatten)]
    pub record: RecordArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UdpHoldArgs {
    #[command(flatten)]
    pub route: RouteArgs,
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub target: SocketAddr,
    /// Associations to hold open at once.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Seconds to keep them idle once opened.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// The proxy's process id, to read its memory before and while holding.
    #[arg(long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub record: RecordArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UdpEchoArgs {
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub listen: SocketAddr,
    /// Seconds to run, then exit (a forgotten server does not linger).
    #[arg(long, default_value_t = 3600.0)]
    pub duration: f64,
}

/// Echoes every datagram to its sender until `duration` is over.
pub async fn echo(args: UdpEchoArgs) -> Result<(), String> {
    let socket =
        UdpSocket::bind(args.listen).await.map_err(|e| format!("bind {}: {e}", args.listen))?;
    set_buffers(&socket);
    eprintln!("udp-echo listening on {}", args.listen);
    let serve = async {
        let mut buf = vec![0u8; 65_536];
        loop {
            match socket.recv_from(&mut buf).await {
                Ok((len, from)) => {
                    let _ = socket.try_send_to(&buf[..len], from);
                }
                Err(e) => eprintln!("udp-echo: {e}"),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs_f64(args.duration), serve).await;
    Ok(())
}

/// 1 MiB each way, so a burst of 16 clients' datagrams is not lost in a kernel buffer.
fn set_buffers(socket: &UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(1 << 20);
    let _ = sock.set_send_buffer_size(1 << 20);
}

/// A client's way to the echo server.
struct Path {
    socket: UdpSocket,
    /// Where datagrams go: the echo itself, or the association's relay.
    send_to: SocketAddr,
    /// The SOCKS header prefixed to every datagram (empty when direct).
    header: Vec<u8>,
    /// Kept open for the association's lifetime.
    _control: Option<TcpStream>,
}

async fn open_path(args_route: &RouteArgs, target: SocketAddr) -> Result<Path, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.map_err(|e| format!("udp_bind: {e}"))?;
    set_buffers(&socket);
    match args_route.proxy {
        None => Ok(Path { socket, send_to: target, header: Vec::new(), _control: None }),
        Some(proxy) => {
            let mut control =
                TcpStream::connect(proxy).await.map_err(|_| "connect_proxy".to_string())?;
            let _ = control.set_nodelay(true);
            let mut out = Vec::new();
            Greeting { methods: vec![METHOD_NO_AUTH] }.write_to(&mut out);
            control.write_all(&out).await.map_err(|_| "socks_greeting".to_string())?;
            let selection = MethodSelection::read_from(&mut control)
                .await
                .map_err(|_| "socks_greeting".to_string())?;
            if selection.method != METHOD_NO_AUTH {
                return Err("socks_no_method".into());
            }
            out.clear();
            let local = socket.local_addr().map_err(|e| e.to_string())?;
            Request { command: Command::UdpAssociate, target: TargetAddr::Ip(local) }
                .write_to(&mut out);
            control.write_all(&out).await.map_err(|_| "socks_request".to_string())?;
            let reply =
                Reply::read_from(&mut control).await.map_err(|_| "socks_reply_io".to_string())?;
            if reply.code != ReplyCode::Succeeded {
                return Err(format!("socks_reply_{:?}", reply.code));
            }
            let TargetAddr::Ip(mut relay) = reply.bound else {
                return Err("socks_reply_names_a_domain".into());
            };
            if relay.ip().is_unspecified() {
                relay.set_ip(proxy.ip());
            }
            let mut header = Vec::new();
            UdpDatagram { frag: 0, target: TargetAddr::Ip(target), payload: &[] }
                .write_to(&mut header);
            Ok(Path { socket, send_to: relay, header, _control: Some(control) })
        }
    }
}

struct Tally {
    done: AtomicU64,
}

pub async fn udp(args: UdpArgs) -> Result<RunRecord, String> {
    if args.concurrency == 0 || args.duration <= 0.0 || args.payload < 8 || args.payload > 65_000 {
        return Err("concurrency, duration must be positive; payload 8..=65000 bytes".into());
    }
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let tally = Arc::new(Tally { done: AtomicU64::new(0) });
    let mut clients = Vec::with_capacity(args.concurrency);
    for index in 0..args.concurrency {
        let path = open_path(&args.route, args.target).await?;
        let tally = tally.clone();
        let (payload, loss) = (args.payload, Duration::from_secs_f64(args.loss_timeout));
        clients.push(tokio::spawn(client(
            path,
            index as u32,
            payload,
            loss,
            measure_from,
            end,
            tally,
        )));
    }
    let label = args.record.label.clone();
    let progress = tokio::spawn(async move {
        let mut last = 0;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = tally.done.load(Ordering::Relaxed);
            eprintln!("[{label}] {} round trips/s", now - last);
            last = now;
        }
    });
    let mut hist = new_histogram();
    let mut errors = BTreeMap::new();
    let mut round_trips = 0;
    for client in clients {
        let result = client.await.map_err(|e| format!("client failed: {e}"))?;
        hist.add(&result.hist).map_err(|e| e.to_string())?;
        round_trips += result.round_trips;
        for (kind, count) in result.errors {
            *errors.entry(kind).or_insert(0) += count;
        }
    }
    progress.abort();
    let elapsed = end.duration_since(measure_from).as_secs_f64();
    Ok(RunRecord {
        mode: "udp".into(),
        label: args.record.label,
        scenario: args.record.scenario,
        round: args.record.round,
        route: args.route.describe(),
        concurrency: args.concurrency,
        duration_secs: elapsed,
        requests_per_session: 1,
        payload_bytes: args.payload,
        destinations: 1,
        requests: round_trips,
        sessions: round_trips,
        errors,
        rps: round_trips as f64 / elapsed,
        session_latency: Latency::from_histogram(&hist),
        request_latency: Latency::from_histogram(&hist),
        ..RunRecord::default()
    })
}

struct ClientResult {
    hist: Histogram<u64>,
    round_trips: u64,
    errors: BTreeMap<String, u64>,
}

/// Sends a datagram, waits for its echo (matched by sequence number), repeats until `end`.
async fn client(
    path: Path,
    id: u32,
    payload: usize,
    loss: Duration,
    measure_from: Instant,
    end: Instant,
    tally: Arc<Tally>,
) -> ClientResult {
    let mut result =
        ClientResult { hist: new_histogram(), round_trips: 0, errors: BTreeMap::new() };
    let header = path.header.len();
    let mut out = path.header.clone();
    out.resize(header + payload, 0xa5);
    out[header..header + 4].copy_from_slice(&id.to_be_bytes());
    let mut buf = vec![0u8; 65_536];
    let mut seq: u32 = 0;
    while Instant::now() < end {
        seq = seq.wrapping_add(1);
        out[header + 4..header + 8].copy_from_slice(&seq.to_be_bytes());
        let started = Instant::now();
        if let Err(e) = path.socket.send_to(&out, path.send_to).await {
            *result.errors.entry(format!("send_{:?}", e.kind())).or_insert(0) += 1;
            continue;
        }
        let deadline = started + loss;
        let answered = loop {
            match tokio::time::timeout_at(deadline.into(), path.socket.recv_from(&mut buf)).await {
                Err(_) => break false,
                Ok(Err(e)) => {
                    *result.errors.entry(format!("recv_{:?}", e.kind())).or_insert(0) += 1;
                    break false;
                }
                // An echo of an earlier (late) datagram is skipped; ours carries this seq.
                Ok(Ok((len, _))) => {
                    if len == out.len()
                        && buf[header + 4..header + 8] == out[header + 4..header + 8]
                    {
                        break true;
                    }
                }
            }
        };
        if started < measure_from {
            continue;
        }
        if answered {
            let _ = result.hist.record(micros(started.elapsed()).max(1));
            result.round_trips += 1;
            tally.done.fetch_add(1, Ordering::Relaxed);
        } else {
            *result.errors.entry("lost".into()).or_insert(0) += 1;
        }
    }
    result
}

/// Opens N associations (each proves itself with one round trip), holds them idle, checks they
/// still answer, and reports the proxy's memory per association.
pub async fn hold(args: UdpHoldArgs) -> Result<RunRecord, String> {
    if args.route.proxy.is_none() {
        return Err("udp-hold measures a proxy: give --proxy".into());
    }
    limits::raise_nofile(2 * args.sessions as u64 + 256)?;
    let rss_before = args.pid.and_then(limits::tree_rss_kib).unwrap_or(0);
    let started = Instant::now();
    let mut paths = Vec::with_capacity(args.sessions);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut buf = vec![0u8; 2048];
    for _ in 0..args.sessions {
        match open_path(&args.route, args.target).await {
            Ok(path) => {
                if round_trip(&path, &mut buf).await {
                    paths.push(path);
                } else {
                    *errors.entry("lost".into()).or_insert(0) += 1;
                }
            }
            Err(kind) => *errors.entry(kind).or_insert(0) += 1,
        }
    }
    eprintln!(
        "[udp-hold] {} of {} associations open; holding {:.0} s",
        paths.len(),
        args.sessions,
        args.hold
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let rss_held = args.pid.and_then(limits::tree_rss_kib).unwrap_or(0);
    let mut alive = 0;
    for path in &paths {
        if round_trip(path, &mut buf).await {
            alive += 1;
        }
    }
    let held = paths.len() as u64;
    drop(paths);
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
        kib_per_session: if held > 0 && rss_held > 0 {
            rss_held.saturating_sub(rss_before) as f64 / held as f64
        } else {
            0.0
        },
        errors,
        ..RunRecord::default()
    })
}

async fn round_trip(path: &Path, buf: &mut [u8]) -> bool {
    let mut out = path.header.clone();
    out.extend_from_slice(b"hold-check");
    if path.socket.send_to(&out, path.send_to).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(2), path.socket.recv_from(buf)).await,
        Ok(Ok((len, _))) if len == out.len()
    )
}
