//! `[server] proxy_protocol`: the daemon behind a balancer, with headers written by the test
//! (ppp's builder for v2, text for v1) from chosen loopback source addresses. The header's
//! address must be the client for access rules and the log span; untrusted sources and
//! missing, invalid or late headers are closed and counted. Also `shutdown_delay_ms`.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::daemon::Daemon;
use common::fleet::{connect_from, http_get, pool_stats};
use common::{round_trip, EchoServer};
use poolsocks::socks::{Command, Reply, ReplyCode, Request};
use ppp::v2::{Builder, Command as PpCommand, Protocol, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn v2_header(source: &str, destination: SocketAddr) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    Builder::with_addresses(
        Version::Two | PpCommand::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

fn v2_local() -> Vec<u8> {
    Builder::with_addresses(
        Version::Two | PpCommand::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

/// Sends `header` then a no-auth CONNECT to `target`; the reply, or `None` if closed first.
async fn connect_with_header(
    stream: &mut TcpStream,
    header: &[u8],
    target: SocketAddr,
) -> Option<Reply> {
    let mut bytes = header.to_vec();
    bytes.extend([5, 1, 0]);
    stream.write_all(&bytes).await.ok()?;
    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await.ok()?;
    let mut buf = Vec::new();
    Request { command: Command::Connect, target: target.into() }.write_to(&mut buf);
    stream.write_all(&buf).await.ok()?;
    Reply::read_from(stream).await.ok()
}

async fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte).await, Ok(0) | Err(_))
}

fn proxied_daemon(extra: &str) -> (Daemon, SocketAddr) {
    let mut daemon = Daemon::start(&format!(
        "[server]
bind_port = 0
proxy_protocol = true
proxy_protocol_trusted = [\"127.0.0.5/32\"]
handshake_timeout_ms = 300
{extra}
[sessions]
stats_api_enabled = true
stats_api_port = 0

[logging]
level = \"poolsocks=debug,info\"
"
    ));
    let stats = daemon.await_stats_addr();
    (daemon, stats)
}

#[tokio::test]
async fn the_headers_address_is_the_client_for_access_rules_and_the_span() {
    let (mut daemon, _stats) =
        proxied_daemon("[access]\nclient_networks = [\"127.0.0.9/32\", \"127.0.0.5/32\"]\n");
    let echo = EchoServer::start().await;
    let balancer = ip("127.0.0.5");

    // v2 from the trusted balancer, for client 127.0.0.9: served, and logged as that client.
    let mut stream = connect_from(balancer, daemon.addr).await.unwrap();
    let via = stream.local_addr().unwrap();
    let reply =
        connect_with_header(&mut stream, &v2_header("127.0.0.9:4000", daemon.addr), echo.addr)
            .await
            .expect("served");
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"through the balancer").await, b"through the balancer");
    let line = daemon.await_log("connected");
    assert!(line.contains("peer=127.0.0.9:4000"), "{line}");
    assert!(line.contains(&format!("via={via}")), "{line}");

    // v1 for a client outside client_networks: closed without a reply, as that client.
    let mut stream = connect_from(balancer, daemon.addr).await.unwrap();
    let header = format!("PROXY TCP4 192.0.2.1 127.0.0.1 5000 {}\r\n", daemon.addr.port());
    assert!(connect_with_header(&mut stream, header.as_bytes(), echo.addr).await.is_none());
    let line = daemon.await_log("not allowed by access.client_networks");
    assert!(line.contains("peer=192.0.2.1:5000"), "{line}");

    // LOCAL: the balancer speaks for itself and is judged as 127.0.0.5 (allowed here).
    let mut stream = connect_from(balancer, daemon.addr).await.unwrap();
    let reply = connect_with_header(&mut stream, &v2_local(), echo.addr).await.expect("served");
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let line = daemon.await_log("connected");
    assert!(line.contains("peer=127.0.0.5:"), "{line}");
}

#[tokio::test]
async fn untrusted_sources_and_missing_or_late_headers_are_closed_and_counted() {
    let (mut daemon, stats) = proxied_daemon("");
    let echo = EchoServer::start().await;

    // A valid header from a source that is not a trusted balancer: anyone could claim anything.
    let mut stream = connect_from(ip("127.0.0.1"), daemon.addr).await.unwrap();
    assert!(connect_with_header(&mut stream, &v2_header("127.0.0.9:1", daemon.addr), echo.addr)
        .await
        .is_none());
    let line = daemon.await_log("not in server.proxy_protocol_trusted");
    assert!(line.contains("via=127.0.0.1:"), "{line}");

    // The balancer, but no header: a plain SOCKS greeting.
    let mut stream = connect_from(ip("127.0.0.5"), daemon.addr).await.unwrap();
    stream.write_all(&[5, 1, 0]).await.unwrap();
    assert!(closed(&mut stream).await);
    daemon.await_log("did not start with a PROXY protocol header");

    // Half a header that never completes: cut by the handshake timeout (300 ms).
    let mut stream = connect_from(ip("127.0.0.5"), daemon.addr).await.unwrap();
    stream.write_all(&v2_header("127.0.0.9:1", daemon.addr)[..20]).await.unwrap();
    assert!(closed(&mut stream).await);
    daemon.await_log("PROXY protocol header timed out");

    let server = &pool_stats(stats).await["server"];
    assert_eq!(server["proxy_untrusted"], 1, "{server}");
    assert_eq!(server["proxy_header_invalid"], 2, "{server}");
    assert_eq!(server["sessions_total"], 0, "{server}");
    let (_, metrics) = http_get(stats, "/metrics").await.unwrap();
    assert!(
        metrics.contains("poolsocks_proxy_protocol_rejected_total{reason=\"untrusted_source\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("poolsocks_proxy_protocol_rejected_total{reason=\"invalid_header\"} 2"),
        "{metrics}"
    );
}

/// Off (the default), nothing changes: a PROXY header is just a bad SOCKS greeting.
#[tokio::test]
async fn off_by_default_a_header_is_not_understood() {
    let mut daemon = Daemon::start("[server]\nbind_port = 0\nhandshake_timeout_ms = 300\n");
    let echo = EchoServer::start().await;
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    assert!(connect_with_header(&mut stream, b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n", echo.addr)
        .await
        .is_none());
    let line = daemon.await_log("handshake failed");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
}

/// `shutdown_delay_ms`: after SIGTERM `/health` answers 503 at once, but the listener still
/// serves new clients until the delay ends; then the daemon drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_keeps_serving_while_health_says_503() {
    let mut daemon = Daemon::start(
        "[server]\nbind_port = 0\nshutdown_delay_ms = 3000\n[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n",
    );
    let stats = daemon.await_stats_addr();
    let echo = EchoServer::start().await;
    assert_eq!(http_get(stats, "/health").await.unwrap().0, 200);
    daemon.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| daemon.await_log("still accepting until the delay ends"));
    let (status, body) = http_get(stats, "/health").await.unwrap();
    assert_eq!(status, 503, "{body}");
    let (mut stream, reply) = common::connect(daemon.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"late but served").await, b"late but served");
    drop(stream);
    // Blocking waits off the runtime's threads: the echo server must still run meanwhile.
    tokio::task::block_in_place(|| daemon.await_log("shut down"));
    assert!(tokio::task::block_in_place(|| daemon.wait()).success());
}
