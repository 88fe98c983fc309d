//! `loadgen upstream`: a keep-alive HTTP/1.1 server that counts what it accepts, so reports can
//! show connection reuse from the server's side rather than from the proxy's own counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::http::{self, ReadBuf};
use crate::stats::UpstreamCounts;

const SMALL_BODY: &[u8] = b"hello, world\n";
/// Largest /bytes/N served: bulk runs use 4 GiB; this only stops a typo from running forever.
const MAX_BULK: u64 = 1 << 40;

#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Addresses to listen on: IP:PORT or IP:FIRST-LAST, repeatable or comma-separated.
    #[arg(long, required = true)]
    pub listen: Vec<String>,
    /// Exit after this many seconds (everything the harness starts stops by itself).
    #[arg(long, default_value_t = 3600.0)]
    pub duration: f64,
    /// Write the counters as JSON here once a second and on exit.
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    used: AtomicU64,
    requests: AtomicU64,
    open: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> UpstreamCounts {
        UpstreamCounts {
            connections: self.connections.load(Ordering::Relaxed),
            used: self.used.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
        }
    }
}

pub async fn serve(args: UpstreamArgs) -> Result<(), String> {
    let addrs = crate::targets::parse_set(&args.listen.join(","))?;
    // The idle-sessions scenario makes the proxy open 10,000 connections to us.
    if let Err(e) = crate::limits::raise_nofile(65_536) {
        eprintln!("upstream: could not raise RLIMIT_NOFILE ({e}); many connections may fail");
    }
    let counters = Arc::new(Counters::default());
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        listeners.push(listen(*addr).map_err(|e| format!("listen on {addr}: {e}"))?);
    }
    eprintln!(
        "upstream: listening on {} address(es) from {} for at most {:.0} s",
        addrs.len(),
        addrs[0],
        args.duration
    );
    for listener in listeners {
        tokio::spawn(accept_loop(listener, counters.clone()));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(path) = &args.stats_file {
                    write_stats(path, counters.snapshot());
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let counts = counters.snapshot();
    if let Some(path) = &args.stats_file {
        write_stats(path, counts);
    }
    eprintln!(
        "upstream: {} connections accepted, {} used, {} requests",
        counts.connections, counts.used, counts.requests
    );
    Ok(())
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog: the hold scenario opens thousands of connections in a burst.
    socket.listen(4096)
}

fn write_stats(path: &PathBuf, counts: UpstreamCounts) {
    let tmp = path.with_extension("tmp");
    let Ok(text) = serde_json::to_string(&counts) else {
        return;
    };
    // Write then rename, so a reader never sees half a file.
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

async fn accept_loop(listener: TcpListener, counters: Arc<Counters>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                counters.connections.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                let counters = counters.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let harness = serve_connection(stream, &counters).await;
                    // The harness's own stats reads are not traffic: they were taken back already.
                    if !harness {
                        counters.open.fetch_sub(1, Ordering::Relaxed);
                    }
                });
            }
            // Out of descriptors or similar: wait a little instead of spinning on the error.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Answers HTTP requests on `stream` as this upstream does, until the peer closes (for
/// `socksfloor`, which answers in the destination's place).
pub async fn answer_requests(stream: TcpStream) {
    serve_connection(stream, &Counters::default()).await;
}

/// Serves requests until the peer closes; returns true if this was a harness stats connection.
async fn serve_connection(mut stream: TcpStream, counters: &Counters) -> bool {
    let mut buf = ReadBuf::default();
    let mut first = true;
    loop {
        let path = match http::read_request_path(&mut stream, &mut buf).await {
            Ok(Some(path)) => path,
            Ok(None) | Err(_) => return false,
        };
        if first && path == "/__stats" {
            counters.connections.fetch_sub(1, Ordering::Relaxed);
            counters.open.fetch_sub(1, Ordering::Relaxed);
            let body = serde_json::to_string(&counters.snapshot()).unwrap_or_default();
            let _ = respond(&mut stream, 200, body.as_bytes()).await;
            return true;
        }
        if first {
            counters.used.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = if let Some(n) = path.strip_prefix("/bytes/") {
            match n.parse::<u64>() {
                Ok(n) if n <= MAX_BULK => send_zeros(&mut stream, n).await,
                _ => respond(&mut stream, 400, b"bad size\n").await,
            }
        } else if path == "/" {
            respond(&mut stream, 200, SMALL_BODY).await
        } else {
            respond(&mut stream, 404, b"").await
        };
        if result.is_err() {
            return false;
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    // One write for head and body: one segment per response on the wire.
    stream.write_all(&out).await
}

async fn send_zeros(stream: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let chunk = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let len = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..len]).await?;
        left -= len as u64;
    }
    Ok(())
}

/// GETs a JSON document from a loopback HTTP endpoint (our upstream's /__stats or a proxy's
/// stats API). Handles Content-Length, chunked and read-to-EOF bodies; bounded in size and time.
pub async fn fetch_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut data = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&chunk[..n]);
            if data.len() > 16 << 20 {
                return Err("stats document over 16 MiB".to_string());
            }
            if let Some(body) = complete_body(&data) {
                return Ok(body);
            }
        }
        let head_end = find(&data, b"\r\n\r\n").ok_or("no HTTP header")? + 4;
        let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
        let body = &data[head_end..];
        if head.contains("transfer-encoding: chunked") {
            dechunk(body).ok_or_else(|| "bad chunked body".to_string())
        } else {
            Ok(body.to_vec())
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "timed out".to_string())??;
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

/// The body, once a response with Content-Length has fully arrived.
fn complete_body(data: &[u8]) -> Option<Vec<u8>> {
    let head_end = find(data, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
    let body = data.get(head_end..head_end + len)?;
    Some(body.to_vec())
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        let start = line_end + 2;
        out.extend_from_slice(body.get(start..start + size)?);
        body = body.get(start + size + 2..)?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
        assert_eq!(dechunk(b"ff\r\nab"), None);
    }

    #[tokio::test]
    async fn counts_connections_and_requests_but_not_its_own_stats_reads() {
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        tokio::spawn(accept_loop(listener, counters.clone()));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut buf = ReadBuf::default();
        for _ in 0..3 {
            http::write_get(&mut stream, "/").await.expect("write");
            http::read_response(&mut stream, &mut buf).await.expect("read");
        }
        http::write_get(&mut stream, "/bytes/1000000").await.expect("write");
        let n = http::read_response(&mut stream, &mut buf).await.expect("bulk");
        assert_eq!(n, 1_000_000);
        let stats = fetch_json(addr, "/__stats").await.expect("stats");
        let counts: UpstreamCounts = serde_json::from_value(stats).expect("counts");
        assert_eq!(counts.connections, 1);
        assert_eq!(counts.used, 1);
        assert_eq!(counts.requests, 4);
        assert_eq!(counts.open, 1);
    }
}
