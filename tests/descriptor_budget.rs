//! Descriptors: whatever kind of session a client opens (CONNECTs to names whose server never
//! answers, UDP associations with names pending, associations talking to both families,
//! BINDs), the daemon, run at exactly the open-file limit its config asks for, keeps serving
//! CONNECTs and `/health` up to `max_connections`. Against the built binary.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::sync::atomic::Ordering;

use common::daemon::{Daemon, EVENT_DEADLINE};
use common::dns::TestDns;
use common::udp::{raw_request, Association, UdpEcho};
use poolsocks::config::Config;
use poolsocks::socks::{Command, ReplyCode, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_CONNECTIONS: usize = 100;

fn config_text(dns: SocketAddr) -> String {
    format!(
        "[server]\nbind_port = 0\nmax_connections = {MAX_CONNECTIONS}\n\
         connect_phase_timeout_ms = 60000\n[server.dns]\nservers = [\"{dns}\"]\n\
         timeout_ms = 60000\n[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n"
    )
}

/// The daemon with its open-file limit (soft and hard) at exactly what its config asks for.
fn start_at_its_limit(text: &str) -> (Daemon, u64) {
    let config = Config::from_toml(text, None).expect("valid config");
    let needed = poolsocks::server::fd_limit::descriptors_needed(&config);
    let daemon = Daemon::start_with(text, |command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: needed, rlim_max: needed };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    (daemon, needed)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Ten CONNECTs by address at once, each echoing a byte, and `/health`: what everyone else
/// needs while one client holds the rest of `max_connections`.
async fn everyone_else_is_served(proxy: SocketAddr, echo: SocketAddr, stats: SocketAddr) {
    // Without descriptors the accept loop backs off and clients wait in the kernel's queue.
    let served = tokio::time::timeout(EVENT_DEADLINE, serve_ten_and_health(proxy, echo, stats));
    served.await.expect("served within the deadline");
}

async fn serve_ten_and_health(proxy: SocketAddr, echo: SocketAddr, stats: SocketAddr) {
    let mut held = Vec::new();
    for i in 0..10u8 {
        let (mut stream, reply) = common::connect(proxy, echo.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded, "CONNECT {i} refused");
        assert_eq!(common::round_trip(&mut stream, &[i]).await, [i]);
        held.push(stream);
    }
    assert!(
        common::http_get(stats, "/health").await.starts_with("HTTP/1.1 200"),
        "/health answers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_pending_on_a_silent_server_cannot_exhaust_descriptors() {
    let dns = TestDns::start(&[]).await;
    let echo = common::EchoServer::start().await;
    let (mut daemon, limit) = start_at_its_limit(&config_text(dns.addr));
    let stats = daemon.await_stats_addr();
    let pid = daemon.child.id();

    // 20 associations, each with 4 names pending, and 60 CONNECTs to names never answered:
    // 80 of the 100 sessions.
    let mut associations = Vec::new();
    for a in 0..20 {
        let association = Association::open(daemon.addr).await;
        for n in 0..4 {
            let name = TargetAddr::Domain(format!("slow-{a}-{n}.test"), 53);
            association.send(name, b"q").await;
        }
        associations.push(association);
    }
    let mut connects = Vec::new();
    for c in 0..60 {
        let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
        let target = TargetAddr::Domain(format!("slow-connect-{c}.test"), 80);
        let mut bytes = vec![5, 1, 0];
        poolsocks::socks::Request { command: Command::Connect, target }.write_to(&mut bytes);
        stream.write_all(&bytes).await.expect("greeting and request");
        connects.push(stream);
    }
    common::udp::eventually("the silent server is asked", || {
        dns.queries.load(Ordering::Relaxed) >= 40
    })
    .await;

    everyone_else_is_served(daemon.addr, echo.addr, stats).await;
    let open = open_fds(pid) as u64;
    eprintln!("descriptors open: {open} of {limit}");
    assert!(open < limit, "{open} of {limit}");
    drop((associations, connects));
}

#[tokio::test(flavor = "multi_thread")]
async fn associations_talking_to_both_families_cannot_exhaust_descriptors() {
    let dns = TestDns::start(&[]).await;
    let echo = common::EchoServer::start().await;
    let udp_echo = UdpEcho::start().await;
    let (mut daemon, limit) = start_at_its_limit(&config_text(dns.addr));
    let stats = daemon.await_stats_addr();
    let pid = daemon.child.id();

    // 85 associations, each with an outbound socket per family: more than the descriptors
    // left beyond two per session can hold, so the last ones are refused, not everyone else.
    let v6 = TargetAddr::Ip(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 9));
    let mut associations = Vec::new();
    let mut refused = 0;
    for _ in 0..85 {
        let (control, reply) =
            raw_request(daemon.addr, Command::UdpAssociate, TargetAddr::unspecified()).await;
        if reply.code != 0 {
            assert_eq!(reply.code, 0x01, "refused with a general failure");
            refused += 1;
            continue;
        }
        let local = control.local_addr().expect("local").ip();
        let socket = tokio::net::UdpSocket::bind(SocketAddr::new(local, 0)).await.expect("bind");
        let association = Association { control, relay: reply.bound, socket, reply };
        association.round_trip(udp_echo.addr.into(), b"v4", udp_echo.addr).await;
        association.send(v6.clone(), b"v6").await;
        associations.push(association);
    }
    eprintln!("associations open: {}, refused: {refused}", associations.len());

    everyone_else_is_served(daemon.addr, echo.addr, stats).await;
    let open = open_fds(pid) as u64;
    eprintln!("descriptors open: {open} of {limit}");
    assert!(open < limit, "{open} of {limit}");
}

/// A BIND from `source` (a loopback address) naming 127.0.0.1; the first reply's code.
async fn bind_from(proxy: SocketAddr, source: &str) -> (TcpStream, u8) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source.parse().expect("ip"), 0)).expect("bind source");
    let mut control = socket.connect(proxy).await.expect("connect");
    let mut bytes = vec![5, 1, 0];
    let target = TargetAddr::Ip("127.0.0.1:20".parse().expect("addr"));
    poolsocks::socks::Request { command: Command::Bind, target }.write_to(&mut bytes);
    control.write_all(&bytes).await.expect("greeting and request");
    let mut method = [0u8; 2];
    control.read_exact(&mut method).await.expect("method");
    let reply = common::udp::read_raw_reply(&mut control).await;
    (control, reply.code)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_cannot_hold_more_than_its_share_of_bind_ports() {
    let dns = TestDns::start(&[]).await;
    let echo = common::EchoServer::start().await;
    let (mut daemon, _) = start_at_its_limit(&config_text(dns.addr));
    let stats = daemon.await_stats_addr();
    let mut waiting = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let (control, code) = bind_from(daemon.addr, "127.0.0.1").await;
        match code {
            0 => waiting.push(control),
            0x01 => refused += 1,
            other => panic!("BIND answered {other:#x}"),
        }
    }
    assert_eq!((waiting.len(), refused), (16, 24), "16 waits per client, the rest refused");
    let (_other, code) = bind_from(daemon.addr, "127.0.0.2").await;
    assert_eq!(code, 0, "another client still gets a BIND");
    everyone_else_is_served(daemon.addr, echo.addr, stats).await;
    drop(waiting);
}
