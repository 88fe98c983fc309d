//! Reload on SIGHUP, against the built binary: the file is rewritten, the daemon is sent
//! SIGHUP, and the test awaits the daemon's own log line before it looks at the outcome.

mod common;

use common::upstreams::Upstreams;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, EVENT_DEADLINE};
use common::http_get;
use poolsocks::socks::{ReplyCode, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Rewrites the daemon's file, sends SIGHUP and returns the log line that answered it.
fn reload(daemon: &mut Daemon, config: &str, answer: &str) -> String {
    daemon.write_config(config);
    daemon.signal(libc::SIGHUP);
    daemon.await_log(answer)
}

/// `/api/pool/stats` once it shows what `done` waits for (the endpoint shares one answer of
/// the pool's actors per 250 ms, so the first answer after a change may predate it).
async fn pool_stats_when(
    addr: SocketAddr,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let stats = pool_stats(addr).await;
        if done(&stats) || Instant::now() >= deadline {
            return stats;
        }
        tokio::task::yield_now().await;
    }
}

async fn pool_stats(addr: SocketAddr) -> serde_json::Value {
    let response = http_get(addr, "/api/pool/stats").await;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("stats JSON: {e}: {response}"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read fds").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_in_flight_finishes_across_a_reload_that_denies_its_destination() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let origin = listener.local_addr().expect("addr");
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let (go, go_rx) = watch::channel(false);
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let payload = payload.clone();
            let mut go = go_rx.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(&payload[..2_000_000]).await;
                let _ = go.wait_for(|go| *go).await;
                let _ = stream.write_all(&payload[2_000_000..]).await;
            });
        }
    });

    let base = "[server]\nbind_port = 0\n";
    let mut daemon = Daemon::start(base);
    let (mut download, reply) = common::connect(daemon.addr, origin.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let mut received = vec![0u8; 2_000_000];
    download.read_exact(&mut received).await.expect("first half");

    let denied = format!(
        "{base}[[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.1/32\", \"::1/128\"]\n\
         ports = [{}]\n",
        origin.port()
    );
    let line = reload(&mut daemon, &denied, "config reloaded");
    assert!(line.contains("access.rules"), "the change is named: {line}");

    // A new request to the same destination is refused now, before any dial.
    let (_, reply) = common::connect(daemon.addr, origin.into()).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed);
    let by_name = TargetAddr::Domain("localhost".into(), origin.port());
    let (_, reply) = common::connect(daemon.addr, by_name).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "a name resolving there is refused too");

    // The download that started before the reload gets every byte.
    go.send_replace(true);
    download.read_to_end(&mut received).await.expect("rest of the download");
    assert!(received == expected, "download cut or corrupted ({} bytes)", received.len());
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the denied requests never reached it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_removed_by_a_reload_is_refused_and_one_added_is_accepted() {
    let echo = common::EchoServer::start().await;
    let users = |name: &str, password: &str| {
        format!(
            "[server]\nbind_port = 0\n[[auth.users]]\nusername = \"{name}\"\npassword = \"{password}\"\n"
        )
    };
    let mut daemon = Daemon::start(&users("alice", "alice-pw-1"));
    let (mut alice, reply) =
        common::connect_with_password(daemon.addr, echo.addr.into(), "alice", "alice-pw-1").await;
    assert_eq!(reply.code, ReplyCode::Succeeded);

    let line = reload(&mut daemon, &users("bob", "bob-pw-2"), "config reloaded");
    assert!(line.contains("auth.users"), "{line}");
    assert!(!line.contains("pw-"), "no password in the log: {line}");

    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    common::greet(&mut stream, &[poolsocks::socks::METHOD_USERPASS]).await;
    assert!(!common::authenticate(&mut stream, "alice", "alice-pw-1").await.success);
    let (mut bob, reply) =
        common::connect_with_password(daemon.addr, echo.addr.into(), "bob", "bob-pw-2").await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(common::round_trip(&mut bob, b"bob's bytes").await, b"bob's bytes");
    // Alice's session, authenticated before the reload, is not touched.
    assert_eq!(common::round_trip(&mut alice, b"still here").await, b"still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn lowering_max_total_idle_from_100_to_10_leaves_exactly_10_spares() {
    let mut upstreams = Upstreams::start(60).await;
    let config = |max_total_idle: usize| {
        format!(
            "[server]\nbind_port = 0\n[server.pool]\nenabled = true\nmax_idle_per_dest = 1\n\
             max_total_idle = {max_total_idle}\ncheap_dial_us = 0\n[sessions]\n\
             stats_api_enabled = true\nstats_api_port = 0\n"
        )
    };
    let mut daemon = Daemon::start(&config(100));
    let stats = daemon.await_stats_addr();
    // A destination gets a manager on its second checkout, and a spare after that miss.
    for addr in upstreams.addrs.clone() {
        for _ in 0..2 {
            let (mut stream, reply) = common::connect(daemon.addr, addr.into()).await;
            assert_eq!(reply.code, ReplyCode::Succeeded);
            assert_eq!(common::round_trip(&mut stream, b"x").await, b"x");
        }
    }
    upstreams.await_open(60).await;
    let before = pool_stats_when(stats, |s| s["total_idle"] == 60).await;
    assert_eq!(before["total_idle"], 60, "{}", before["budget"]);

    let line = reload(&mut daemon, &config(10), "config reloaded");
    assert!(line.contains("server.pool.max_total_idle"), "{line}");
    upstreams.await_open(10).await;
    let after = pool_stats_when(stats, |s| {
        s["budget"]["max_total_idle"] == 10 && s["total_idle"] == 10 && s["budget"]["evicting"] == 0
    })
    .await;
    let budget = &after["budget"];
    assert_eq!(after["total_idle"], 10, "{budget}");
    assert_eq!(after["evicted"], 50, "{budget}");
    assert_eq!(budget["max_total_idle"], 10);
    assert_eq!((budget["pooled"].as_u64(), budget["evicting"].as_u64()), (Some(10), Some(0)));
    assert_eq!((budget["reserved"].as_u64(), budget["lent"].as_u64()), (Some(0), Some(0)));
    assert!(budget["high_water"].as_u64() >= Some(60));
    assert_eq!(after["total_created"], before["total_created"], "nothing redialed");
    assert_eq!(after["config"]["pool"]["max_total_idle"], 10);
    assert_eq!(after["config_reload"]["last_reload_successful"], true);
    assert_ne!(
        after["config_reload"]["config_hash"], before["config_reload"]["config_hash"],
        "the hash follows the config"
    );
    // The upstreams still hold exactly the 10 the pool counts.
    assert_eq!(*upstreams.open.borrow(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_or_a_new_bind_port_leaves_the_daemon_on_its_old_config() {
    let mut echo = common::EchoServer::start().await;
    let base =
        "[server]\nbind_port = 0\n[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n";
    let mut daemon = Daemon::start(base);
    let stats = daemon.await_stats_addr();
    let gauge = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("poolsocks_config_last_reload_successful "))
            .map(|l| l.trim_end().to_string())
            .unwrap_or_default()
    };
    assert!(gauge(&http_get(stats, "/metrics").await).ends_with(" 1"));
    let serves = |addr: SocketAddr, echo: SocketAddr| async move {
        let (mut stream, reply) = common::connect(addr, echo.into()).await;
        reply.code == ReplyCode::Succeeded && common::round_trip(&mut stream, b"ok").await == b"ok"
    };

    // A syntax error: refused with the line, as --check says it.
    let broken = format!("{base}max_connections = = 3\n");
    let line = reload(&mut daemon, &broken, "config reload refused");
    assert!(line.contains("line 6") && line.contains("TOML parse error"), "{line}");
    assert!(line.contains("ERROR"), "logged at error: {line}");
    assert!(gauge(&http_get(stats, "/metrics").await).ends_with(" 0"), "failure gauge set");
    assert!(serves(daemon.addr, echo.addr).await, "still serving");

    // A validation error: refused naming the key and its line.
    let zero = base.replace("bind_port = 0\n", "bind_port = 0\nhandshake_timeout_ms = 0\n");
    let line = reload(&mut daemon, &zero, "config reload refused");
    assert!(line.contains("server.handshake_timeout_ms") && line.contains("line 3"), "{line}");

    // A file that is gone (a deploy tool replacing it non-atomically): refused, still serving.
    std::fs::remove_file(daemon.config_path()).expect("remove config");
    daemon.signal(libc::SIGHUP);
    let line = daemon.await_log("config reload refused");
    assert!(line.contains("cannot read config file"), "{line}");
    assert!(serves(daemon.addr, echo.addr).await, "still serving without its file");

    // A changed listener port: refused as a whole, naming the key; the other change is not
    // applied either.
    let moved = base.replace("bind_port = 0\n", "bind_port = 1081\nmax_connections = 1\n");
    let line = reload(&mut daemon, &moved, "config reload refused");
    assert!(line.contains("server.bind_port") && line.contains("restart"), "{line}");
    assert!(!line.contains("max_connections"), "only the key that needs a restart: {line}");
    let status = pool_stats(stats).await;
    assert_eq!(status["config_reload"]["last_reload_successful"], false);
    assert_eq!(status["config_reload"]["reloads_refused"], 4);
    assert!(status["config_reload"]["last_reload_error"]
        .as_str()
        .is_some_and(|e| e.contains("server.bind_port")));
    assert_eq!(status["config"]["server"]["max_connections"], 10_000, "nothing applied");
    assert!(gauge(&http_get(stats, "/metrics").await).ends_with(" 0"));
    // Two sessions at once: max_connections = 1 was not applied.
    let (mut first, reply) = common::connect(daemon.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert!(serves(daemon.addr, echo.addr).await);
    assert_eq!(common::round_trip(&mut first, b"1").await, b"1");
    assert!(echo.accepted.recv().await.is_some());

    let events = http_get(stats, "/api/telemetry/events?category=config").await;
    assert!(events.contains("config reload refused"), "{events}");

    // A good file again: applied, gauge back to 1.
    let good = base.replace("bind_port = 0\n", "bind_port = 0\nmax_connections = 500\n");
    let line = reload(&mut daemon, &good, "config reloaded");
    assert!(line.contains("server.max_connections"), "{line}");
    let metrics = http_get(stats, "/metrics").await;
    assert!(gauge(&metrics).ends_with(" 1"));
    assert!(metrics.contains("poolsocks_config_reloads_refused_total 4"), "{metrics}");
    assert!(metrics.contains("poolsocks_config_info{hash=\""), "the hash is exposed");
    let status = pool_stats(stats).await;
    assert_eq!(status["config"]["server"]["max_connections"], 500);

    // The stats token reloads too: required from the next request on, never logged.
    let locked = format!("{good}stats_api_token = \"tok-4a7c\"\n");
    let line = reload(&mut daemon, &locked, "config reloaded");
    assert!(line.contains("sessions.stats_api_token") && !line.contains("tok-4a7c"), "{line}");
    assert!(http_get(stats, "/metrics").await.starts_with("HTTP/1.1 401"));
    let mut stream = TcpStream::connect(stats).await.expect("connect stats");
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-4a7c\r\n\
                   Connection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response");
    assert!(response.starts_with("HTTP/1.1 200") && gauge(&response).ends_with(" 1"), "{response}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_reloads_under_traffic_lose_nothing_and_leak_no_descriptor() {
    let echo = common::EchoServer::start().await;
    // Alternates between pool on and off (every reload of the pool starts or stops one),
    // limits, rules and telemetry; ends where it started, with the pool off.
    let config = |i: usize| {
        let pool = i % 4 == 1 || i % 4 == 2;
        format!(
            "[server]\nbind_port = 0\nmax_connections = {}\nhandshake_timeout_ms = {}\n\
             [server.pool]\nenabled = {pool}\nmax_idle_per_dest = {}\nmax_total_idle = {}\n\
             [[access.rules]]\naction = \"deny\"\nports = [{}]\n\
             [telemetry]\nmax_events = {}\n",
            1000 + i % 3,
            5000 + i % 2,
            1 + i % 4,
            10 + i % 5,
            9 + i % 2,
            100 + i % 7
        )
    };
    let mut daemon = Daemon::start(&config(0));
    let pid = daemon.child.id();
    let baseline = open_fds(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 0..4u8 {
        let (stop, ok, proxy, target) = (stop.clone(), ok.clone(), daemon.addr, echo.addr);
        clients.push(tokio::spawn(async move {
            let payload = vec![client; 4096];
            while !stop.load(Ordering::Relaxed) {
                let (mut stream, reply) = common::connect(proxy, target.into()).await;
                assert_eq!(reply.code, ReplyCode::Succeeded, "a session failed during reloads");
                assert_eq!(common::round_trip(&mut stream, &payload).await, payload);
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Two sessions held open across all the reloads.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (stream, reply) = common::connect(daemon.addr, echo.addr.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        held.push(stream);
    }
    let mut took_ms = Vec::new();
    for i in 1..=100 {
        let line = reload(&mut daemon, &config(i % 100), "config reloaded");
        let ms = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("took_ms="))
            .and_then(|v| v.parse::<f64>().ok());
        took_ms.extend(ms);
    }
    for stream in &mut held {
        assert_eq!(
            common::round_trip(stream, b"held through 100 reloads").await,
            b"held through 100 reloads"
        );
    }
    drop(held);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task: every session succeeded");
    }
    let sessions = ok.load(Ordering::Relaxed);
    assert!(sessions > 100, "traffic ran through the reloads ({sessions} sessions)");
    took_ms.sort_by(f64::total_cmp);
    eprintln!(
        "100 reloads under traffic: {sessions} sessions, reload took median {:.2} ms, max {:.2} ms",
        took_ms.get(took_ms.len() / 2).copied().unwrap_or_default(),
        took_ms.last().copied().unwrap_or_default()
    );

    // Pool shutdowns run in the background; wait for the descriptors to come back.
    let deadline = Instant::now() + EVENT_DEADLINE;
    let mut now_open = open_fds(pid);
    while now_open != baseline && Instant::now() < deadline {
        std::thread::park_timeout(Duration::from_millis(20));
        now_open = open_fds(pid);
    }
    eprintln!("descriptors: {baseline} before, {now_open} after");
    assert_eq!(now_open, baseline, "descriptors leaked across 100 reloads");
}

#[tokio::test(flavor = "multi_thread")]
async fn logging_level_follows_a_reload() {
    let echo = common::EchoServer::start().await;
    let base = "[server]\nbind_port = 0\n[logging]\nlevel = \"info\"\n";
    let mut daemon = Daemon::start(base);
    let (mut stream, _) = common::connect(daemon.addr, echo.addr.into()).await;
    assert_eq!(common::round_trip(&mut stream, b"1").await, b"1");
    drop(stream);
    let line = reload(&mut daemon, &base.replace("\"info\"", "\"debug\""), "config reloaded");
    assert!(line.contains("logging.level"), "{line}");
    // Nothing at debug came before the reload; a session now logs its connect at debug.
    let (mut stream, _) = common::connect(daemon.addr, echo.addr.into()).await;
    assert_eq!(common::round_trip(&mut stream, b"2").await, b"2");
    let line = daemon.await_log("connected");
    assert!(line.contains("DEBUG"), "{line}");
}
