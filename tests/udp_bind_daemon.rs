//! UDP ASSOCIATE and BIND in the built daemon: SIGTERM drains them like CONNECT sessions and
//! cuts them after the grace period; hostile traffic (a foreign flood, fragments, malformed and
//! oversized datagrams) is dropped and counted with the daemon's memory flat; 1,000
//! associations opened and closed leave its descriptors and counters where they started; the
//! stats endpoint shows it all in JSON and in Prometheus text that `promtool` accepts.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::daemon::Daemon;
use common::udp::{datagram, raw_request, read_raw_reply, Association, UdpEcho};
use poolsocks::socks::{Command, TargetAddr};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn to(addr: SocketAddr) -> TargetAddr {
    TargetAddr::Ip(addr)
}

/// A daemon with the stats endpoint on an ephemeral port; returns it and that address.
fn daemon_with_stats(server: &str) -> (Daemon, SocketAddr) {
    let mut daemon = Daemon::start(&format!(
        "[server]\nbind_port = 0\n{server}\n[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n"
    ));
    let line = daemon.await_log("stats endpoint listening");
    let stats = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line:?}"));
    (daemon, stats)
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect to stats");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.expect("response");
    let text = String::from_utf8(all).expect("utf8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

async fn server_stats(stats: SocketAddr) -> Value {
    let body = http_get(stats, "/api/pool/stats").await;
    let json: Value = serde_json::from_str(&body).expect("JSON");
    json["server"].clone()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd").count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_associations_and_bind_waits_then_exits_0() {
    let mut daemon = Daemon::start("[server]\nbind_port = 0\nshutdown_grace_secs = 30\n");
    let echo = UdpEcho::start().await;
    let association = Association::open(daemon.addr).await;
    assert_eq!(association.round_trip(to(echo.addr), b"before", echo.addr).await, b"before");
    let expected = TargetAddr::Ip("127.0.0.1:0".parse().expect("addr"));
    let (mut bind_control, first) = raw_request(daemon.addr, Command::Bind, expected).await;
    assert_eq!(first.code, 0);

    daemon.signal(libc::SIGTERM);
    daemon.await_log("draining sessions");
    // Still served while draining: the association relays, the BIND's peer gets in.
    assert_eq!(association.round_trip(to(echo.addr), b"draining", echo.addr).await, b"draining");
    let mut peer = TcpStream::connect(first.bound).await.expect("the BIND port still listens");
    let second = read_raw_reply(&mut bind_control).await;
    assert_eq!((second.code, second.bound), (0, peer.local_addr().expect("addr")));
    peer.write_all(b"late peer").await.expect("write");
    let mut got = [0u8; 9];
    bind_control.read_exact(&mut got).await.expect("relayed");
    assert_eq!(&got, b"late peer");

    // Both end on their own: the daemon exits at once, long before the 30 s grace.
    association.close().await;
    drop((peer, bind_control));
    let status = tokio::task::spawn_blocking(move || {
        let status = daemon.wait();
        (status, daemon.rest_of_log())
    });
    let (status, log) = status.await.expect("wait");
    assert_eq!(status.code(), Some(0), "{log:?}");
    assert!(!log.iter().any(|line| line.contains("cutting")), "nothing was cut: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_associations_and_bind_waits_are_cut_and_their_ports_freed() {
    let mut daemon = Daemon::start("[server]\nbind_port = 0\nshutdown_grace_secs = 1\n");
    let echo = UdpEcho::start().await;
    let mut association = Association::open(daemon.addr).await;
    assert_eq!(association.round_trip(to(echo.addr), b"x", echo.addr).await, b"x");
    let expected = TargetAddr::Ip("127.0.0.1:0".parse().expect("addr"));
    let (mut bind_control, first) = raw_request(daemon.addr, Command::Bind, expected).await;

    daemon.signal(libc::SIGTERM);
    let cut = read_raw_reply(&mut bind_control).await;
    assert_eq!(cut.code, 0x01, "a BIND cut at shutdown gets a general failure");
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), association.control.read_to_end(&mut rest))
            .await
            .expect("the association's control connection is closed");
    assert!(closed.is_ok() && rest.is_empty());
    let status = tokio::task::spawn_blocking(move || daemon.wait()).await.expect("wait");
    assert_eq!(status.code(), Some(0));
    UdpSocket::bind(association.relay).await.expect("relay port free");
    tokio::net::TcpListener::bind(first.bound).await.expect("BIND port free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_are_dropped_and_counted_with_memory_flat() {
    let (daemon, stats) = daemon_with_stats("");
    let pid = daemon.child.id();
    let echo = UdpEcho::start().await;
    let association = Association::open(daemon.addr).await;
    // Warm up: buffers, allocator arenas, the outbound socket.
    for _ in 0..500 {
        association.round_trip(to(echo.addr), b"warm", echo.addr).await;
    }
    let big = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let big_addr = big.local_addr().expect("addr");
    association.send(to(big_addr), b"hello").await;
    let mut buf = vec![0u8; 70_000];
    let (_, outbound) = big.recv_from(&mut buf).await.expect("reached");
    big.send_to(b"ok", outbound).await.expect("send");
    association.recv().await;

    let (rss_before, fds_before) = (rss_kib(pid), fd_count(pid));
    let stranger = UdpSocket::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
    let neighbour = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let foreign = datagram(to(echo.addr), &[0u8; 1024]);
    let mut fragment = datagram(to(echo.addr), &[0u8; 1024]);
    fragment[2] = 1;
    let oversized = vec![7u8; 65_507];
    let rounds = 2_000;
    // Bursts paced by a round trip through both of the association's sockets, so no datagram
    // is lost in a kernel buffer and every drop can be counted exactly: each socket's
    // datagrams are handled in order, so the echo's answer comes back only after the proxy
    // has read every datagram sent before it, on the relay socket (client to destination)
    // and on the outbound socket (its answer). Pacing by a datagram to the outbound socket
    // alone let the relay socket fall behind on a busy CI machine (19,910 of 20,000 foreign
    // datagrams arrived), and so did bursts of 25 (19,822).
    let per_round = 5;
    for _ in 0..rounds {
        for _ in 0..per_round {
            stranger.send_to(&foreign, association.relay).await.expect("send");
            neighbour.send_to(&foreign, association.relay).await.expect("send");
            association.send_raw(&fragment).await;
            association.send_raw(&[0, 0, 0, 9, 1]).await;
        }
        for _ in 0..2 {
            big.send_to(&oversized, outbound).await.expect("send big");
        }
        assert_eq!(association.round_trip(to(echo.addr), b"sync", echo.addr).await, b"sync");
    }
    assert_eq!(association.round_trip(to(echo.addr), b"after", echo.addr).await, b"after");
    let (rss_after, fds_after) = (rss_kib(pid), fd_count(pid));
    let udp = &server_stats(stats).await["udp"];
    let dropped = &udp["dropped"];
    assert_eq!(dropped["foreign_source"], 2 * per_round * rounds);
    assert_eq!(dropped["fragment"], per_round * rounds);
    assert_eq!(dropped["malformed"], per_round * rounds);
    assert_eq!(dropped["too_large"], 2 * rounds);
    assert_eq!(dropped["would_block"], 0);
    eprintln!(
        "daemon RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}, after {} hostile datagrams",
        (4 * per_round + 2) * rounds
    );
    assert_eq!(fds_after, fds_before);
    assert!(
        rss_after <= rss_before + 512,
        "memory grew with hostile traffic: {rss_before} -> {rss_after} KiB"
    );
    association.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_associations_leave_descriptors_and_counters_where_they_started() {
    let (daemon, stats) = daemon_with_stats("");
    let pid = daemon.child.id();
    let echo = UdpEcho::start().await;
    let warm = Association::open(daemon.addr).await;
    warm.round_trip(to(echo.addr), b"warm", echo.addr).await;
    warm.close().await;
    // Counted before each stats request: the endpoint's own connection is not ours to count.
    let fds_before = fd_count(pid);
    let before = server_stats(stats).await;

    let proxy = daemon.addr;
    let mut batches = tokio::task::JoinSet::new();
    for _ in 0..8 {
        batches.spawn(async move {
            for i in 0..125u32 {
                let association = Association::open(proxy).await;
                let payload = i.to_be_bytes();
                assert_eq!(
                    association.round_trip(to(echo.addr), &payload, echo.addr).await,
                    payload
                );
                association.close().await;
            }
        });
    }
    while let Some(done) = batches.join_next().await {
        done.expect("a batch of associations");
    }
    assert_eq!(fd_count(pid), fds_before, "descriptors where they started");
    let after = server_stats(stats).await;
    let delta = |path: &[&str]| {
        let pick = |v: &Value| {
            path.iter().fold(v.clone(), |v, key| v[key].clone()).as_u64().expect("number")
        };
        pick(&after) - pick(&before)
    };
    assert_eq!(delta(&["udp", "associations_total"]), 1000);
    assert_eq!(delta(&["udp", "datagrams_client_to_destination"]), 1000);
    assert_eq!(delta(&["udp", "datagrams_destination_to_client"]), 1000);
    assert_eq!(delta(&["sessions_by_command", "udp_associate"]), 1000);
    assert_eq!(after["udp"]["associations_active"], 0);
    assert_eq!(after["sessions_active"], 0);
    assert_eq!(after["udp"]["dropped"], before["udp"]["dropped"], "nothing dropped");
}

/// The counters in `/api/pool/stats`' server section and in `/metrics`, which promtool
/// accepts (`promtool check metrics`; skipped without promtool outside CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_udp_and_bind_in_json_and_in_prometheus_text_promtool_accepts() {
    let (daemon, stats) = daemon_with_stats("bind_timeout_secs = 1");
    let echo = UdpEcho::start().await;
    let association = Association::open(daemon.addr).await;
    association.round_trip(to(echo.addr), b"12345", echo.addr).await;
    let mut fragment = datagram(to(echo.addr), b"f");
    fragment[2] = 2;
    association.send_raw(&fragment).await;
    association.round_trip(to(echo.addr), b"sync", echo.addr).await;
    let expected = TargetAddr::Ip("127.0.0.1:0".parse().expect("addr"));
    let (mut waiting, _) = raw_request(daemon.addr, Command::Bind, expected.clone()).await;
    assert_eq!(read_raw_reply(&mut waiting).await.code, 0x06, "timed out");

    let server = server_stats(stats).await;
    assert_eq!(server["sessions_by_command"]["udp_associate"], 1);
    assert_eq!(server["sessions_by_command"]["bind"], 1);
    assert_eq!(server["udp"]["associations_active"], 1);
    assert_eq!(server["udp"]["datagrams_client_to_destination"], 2);
    assert_eq!(server["udp"]["bytes_destination_to_client"], 9);
    assert_eq!(server["udp"]["dropped"]["fragment"], 1);
    assert_eq!(server["bind"]["outcomes"]["timed_out"], 1);
    assert_eq!(server["bind"]["waits_active"], 0);

    let text = http_get(stats, "/metrics").await;
    for line in [
        "poolsocks_command_sessions_total{command=\"udp_associate\"} 1",
        "poolsocks_command_sessions_total{command=\"bind\"} 1",
        "poolsocks_udp_associations_active 1",
        "poolsocks_udp_datagrams_total{direction=\"client_to_destination\"} 2",
        "poolsocks_udp_bytes_total{direction=\"destination_to_client\"} 9",
        "poolsocks_udp_dropped_total{reason=\"fragment\"} 1",
        "poolsocks_udp_dropped_total{reason=\"foreign_source\"} 0",
        "poolsocks_bind_waits_active 0",
        "poolsocks_bind_outcomes_total{outcome=\"timed_out\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    let promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut promtool = match promtool {
        Ok(child) => child,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED promtool check: {e} (apt-get install prometheus)");
            return;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    let mut stdin = promtool.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("feed promtool");
    drop(stdin);
    let out = promtool.wait_with_output().await.expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    association.close().await;
}
