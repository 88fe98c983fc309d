//! Three poolsocks daemons behind a real HAProxy (`mode tcp`, `send-proxy-v2` from 127.0.0.5,
//! `option httpchk GET /health` on each instance's stats port), all started by the test on
//! loopback with generated configs. HAProxy's stats socket and the daemons' own log lines say
//! when something happened; nothing waits on a clock to line events up.
//!
//! Skipped (with a message) where HAProxy is not installed, except under CI.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::fleet::{self, Backend, Haproxy, SuccessCount, FLEET_DEADLINE};
use common::{authenticate, greet, request, round_trip, EchoServer};
use poolsocks::socks::{Command, ReplyCode, METHOD_NO_AUTH, METHOD_USERPASS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A poolsocks instance behind the balancer, with every log line it wrote so far.
struct Instance {
    daemon: Daemon,
    stats: SocketAddr,
    log: Vec<String>,
}

impl Instance {
    fn start(extra: &str) -> Instance {
        let config = format!(
            "[server]
bind_port = 0
proxy_protocol = true
proxy_protocol_trusted = [\"127.0.0.5/32\"]
handshake_timeout_ms = 5000
shutdown_grace_secs = 30
{extra}
[sessions]
stats_api_enabled = true
stats_api_port = 0

[logging]
level = \"poolsocks=debug,info\"
"
        );
        let mut daemon = Daemon::start(&config);
        let stats = daemon.await_stats_addr();
        Instance { daemon, stats, log: Vec::new() }
    }

    fn backend(&self) -> Backend {
        Backend { socks: self.daemon.addr, stats: self.stats }
    }

    /// Takes the lines logged since the last call.
    fn refresh(&mut self) {
        let lines = self.daemon.log_so_far();
        self.log.extend(lines);
    }

    /// Lines that mention the client at `source`, as `peer=` in the session span.
    fn lines_for(&self, source: SocketAddr) -> impl Iterator<Item = &String> {
        self.log.iter().filter(move |line| has_peer(line, source))
    }
}

/// True when `line`'s span names `peer` exactly (not a longer port with the same prefix).
fn has_peer(line: &str, peer: SocketAddr) -> bool {
    let needle = format!("peer={peer}");
    line.match_indices(&needle)
        .any(|(at, _)| !line[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

fn has_peer_ip(line: &str, ip: IpAddr) -> bool {
    line.contains(&format!("peer={ip}:"))
}

struct Fleet {
    instances: Vec<Instance>,
    haproxy: Haproxy,
}

impl Fleet {
    fn start(balance: &str, extra: &str) -> Option<Fleet> {
        let binary = fleet::require_tool("haproxy")?;
        let instances: Vec<Instance> = (0..3).map(|_| Instance::start(extra)).collect();
        let backends: Vec<Backend> = instances.iter().map(Instance::backend).collect();
        let haproxy = Haproxy::start(&binary, balance, &backends);
        haproxy.await_all_up(instances.len());
        Some(Fleet { instances, haproxy })
    }

    /// Waits until some instance has logged the session of the client at `source` as
    /// connected; returns that instance's index.
    fn await_instance_of(&mut self, source: SocketAddr) -> usize {
        let deadline = Instant::now() + FLEET_DEADLINE;
        loop {
            for (i, instance) in self.instances.iter_mut().enumerate() {
                instance.refresh();
                if instance.lines_for(source).any(|l| l.contains("connected")) {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no instance logged the session of {source}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the instances have logged `needle` for clients from `ip` `count` times in all.
    fn await_lines(&mut self, ip: IpAddr, needle: &str, count: usize) -> Vec<usize> {
        let deadline = Instant::now() + FLEET_DEADLINE;
        loop {
            let per_instance: Vec<usize> = self
                .instances
                .iter_mut()
                .map(|instance| {
                    instance.refresh();
                    instance.log.iter().filter(|l| l.contains(needle) && has_peer_ip(l, ip)).count()
                })
                .collect();
            if per_instance.iter().sum::<usize>() >= count {
                return per_instance;
            }
            assert!(Instant::now() < deadline, "{needle:?} for {ip}: only {per_instance:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A no-auth CONNECT through the balancer from `source`.
async fn session_from(
    source: IpAddr,
    balancer: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let mut stream = fleet::connect_from(source, balancer).await?;
    socks_connect(&mut stream, target).await?;
    Ok(stream)
}

/// Greeting (no auth) and CONNECT on an open stream; an error unless the reply is success.
async fn socks_connect(stream: &mut TcpStream, target: SocketAddr) -> std::io::Result<()> {
    stream.write_all(&[5, 1, METHOD_NO_AUTH]).await?;
    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await?;
    let mut buf = Vec::new();
    poolsocks::socks::Request { command: Command::Connect, target: target.into() }
        .write_to(&mut buf);
    stream.write_all(&buf).await?;
    let reply = poolsocks::socks::Reply::read_from(stream)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if reply.code != ReplyCode::Succeeded {
        return Err(std::io::Error::other(format!("reply {:?}", reply.code)));
    }
    Ok(())
}

/// Sends `payload` and checks every byte comes back.
async fn echoes(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    if back != payload {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Clients looping on new one-request sessions through the balancer until stopped, recording
/// the source address of every session that failed.
struct SessionLoop {
    stop: Arc<AtomicBool>,
    succeeded: SuccessCount,
    failed: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SessionLoop {
    fn start(clients: usize, balancer: SocketAddr, target: SocketAddr) -> SessionLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let succeeded = SuccessCount::new();
        let failed = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, succeeded, failed) = (stop.clone(), succeeded.clone(), failed.clone());
                tokio::spawn(async move {
                    let body = payload(1024, c as u8);
                    while !stop.load(Ordering::Relaxed) {
                        let mut local = None;
                        let outcome = async {
                            let mut stream = fleet::connect_from(LOCALHOST, balancer).await?;
                            local = stream.local_addr().ok();
                            socks_connect(&mut stream, target).await?;
                            echoes(&mut stream, &body).await
                        }
                        .await;
                        match outcome {
                            Ok(()) => succeeded.add_one(),
                            Err(e) => failed
                                .lock()
                                .unwrap()
                                .push((local.unwrap_or(balancer), e.to_string())),
                        }
                    }
                })
            })
            .collect();
        SessionLoop { stop, succeeded, failed, tasks }
    }

    /// Waits until `more` sessions have succeeded beyond the count now.
    async fn await_more(&self, more: u64) {
        self.succeeded.await_more(more).await;
    }

    async fn stop(self) -> (u64, Vec<(SocketAddr, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client task");
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.succeeded.get(), failed)
    }
}

/// (a) The header's address is the client: `client_networks = ["127.0.0.1/32", ...]` refuses a
/// client from 127.0.0.9 and serves 127.0.0.1, though every connection the instances accept
/// comes from HAProxy at 127.0.0.5; and the login limit counts failures per real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_balancer_passes_the_real_client_to_access_rules_and_the_login_limit() {
    let extra = "[auth]
login_failure_limit = 2
login_failure_window_secs = 600
[[auth.users]]
username = \"alice\"
password = \"secret\"
[access]
client_networks = [\"127.0.0.1/32\", \"127.0.0.2/32\"]
";
    let Some(mut fleet) = tokio::task::block_in_place(|| Fleet::start("roundrobin", extra)) else {
        return;
    };
    let balancer = fleet.haproxy.frontend;
    let echo = EchoServer::start().await;
    let outsider: IpAddr = "127.0.0.9".parse().unwrap();
    let guessing: IpAddr = "127.0.0.2".parse().unwrap();

    // 127.0.0.9 is refused by every instance, closed without a SOCKS reply.
    for _ in 0..3 {
        let mut stream = fleet::connect_from(outsider, balancer).await.unwrap();
        let _ = stream.write_all(&[5, 1, METHOD_USERPASS]).await;
        let mut byte = [0u8; 1];
        let read = stream.read(&mut byte).await;
        assert!(matches!(read, Ok(0) | Err(_)), "127.0.0.9 got an answer: {read:?}");
    }
    let refused = tokio::task::block_in_place(|| {
        fleet.await_lines(outsider, "not allowed by access.client_networks", 3)
    });
    assert_eq!(refused, [1, 1, 1], "round robin: each instance refused 127.0.0.9 once");

    // 127.0.0.1 is served by every instance.
    for i in 0..3u8 {
        let mut stream = fleet::connect_from(LOCALHOST, balancer).await.unwrap();
        assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
        assert!(authenticate(&mut stream, "alice", "secret").await.success);
        let reply = request(&mut stream, Command::Connect, echo.addr.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        assert_eq!(round_trip(&mut stream, &[i; 100]).await, [i; 100]);
    }
    let served = tokio::task::block_in_place(|| fleet.await_lines(LOCALHOST, "connected", 3));
    assert_eq!(served, [1, 1, 1]);

    // 127.0.0.2 guesses passwords until every instance refuses it outright.
    let mut guesses = 0;
    loop {
        let mut stream = fleet::connect_from(guessing, balancer).await.unwrap();
        assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
        assert!(!authenticate(&mut stream, "alice", "guess").await.success);
        guesses += 1;
        let limited: Vec<usize> = fleet
            .instances
            .iter_mut()
            .map(|i| {
                i.refresh();
                i.log
                    .iter()
                    .filter(|l| l.contains("too many failures") && has_peer_ip(l, guessing))
                    .count()
            })
            .collect();
        if limited.iter().all(|&n| n > 0) {
            break;
        }
        assert!(guesses < 30, "the limit never applied to 127.0.0.2: {limited:?}");
    }
    // Now even the right password is refused for 127.0.0.2, on every instance...
    for _ in 0..3 {
        let mut stream = fleet::connect_from(guessing, balancer).await.unwrap();
        assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
        assert!(!authenticate(&mut stream, "alice", "secret").await.success);
    }
    // ...while 127.0.0.1, through the same balancer address, still logs in everywhere.
    for _ in 0..3 {
        let mut stream = fleet::connect_from(LOCALHOST, balancer).await.unwrap();
        assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
        assert!(authenticate(&mut stream, "alice", "secret").await.success, "127.0.0.1 limited");
    }

    // The instances never saw a refused PROXY header: HAProxy at 127.0.0.5 is trusted.
    for instance in &fleet.instances {
        let stats = fleet::pool_stats(instance.stats).await;
        assert_eq!(stats["server"]["proxy_untrusted"], 0);
        assert_eq!(stats["server"]["proxy_header_invalid"], 0);
    }
    // Telemetry names the real client too.
    let (_, events) =
        fleet::http_get(fleet.instances[0].stats, "/api/telemetry/events?category=auth")
            .await
            .unwrap();
    assert!(events.contains("127.0.0.2"), "{events}");
    assert!(!events.contains("127.0.0.5"), "{events}");
}

/// Opens `count` long sessions through the balancer and finds which instance serves each.
async fn long_sessions(
    fleet: &mut Fleet,
    count: usize,
    target: SocketAddr,
) -> Vec<(TcpStream, usize)> {
    let mut sessions = Vec::new();
    for i in 0..count {
        let mut stream = session_from(LOCALHOST, fleet.haproxy.frontend, target).await.unwrap();
        echoes(&mut stream, &payload(1000, i as u8)).await.unwrap();
        let local = stream.local_addr().unwrap();
        let instance = tokio::task::block_in_place(|| fleet.await_instance_of(local));
        sessions.push((stream, instance));
    }
    for instance in 0..fleet.instances.len() {
        assert!(sessions.iter().any(|(_, i)| *i == instance), "instance {instance} has none");
    }
    sessions
}

/// (b) An instance killed mid-run (SIGKILL) is taken out by the health check; new sessions
/// keep succeeding throughout (HAProxy redispatches a connect the dead one refuses), and the
/// sessions on the other instances lose no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_instance_is_taken_out_and_the_others_lose_nothing() {
    let Some(mut fleet) = tokio::task::block_in_place(|| Fleet::start("roundrobin", "")) else {
        return;
    };
    let echo = EchoServer::start().await;
    let mut sessions = long_sessions(&mut fleet, 6, echo.addr).await;
    let clients = SessionLoop::start(4, fleet.haproxy.frontend, echo.addr);
    clients.await_more(50).await;

    fleet.instances[0].daemon.signal(libc::SIGKILL);
    let _ = fleet.instances[0].daemon.wait();
    tokio::task::block_in_place(|| fleet.haproxy.await_status(0, "DOWN"));
    let given_when_down = fleet.haproxy.servers()[0].sessions_total;
    clients.await_more(200).await;
    let (succeeded, failed) = clients.stop().await;

    // The only sessions that may fail are those the killed instance was serving, by
    // HAProxy's own log of which server each session went to.
    for (source, error) in &failed {
        let server = tokio::task::block_in_place(|| fleet.haproxy.await_server_of(*source));
        assert_eq!(
            server,
            Some(0),
            "session from {source} failed ({error}) off the killed instance"
        );
    }
    assert!(failed.len() <= 4, "at most one in-flight session per client: {failed:?}");
    assert_eq!(fleet.haproxy.servers()[0].sessions_total, given_when_down, "sent to a DOWN server");
    eprintln!("{succeeded} sessions succeeded, {} cut on the killed instance", failed.len());

    for (i, (stream, instance)) in sessions.iter_mut().enumerate() {
        let body = payload(256 * 1024, i as u8);
        let result = echoes(stream, &body).await;
        if *instance == 0 {
            assert!(result.is_err(), "a session on the killed instance still echoed");
        } else {
            result.unwrap_or_else(|e| panic!("session {i} on instance {instance} lost bytes: {e}"));
        }
    }
}

/// (c) SIGTERM drains: `/health` answers 503 at once, HAProxy takes the instance out, it gets
/// no new session, finishes its in-flight ones whole and exits 0 without cutting any.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_an_instance_out_of_the_balancer() {
    let Some(mut fleet) = tokio::task::block_in_place(|| Fleet::start("roundrobin", "")) else {
        return;
    };
    let echo = EchoServer::start().await;
    let mut sessions = long_sessions(&mut fleet, 6, echo.addr).await;
    let clients = SessionLoop::start(4, fleet.haproxy.frontend, echo.addr);
    clients.await_more(50).await;

    let draining = &mut fleet.instances[0];
    draining.daemon.signal(libc::SIGTERM);
    let line = tokio::task::block_in_place(|| draining.daemon.await_log("draining sessions"));
    let draining_now: usize = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sessions="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no session count in {line}"));
    assert!(draining_now >= 2, "the two long sessions are in flight: {line}");
    let (status, body) = fleet::http_get(draining.stats, "/health").await.unwrap();
    assert_eq!(status, 503, "/health while draining: {body}");
    tokio::task::block_in_place(|| fleet.haproxy.await_status(0, "DOWN"));
    let given_when_down = fleet.haproxy.servers()[0].sessions_total;
    clients.await_more(200).await;
    assert_eq!(fleet.haproxy.servers()[0].sessions_total, given_when_down, "sent to a DOWN server");

    // The in-flight sessions on the draining instance carry on, whole, then end.
    for (i, (stream, _)) in sessions.iter_mut().enumerate() {
        let body = payload(256 * 1024, i as u8);
        echoes(stream, &body).await.unwrap_or_else(|e| panic!("session {i} lost bytes: {e}"));
    }
    let on_draining: Vec<TcpStream> = {
        let (on, _off): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(_, i)| *i == 0);
        on.into_iter().map(|(s, _)| s).collect()
    };
    drop(on_draining);
    let draining = &mut fleet.instances[0];
    let status = tokio::task::block_in_place(|| draining.daemon.wait());
    assert!(status.success(), "the drained instance exited {status:?}");
    let rest = draining.daemon.rest_of_log();
    assert!(!rest.iter().any(|l| l.contains("cutting remaining sessions")), "{rest:#?}");
    assert!(rest.iter().any(|l| l.contains("shut down")), "{rest:#?}");

    let (succeeded, failed) = clients.stop().await;
    assert!(failed.is_empty(), "sessions failed while an instance drained: {failed:?}");
    eprintln!("{succeeded} sessions succeeded while an instance drained");
}
