//! Issue 14, second hardening pass: each test is one finding of the hostile probe, and fails on
//! the code before its fix (the closing note says which were seen failing).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::dns::TestDns;
use common::*;
use poolsocks::config::{Config, RuleAction, RuleConfig, UserConfig};
use poolsocks::secret::Secret;
use poolsocks::socks::{Command, ReplyCode, TargetAddr, METHOD_USERPASS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const DEADLINE: Duration = Duration::from_secs(20);

fn deny_loopback_config() -> Config {
    let mut config = test_config();
    config.access.rules = vec![RuleConfig {
        action: RuleAction::Deny,
        networks: ["127.0.0.0/8", "::1/128", "169.254.0.0/16"]
            .iter()
            .map(|n| n.parse().expect("cidr"))
            .collect(),
        domains: vec![],
        ports: vec![],
    }];
    config
}

/// A TCP client of the proxy whose source is `source` (any 127.0.0.0/8 address is local).
async fn connect_from(source: Ipv4Addr, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source.into(), 0)).expect("bind source");
    socket.connect(proxy).await.expect("connect to proxy")
}

fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("linger");
}

// 1. Unspecified addresses ------------------------------------------------------------------

#[tokio::test]
async fn unspecified_addresses_never_reach_local_services_pool_on_or_off_first_try_or_second() {
    let mut local = EchoServer::start_on("0.0.0.0:0").await;
    let port = local.addr.port();
    let resolver = StaticResolver::new()
        .with("zero.test", [IpAddr::V4(Ipv4Addr::UNSPECIFIED)])
        .with("zeroes.test", ["::".parse().expect("ip")]);
    for pool in [false, true] {
        let mut config = deny_loopback_config();
        config.server.pool.enabled = pool;
        let proxy = TestProxy::start_with_resolver(config, resolver.clone()).await;
        let targets = [
            TargetAddr::Ip(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)),
            TargetAddr::Ip(format!("[::]:{port}").parse().expect("addr")),
            TargetAddr::Ip(format!("[::ffff:0.0.0.0]:{port}").parse().expect("addr")),
            TargetAddr::Ip(SocketAddr::new(Ipv4Addr::new(0, 1, 2, 3).into(), port)),
            TargetAddr::Domain("zero.test".into(), port),
            TargetAddr::Domain("zeroes.test".into(), port),
            // The loopback address itself, for comparison: denied by the rule.
            TargetAddr::Ip(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)),
        ];
        for target in &targets {
            for attempt in 1..=3 {
                let (_stream, reply) = connect(proxy.addr, target.clone()).await;
                assert_eq!(
                    reply.code,
                    ReplyCode::NotAllowed,
                    "pool {pool}, {target}, attempt {attempt}"
                );
            }
        }
        proxy.stop().await;
    }
    assert!(local.accepted.try_recv().is_err(), "a connection reached the local service");
}

// 2. argon2 memory ----------------------------------------------------------------------------

fn argon2_phc(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::from_b64("aGFyZGVuaW5ndGVzdHNhbHQ").expect("salt");
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).expect("hash").to_string()
}

/// (VmRSS, VmHWM) of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("field")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_argon2_logins_use_bounded_memory_that_comes_back() {
    const LOGINS: usize = 64;
    let config = format!(
        "[server]\nbind_port = 0\nhandshake_timeout_ms = 120000\n\
         [[auth.users]]\nusername = \"alice\"\npassword = \"{}\"\n\
         [auth]\nlogin_failure_limit = 1000\n",
        argon2_phc("right")
    );
    let daemon = Daemon::start(&config);
    let pid = daemon.child.id();
    let (baseline, _) = memory_kib(pid);

    let mut logins = Vec::new();
    for i in 0..LOGINS {
        let proxy = daemon.addr;
        logins.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(proxy).await.expect("connect");
            assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
            // Unknown users too cost one argon2 check (the decoy).
            let user = if i % 2 == 0 { "nobody" } else { "alice" };
            authenticate(&mut stream, user, "wrong").await.success
        }));
    }
    for login in logins {
        assert!(!login.await.expect("login"), "a wrong password was accepted");
    }
    let (after, peak) = memory_kib(pid);
    println!("RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
    // Two checks at a time of 19 MiB each, not one per login (64 x 19 MiB = 1.2 GiB).
    assert!(peak < baseline + 160 * 1024, "peak RSS {peak} KiB from {baseline} KiB");
    assert!(after < baseline + 32 * 1024, "RSS stayed at {after} KiB (baseline {baseline} KiB)");
}

// 3 and 4. The login limit under concurrency, and the cost of every miss ----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_wrong_passwords_cannot_outrun_the_failure_limit() {
    let mut config = test_config();
    config.server.handshake_timeout_ms = 60_000;
    config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new(argon2_phc("right")) }];
    config.auth.login_failure_limit = 5;
    let server = build_server(config).await.expect("build");
    let metrics = server.metrics();
    let proxy = TestProxy::start_server(server).await;
    let mut logins = Vec::new();
    for i in 0..41 {
        let proxy = proxy.addr;
        logins.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(proxy).await.expect("connect");
            greet(&mut stream, &[METHOD_USERPASS]).await;
            let password = if i == 40 { "right" } else { "wrong" };
            authenticate(&mut stream, "alice", password).await.success
        }));
    }
    for login in logins {
        login.await.expect("login");
    }
    let auth = metrics.snapshot().auth;
    let checked = auth.logins_accepted + auth.logins_rejected;
    assert!(checked <= 5, "{checked} of 41 logins were checked with a limit of 5: {auth:?}");
    assert_eq!(auth.logins_rate_limited, 41 - checked);
    assert_eq!(auth.argon2_checks, checked);
    proxy.stop().await;
}

// 6. Slow DNS -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_whose_server_never_answers_do_not_delay_anyone_else() {
    const SLOW: usize = 600;
    let echo = EchoServer::start().await;
    let dns = TestDns::start(&[("good.test", Ipv4Addr::LOCALHOST)]).await;
    // 1,000 sessions at most: the open-file limit here (20,000 in CI) then holds what the
    // config asks for, and the lookups' share of descriptors (see `descriptors`) holds about
    // 1,400 lookups in flight, more than the 600 silent ones.
    let daemon = Daemon::start(&format!(
        "[server]\nbind_port = 0\nhandshake_timeout_ms = 60000\nmax_connections = 1000\n\
         [server.dns]\nservers = [\"{}\"]\ntimeout_ms = 8000\n",
        dns.addr
    ));
    let replied = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let proxy = daemon.addr;
        let replied = replied.clone();
        slow.push(tokio::spawn(async move {
            let (_stream, reply) =
                connect(proxy, TargetAddr::Domain(format!("slow{i}.test"), 80)).await;
            replied.fetch_add(1, Ordering::SeqCst);
            reply.code
        }));
    }
    // Every slow lookup is on its way before the legitimate client asks.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while dns.queries.load(Ordering::SeqCst) < SLOW {
        assert!(tokio::time::Instant::now() < deadline, "the slow lookups never all started");
        tokio::task::yield_now().await;
    }
    let (mut good, reply) =
        connect(daemon.addr, TargetAddr::Domain("good.test".into(), echo.addr.port())).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut good, b"served").await, b"served");
    assert_eq!(replied.load(Ordering::SeqCst), 0, "served while every slow lookup still waits");
    for lookup in slow {
        assert_eq!(lookup.await.expect("slow client"), ReplyCode::HostUnreachable);
    }
}

// 7. Sessions whose client left while the destination stopped reading ------------------------

/// A destination that accepts and never reads: what a client sends piles up in buffers.
async fn deaf_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = tx.send(stream); // held by the test, never read
        }
    });
    (addr, rx)
}

/// Writes until the proxy stops taking bytes (every buffer on the way is full).
async fn fill(stream: &mut TcpStream) {
    let chunk = vec![7u8; 64 * 1024];
    while tokio::time::timeout(Duration::from_millis(200), stream.write_all(&chunk)).await.is_ok() {
    }
}

#[tokio::test]
async fn a_client_that_resets_ends_its_session_at_once_even_if_its_bytes_are_stuck() {
    const LIMIT: usize = 5;
    let (deaf, _held) = deaf_server().await;
    let echo = EchoServer::start().await;
    let mut config = test_config();
    config.server.max_connections = LIMIT;
    let proxy = TestProxy::start(config).await;
    for _ in 0..LIMIT {
        let (mut stream, reply) = connect(proxy.addr, deaf.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        fill(&mut stream).await;
        reset_on_close(&stream);
    }
    // Every slot is taken by a session blocked on the deaf destination; the clients reset
    // (their streams dropped above). New clients must be served without any timeout passing.
    assert!(
        serve_once_admitted(proxy.addr, echo.addr).await,
        "the reset sessions kept their slots"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_session_in_which_nothing_moves_is_closed_after_the_idle_timeout() {
    const LIMIT: usize = 3;
    let (deaf, _held) = deaf_server().await;
    let echo = EchoServer::start().await;
    let mut config = test_config();
    config.server.max_connections = LIMIT;
    config.server.session_idle_timeout_secs = 1;
    let proxy = TestProxy::start(config).await;
    let mut clients = Vec::new();
    for _ in 0..LIMIT {
        let (mut stream, reply) = connect(proxy.addr, deaf.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        fill(&mut stream).await;
        // A FIN, not a reset: the proxy cannot tell a half-close from a client gone.
        stream.shutdown().await.expect("shutdown");
        clients.push(stream);
    }
    assert!(serve_once_admitted(proxy.addr, echo.addr).await, "idle sessions were never closed");
    for mut client in clients {
        assert!(closed_without_data(&mut client).await, "the idle session was closed");
    }
    proxy.stop().await;
}

// 8. The connect phase -------------------------------------------------------------------------

/// `n` loopback addresses on one port where a connect never completes (full backlogs).
async fn silent_addresses(
    n: u8,
) -> (Vec<IpAddr>, u16, Vec<tokio::net::TcpListener>, Vec<TcpSocket>) {
    let first = TcpSocket::new_v4().expect("socket");
    first.bind("127.0.10.1:0".parse().expect("addr")).expect("bind");
    let port = first.local_addr().expect("addr").port();
    let mut sockets = vec![first];
    for i in 2..=n {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(Ipv4Addr::new(127, 0, 10, i).into(), port)).expect("bind");
        sockets.push(socket);
    }
    let mut listeners = Vec::new();
    let mut fillers = Vec::new();
    let mut addrs = Vec::new();
    for socket in sockets {
        let addr = socket.local_addr().expect("addr");
        let listener = socket.listen(0).expect("listen");
        // One connection fills a backlog of 0; later SYNs are dropped and connects hang.
        let filler = TcpSocket::new_v4().expect("socket");
        let _ = tokio::time::timeout(Duration::from_millis(200), filler_connect(addr)).await;
        listeners.push(listener);
        fillers.push(filler);
        addrs.push(addr.ip());
    }
    (addrs, port, listeners, fillers)
}

async fn filler_connect(addr: SocketAddr) {
    if let Ok(stream) = TcpStream::connect(addr).await {
        std::mem::forget(stream); // held for the test's lifetime
    }
}

#[tokio::test]
async fn the_whole_connect_phase_is_bounded_and_ends_when_the_client_resets() {
    let (addrs, port, _listeners, _fillers) = silent_addresses(20).await;
    let resolver = StaticResolver::new().with("twenty.test", addrs);
    let target = TargetAddr::Domain("twenty.test".into(), port);

    let mut config = test_config();
    config.server.pool.connect_timeout_ms = 500;
    config.server.connect_phase_timeout_ms = 1_200;
    let proxy = TestProxy::start_with_resolver(config, resolver.clone()).await;
    let started = tokio::time::Instant::now();
    let (_stream, reply) = connect(proxy.addr, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::TtlExpired);
    // 20 addresses x 500 ms would be 10 s: the phase ends at its own bound.
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
    proxy.stop().await;

    // Clients that reset while their connect is still being tried free their slots at once.
    const LIMIT: usize = 4;
    let echo = EchoServer::start().await;
    let mut config = test_config();
    config.server.max_connections = LIMIT;
    config.server.pool.connect_timeout_ms = 30_000;
    config.server.connect_phase_timeout_ms = 600_000;
    let proxy = TestProxy::start_with_resolver(config, resolver).await;
    for _ in 0..LIMIT {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        greet(&mut stream, &[0]).await;
        let mut buf = Vec::new();
        poolsocks::socks::Request { command: Command::Connect, target: target.clone() }
            .write_to(&mut buf);
        stream.write_all(&buf).await.expect("request");
        reset_on_close(&stream);
    }
    assert!(serve_once_admitted(proxy.addr, echo.addr).await, "slots stayed with clients gone");
    proxy.stop().await;
}

// 9. Per-destination state ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_capped_one_offs_cost_one_connection_and_stats_stay_bounded() {
    let upstream = EchoServer::start_on("0.0.0.0:0").await;
    let mut config = test_config();
    config.server.pool.enabled = true;
    config.server.pool.max_destinations = 20;
    config.sessions.stats_api_enabled = true;
    config.sessions.stats_api_port = 0;
    let server = build_server(config).await.expect("build");
    let pool = server.pool().expect("pool");
    let stats_addr = server.stats_addr().expect("stats");
    let proxy = TestProxy::start_server(server).await;

    // 100 names seen once: each costs its own client's connection and nothing else.
    for i in 0..100u16 {
        let target = TargetAddr::Domain(format!("once{i}.test"), upstream.addr.port());
        let (_stream, reply) = connect(proxy.addr, target).await;
        // Unknown to the static resolver: refused, and no spare is dialed for a failure.
        assert_eq!(reply.code, ReplyCode::HostUnreachable);
    }
    // 60 destinations asked for twice (by IP literal on distinct loopback addresses).
    for i in 0..60u8 {
        let target = TargetAddr::Ip(SocketAddr::new(
            Ipv4Addr::new(127, 0, 20, i + 1).into(),
            upstream.addr.port(),
        ));
        for _ in 0..2 {
            let (mut stream, reply) = connect(proxy.addr, target.clone()).await;
            assert_eq!(reply.code, ReplyCode::Succeeded);
            assert_eq!(round_trip(&mut stream, b"x").await, b"x");
        }
    }
    let stats = pool.stats().await.expect("stats");
    assert!(stats.destinations <= 20, "{} destinations tracked", stats.destinations);
    assert!(stats.destinations_forgotten >= 40, "{stats:?}");
    assert_eq!(stats.first_sightings, 160, "every first sighting passed straight through");

    let body = http_get_json(stats_addr, "/api/pool/stats").await;
    let listed = body["per_destination"].as_array().expect("rows").len();
    assert!(listed <= 50);
    assert_eq!(
        listed as u64 + body["destinations_omitted"].as_u64().expect("omitted"),
        stats.destinations as u64
    );
    let page =
        http_get_json(stats_addr, "/api/pool/stats?destinations=all&offset=5&limit=10").await;
    assert_eq!(
        page["per_destination"].as_array().expect("rows").len(),
        10.min(stats.destinations.saturating_sub(5))
    );
    proxy.stop().await;
}

/// GET `path` from the stats endpoint and parse the JSON body.
async fn http_get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut stream = TcpStream::connect(addr).await.expect("connect stats");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("response");
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).expect("body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

// 10. Telemetry flood --------------------------------------------------------------------------

#[tokio::test]
async fn clients_that_are_not_allowed_in_cannot_flush_a_warning_out_of_telemetry() {
    let mut config = test_config();
    config.access.client_networks = vec!["127.0.0.1/32".parse().expect("cidr")];
    config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new("right") }];
    config.auth.login_failure_limit = 1;
    let server = build_server(config).await.expect("build");
    let telemetry = server.telemetry();
    let proxy = TestProxy::start_server(server).await;
    // Evidence: an address refused after a failed login.
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        greet(&mut stream, &[METHOD_USERPASS]).await;
        authenticate(&mut stream, "alice", "guess").await;
    }
    // Noise: 300 bare connects from addresses outside client_networks.
    for i in 0..300u32 {
        let source = Ipv4Addr::new(127, 0, 30 + (i / 200) as u8, (i % 200) as u8 + 2);
        let mut stream = connect_from(source, proxy.addr).await;
        assert!(closed_without_data(&mut stream).await);
    }
    let events = telemetry.query(&Default::default());
    assert!(
        events.iter().any(|e| e.category == "auth"),
        "the login warning was pushed out by {} events",
        events.len()
    );
    let refused: u64 = events.iter().filter(|e| e.category == "access").map(|e| e.count).sum();
    assert_eq!(refused, 300, "every refused connect is still counted");
    proxy.stop().await;
}

// 11. Log injection ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_controlled_names_cannot_forge_log_lines() {
    let dns = TestDns::start(&[]).await;
    let mut daemon = Daemon::start(&format!(
        "[server]\nbind_port = 0\n[server.dns]\nservers = [\"{}\"]\n\
         [[auth.users]]\nusername = \"alice\"\npassword = \"right\"\n",
        dns.addr
    ));
    let forged = "FORGED  INFO poolsocks: authenticated user=admin";
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    greet(&mut stream, &[METHOD_USERPASS]).await;
    assert!(!authenticate(&mut stream, &format!("x\n{forged}\u{1b}[2K"), "wrong").await.success);
    let mut log = vec![daemon.await_log("authentication failed")];
    assert!(log[0].contains("\\n") && log[0].contains("\\u{1b}"), "escaped: {}", log[0]);
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    greet(&mut stream, &[METHOD_USERPASS]).await;
    assert!(authenticate(&mut stream, "alice", "right").await.success);
    let reply =
        request(&mut stream, Command::Connect, TargetAddr::Domain(format!("bad\n{forged}"), 1))
            .await;
    assert_eq!(reply.code, ReplyCode::HostUnreachable);
    let line = daemon.await_log("connect failed");
    assert!(line.contains("\\n"), "the newline is escaped: {line}");
    log.push(line);
    daemon.signal(libc::SIGTERM);
    log.extend(daemon.log_so_far());
    log.extend(daemon.rest_of_log());
    assert!(
        log.iter().all(|line| !line.starts_with("FORGED")),
        "a client wrote a log line of its own: {log:#?}"
    );
    assert!(log.iter().all(|l| !l.contains('\u{1b}')), "an escape byte reached the log");
}

// 12. /health under slow clients ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_get_through_a_crowd_of_idle_and_dripping_connections() {
    let mut config = test_config();
    config.sessions.stats_api_enabled = true;
    config.sessions.stats_api_port = 0;
    let server = build_server(config).await.expect("build");
    let stats_addr = server.stats_addr().expect("stats");
    let proxy = TestProxy::start_server(server).await;
    let stop = tokio_util::sync::CancellationToken::new();
    // 70 connections (the endpoint allows 64): half idle, half dripping a byte every 100 ms;
    // each is refilled a second after it was closed.
    for i in 0..70 {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(mut stream) = TcpStream::connect(stats_addr).await else { continue };
                loop {
                    let wrote = if i % 2 == 0 { Ok(()) } else { stream.write_all(b"G").await };
                    let mut byte = [0u8; 1];
                    let closed = tokio::select! {
                        read = stream.read(&mut byte) => matches!(read, Ok(0) | Err(_)),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => false,
                        _ = stop.cancelled() => return,
                    };
                    if wrote.is_err() || closed {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await; // refilled each second
            }
        });
    }
    let mut answered = 0;
    for _ in 0..15 {
        // A balancer checks on an interval (HAProxy's default is 2 s; faster here).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let check = tokio::spawn(http_get_json(stats_addr, "/health"));
        let body = tokio::time::timeout(DEADLINE, check).await;
        // A check that was refused or reset (a panic inside the task) is not answered.
        if body.is_ok_and(|b| b.is_ok_and(|b| b["ready"] == true)) {
            answered += 1;
        }
    }
    stop.cancel();
    assert_eq!(answered, 15, "health checks answered");
    proxy.stop().await;
}

// 13. Byte counters ----------------------------------------------------------------------------

#[tokio::test]
async fn bytes_are_counted_as_they_move_even_when_the_session_ends_in_a_reset() {
    const SENT: usize = 5 * 1024 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(&vec![1u8; SENT]).await.expect("send");
        reset_on_close(&stream);
    });
    let server = build_server(test_config()).await.expect("build");
    let metrics = server.metrics();
    let proxy = TestProxy::start_server(server).await;
    let (mut stream, reply) = connect(proxy.addr, upstream.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        received += n;
    }
    let counted = metrics.snapshot().bytes_upstream_to_client as usize;
    assert!(counted >= received && received > 0, "counted {counted}, client received {received}");
    proxy.stop().await;
}

// 14. Log floods -------------------------------------------------------------------------------

/// A session to `upstream`, retried until a slot under `max_connections` is free.
async fn admitted_session(proxy: SocketAddr, upstream: SocketAddr) -> TcpStream {
    loop {
        let mut stream = TcpStream::connect(proxy).await.expect("connect");
        stream.write_all(&[5, 1, 0]).await.expect("greeting");
        let mut selection = [0u8; 2];
        if stream.read_exact(&mut selection).await.is_ok() {
            let reply = request(&mut stream, Command::Connect, upstream.into()).await;
            assert_eq!(reply.code, ReplyCode::Succeeded);
            return stream;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_at_max_connections_logs_a_line_now_and_then_not_two_per_client() {
    let mut daemon = Daemon::start("[server]\nbind_port = 0\nmax_connections = 1\n");
    let echo = EchoServer::start().await;
    for _ in 0..50 {
        let mut held = admitted_session(daemon.addr, echo.addr).await;
        let mut refused = TcpStream::connect(daemon.addr).await.expect("connect");
        let _ = refused.write_all(&[5, 1, 0]).await;
        assert!(closed_without_data(&mut refused).await, "over the limit: closed");
        assert_eq!(round_trip(&mut held, b"x").await, b"x");
        drop(held);
        assert!(serve_once_admitted(daemon.addr, echo.addr).await);
    }
    daemon.signal(libc::SIGTERM);
    let mut log = daemon.log_so_far();
    log.extend(daemon.rest_of_log());
    let lines = log.iter().filter(|l| l.contains("max_connections")).count();
    assert!(lines <= 3, "{lines} lines about max_connections for 50 rejections: {log:#?}");
}
