//! Real parts of a fleet for tests: installed tools (HAProxy, promtool, systemd-analyze) found
//! on PATH, HAProxy run in the foreground with a generated config and its stats socket, and
//! small HTTP/SOCKS clients that pick their source address on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for an event of a real part (a health check turning, a process exit).
pub const FLEET_DEADLINE: Duration = Duration::from_secs(30);

/// Sessions that succeeded so far, counted by client loops and awaited by the test: a waiter
/// wakes on the increment that reaches its target instead of polling the count.
#[derive(Clone)]
pub struct SuccessCount(Arc<tokio::sync::watch::Sender<u64>>);

impl SuccessCount {
    pub fn new() -> SuccessCount {
        SuccessCount(Arc::new(tokio::sync::watch::Sender::new(0)))
    }

    pub fn add_one(&self) {
        self.0.send_modify(|count| *count += 1);
    }

    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until `more` sessions have succeeded beyond the count now, up to
    /// [`FLEET_DEADLINE`].
    pub async fn await_more(&self, more: u64) {
        let target = self.get() + more;
        let mut changes = self.0.subscribe();
        let reached = tokio::time::timeout(FLEET_DEADLINE, changes.wait_for(|n| *n >= target));
        assert!(
            matches!(reached.await, Ok(Ok(_))),
            "the client loop stalled at {} of {target}",
            self.get()
        );
    }
}

/// The path of `tool` on PATH. Missing: the test is skipped with a message, except under CI
/// (`CI` set), where `.ci/run` installs every tool and a missing one is a failure.
pub fn require_tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join(tool)).find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "{tool} is not installed; .ci/run installs it");
        eprintln!("SKIPPED: {tool} is not installed (apt-get install it, or let .ci/run)");
    }
    found
}

/// Whether this process may change sysctls and bind anything (root).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A free TCP port on 127.0.0.1 (bound, then released) for a process that needs a fixed one.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A backend server line: a poolsocks instance's SOCKS and stats addresses.
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    pub socks: SocketAddr,
    pub stats: SocketAddr,
}

/// HAProxy in TCP mode in front of `backends`, sending PROXY v2 from 127.0.0.5 and checking
/// each instance's `/health` on its stats port every 100 ms (one failure takes it out, one
/// success brings it back). Connections that cannot reach a server are redispatched.
pub fn haproxy_config(
    dir: &Path,
    frontend: SocketAddr,
    balance: &str,
    backends: &[Backend],
) -> String {
    let mut config = format!(
        "global
    stats socket {sock} mode 600 level admin
    maxconn 4096
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    # One line per session when it ends: which server served which client address.
    log-format \"session %ci:%cp %b/%s %ts\"
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch 1

frontend socks
    bind {frontend}
    default_backend poolsocks

backend poolsocks
    balance {balance}
    option httpchk GET /health
    http-check expect status 200
",
        sock = dir.join("admin.sock").display(),
    );
    for (i, b) in backends.iter().enumerate() {
        config.push_str(&format!(
            "    server s{i} {socks} send-proxy-v2 source 127.0.0.5 check port {port} addr {ip} inter 100ms fall 1 rise 1\n",
            socks = b.socks,
            port = b.stats.port(),
            ip = b.stats.ip(),
        ));
    }
    config
}

/// A HAProxy process owned by the test (`-db`: foreground), killed on drop.
pub struct Haproxy {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub frontend: SocketAddr,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy on a generated config; returns once its stats socket answers.
    pub fn start(binary: &Path, balance: &str, backends: &[Backend]) -> Haproxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let frontend: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = haproxy_config(dir.path(), frontend, balance, backends);
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &config).expect("write haproxy.cfg");
        let check =
            Command::new(binary).arg("-c").arg("-f").arg(&path).output().expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy -c refused the generated config:\n{config}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !line.starts_with("session ") {
                    eprintln!("[haproxy] {line}");
                }
                sink.lock().expect("log").push(line);
            }
        });
        let haproxy =
            Haproxy { child, log, frontend, socket: dir.path().join("admin.sock"), _dir: dir };
        let deadline = Instant::now() + FLEET_DEADLINE;
        while haproxy.try_command("show info").is_err() {
            assert!(Instant::now() < deadline, "haproxy's stats socket never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    fn try_command(&self, command: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// `show stat`: each server of the backend with its status (`UP`, `DOWN`, ...) and the
    /// sessions it was given in all (`stot`).
    pub fn servers(&self) -> Vec<ServerStat> {
        let csv = self.try_command("show stat").expect("show stat");
        let mut lines = csv.lines();
        let header: Vec<&str> =
            lines.next().expect("csv header").trim_start_matches("# ").split(',').collect();
        let column = |name: &str| header.iter().position(|h| *h == name).expect("column");
        let (px, sv, status, stot) =
            (column("pxname"), column("svname"), column("status"), column("stot"));
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > stot && f[px] == "poolsocks" && f[sv].starts_with('s'))
            .map(|f| ServerStat {
                name: f[sv].to_string(),
                status: f[status].to_string(),
                sessions_total: f[stot].parse().unwrap_or(0),
            })
            .collect()
    }

    /// Waits until server `index` reports a status that starts with `status` (`UP`, `DOWN`);
    /// HAProxy's health check is what changes it.
    pub fn await_status(&self, index: usize, status: &str) {
        let name = format!("s{index}");
        let deadline = Instant::now() + FLEET_DEADLINE;
        loop {
            let servers = self.servers();
            if servers.iter().any(|s| s.name == name && s.status.starts_with(status)) {
                return;
            }
            assert!(Instant::now() < deadline, "server {name} never became {status}: {servers:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for HAProxy's log line of the session from `client` (written when it ends) and
    /// returns the index of the server that served it (`None`: it reached no server).
    pub fn await_server_of(&self, client: SocketAddr) -> Option<usize> {
        let needle = format!("session {client} poolsocks/");
        let deadline = Instant::now() + FLEET_DEADLINE;
        loop {
            let found = self.log.lock().expect("log").iter().find_map(|line| {
                let rest = line.strip_prefix(&needle)?;
                let server = rest.split_whitespace().next()?;
                Some(server.strip_prefix('s').and_then(|n| n.parse().ok()))
            });
            if let Some(server) = found {
                return server;
            }
            assert!(Instant::now() < deadline, "HAProxy never logged the session of {client}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn await_all_up(&self, count: usize) {
        for index in 0..count {
            self.await_status(index, "UP");
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub struct ServerStat {
    pub name: String,
    pub status: String,
    pub sessions_total: u64,
}

/// A TCP connection to `addr` from `source` (any 127.0.0.x is loopback on Linux).
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// `GET path` over HTTP/1.0; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await?;
    let text = String::from_utf8_lossy(&all).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The JSON of `/api/pool/stats`.
pub async fn pool_stats(stats: SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(stats, "/api/pool/stats").await.expect("GET /api/pool/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stats JSON")
}
