//! RFC 1928 / RFC 1929 behaviour of the daemon over real sockets.

mod common;

use std::net::SocketAddr;

use common::*;
use poolsocks::config::{SocksMethod, UserConfig};
use poolsocks::secret::Secret;
use poolsocks::socks::{
    Command, ReplyCode, TargetAddr, METHOD_NO_ACCEPTABLE, METHOD_NO_AUTH, METHOD_USERPASS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn connect_to_ipv4_relays_bytes_and_reports_the_upstream_source_address() {
    let mut echo = EchoServer::start().await;
    let proxy = TestProxy::start(test_config()).await;

    let (mut stream, reply) = connect(proxy.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let upstream_peer = echo.accepted.recv().await.expect("upstream accepted");
    // BND.ADDR is the proxy's end of the upstream connection, as the destination saw it.
    assert_eq!(reply.bound, TargetAddr::Ip(upstream_peer));
    assert_eq!(round_trip(&mut stream, b"hello through ipv4").await, b"hello through ipv4");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_ipv6_relays_bytes() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    };
    drop(listener);
    let echo = EchoServer::start_on("[::1]:0").await;
    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, reply) = connect(proxy.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"hello through ipv6").await, b"hello through ipv6");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_a_domain_resolves_and_tries_each_address() {
    // Only 127.0.0.1 listens; if `localhost` also resolves to ::1 and that is tried first, it is
    // refused and the proxy must go on to the next address.
    let mut echo = EchoServer::start().await;
    let proxy = TestProxy::start(test_config()).await;
    let target = TargetAddr::Domain("localhost".into(), echo.addr.port());
    let (mut stream, reply) = connect(proxy.addr, target).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert!(echo.accepted.recv().await.is_some());
    assert_eq!(round_trip(&mut stream, b"hello by name").await, b"hello by name");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn refused_connection_gets_reply_0x05_then_close() {
    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, reply) = connect(proxy.addr, closed_port().await.into()).await;
    assert_eq!(reply.code, ReplyCode::ConnectionRefused);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

#[tokio::test]
async fn unresolvable_name_gets_host_unreachable_0x04() {
    let proxy = TestProxy::start(test_config()).await;
    // `.invalid` is reserved (RFC 6761): it never resolves.
    let target = TargetAddr::Domain("poolsocks-test.invalid".into(), 80);
    let (mut stream, reply) = connect(proxy.addr, target).await;
    assert_eq!(reply.code, ReplyCode::HostUnreachable);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

#[tokio::test]
async fn connect_timeout_gets_ttl_expired_0x06() {
    // A listener with a full accept queue: the kernel drops further SYNs, so connect() hangs
    // exactly as it does towards a host that never answers.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let blackhole = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            TcpStream::connect(blackhole),
        )
        .await
        {
            fillers.push(stream);
        }
    }

    let mut config = test_config();
    config.server.pool.connect_timeout_ms = 300;
    let proxy = TestProxy::start(config).await;
    let (mut stream, reply) = connect(proxy.addr, blackhole.into()).await;
    assert_eq!(reply.code, ReplyCode::TtlExpired);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

#[tokio::test]
async fn bind_and_udp_associate_turned_off_get_command_not_supported_0x07() {
    // Both are served by default (tests/bind.rs, tests/udp_associate.rs); off, they get 0x07.
    let mut config = test_config();
    config.server.bind = false;
    config.server.udp_associate = false;
    let proxy = TestProxy::start(config).await;
    for command in [Command::Bind, Command::UdpAssociate] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        greet(&mut stream, &[METHOD_NO_AUTH]).await;
        let reply = request(
            &mut stream,
            command,
            "127.0.0.1:80".parse::<SocketAddr>().expect("addr").into(),
        )
        .await;
        assert_eq!(reply.code, ReplyCode::CommandNotSupported, "{command:?}");
        assert!(closed_without_data(&mut stream).await);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_command_gets_0x07_and_unknown_address_type_gets_0x08() {
    let proxy = TestProxy::start(test_config()).await;

    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    greet(&mut stream, &[METHOD_NO_AUTH]).await;
    stream.write_all(&[5, 0x09, 0, 1, 127, 0, 0, 1, 0, 80]).await.expect("write");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.expect("reply");
    assert_eq!(reply[1], ReplyCode::CommandNotSupported as u8);
    assert!(closed_without_data(&mut stream).await);

    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    greet(&mut stream, &[METHOD_NO_AUTH]).await;
    stream.write_all(&[5, 1, 0, 0x05, 1, 2, 3, 4, 0, 80]).await.expect("write");
    stream.read_exact(&mut reply).await.expect("reply");
    assert_eq!(reply[1], ReplyCode::AddressTypeNotSupported as u8);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

#[tokio::test]
async fn empty_domain_name_gets_general_failure_0x01() {
    let proxy = TestProxy::start(test_config()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    greet(&mut stream, &[METHOD_NO_AUTH]).await;
    stream.write_all(&[5, 1, 0, 3, 0, 0, 80]).await.expect("write");
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await.expect("reply");
    assert_eq!(reply[1], ReplyCode::GeneralFailure as u8);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

fn userpass_config() -> poolsocks::config::Config {
    let mut config = test_config();
    config.auth.socks_method = Some(SocksMethod::Userpass);
    config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new("s3cret!") }];
    config
}

#[tokio::test]
async fn username_password_success_then_connect() {
    let echo = EchoServer::start().await;
    let proxy = TestProxy::start(userpass_config()).await;
    let (mut stream, reply) =
        connect_with_password(proxy.addr, echo.addr.into(), "alice", "s3cret!").await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"authenticated").await, b"authenticated");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_or_user_gets_failure_status_then_close() {
    let proxy = TestProxy::start(userpass_config()).await;
    for (user, password) in [("alice", "wrong"), ("mallory", "s3cret!"), ("", "")] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
        assert!(!authenticate(&mut stream, user, password).await.success, "{user}/{password}");
        assert!(closed_without_data(&mut stream).await);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn client_without_an_acceptable_method_gets_0xff_then_close() {
    let proxy = TestProxy::start(userpass_config()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(greet(&mut stream, &[METHOD_NO_AUTH]).await.method, METHOD_NO_ACCEPTABLE);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;

    // And the other way round: a no-auth server does not accept a client that only offers userpass.
    let proxy = TestProxy::start(test_config()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_NO_ACCEPTABLE);
    assert!(closed_without_data(&mut stream).await);
    proxy.stop().await;
}

#[tokio::test]
async fn data_pipelined_in_the_same_segment_as_connect_reaches_the_destination() {
    let echo = EchoServer::start().await;
    let proxy = TestProxy::start(test_config()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    // Greeting, request and payload in one write: one segment on loopback.
    let mut wire = vec![5, 1, METHOD_NO_AUTH];
    poolsocks::socks::Request { command: Command::Connect, target: echo.addr.into() }
        .write_to(&mut wire);
    wire.extend_from_slice(b"early bytes");
    stream.write_all(&wire).await.expect("write all at once");

    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await.expect("selection");
    assert_eq!(selection, [5, METHOD_NO_AUTH]);
    let reply = poolsocks::socks::Reply::read_from(&mut stream).await.expect("reply");
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let mut echoed = [0u8; 11];
    stream.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"early bytes");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn client_half_close_still_receives_the_whole_response() {
    // The upstream reads the request to EOF, then answers and closes: it only answers once the
    // proxy has propagated the client's FIN, and the client must still get every byte.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let response: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let expected = response.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.expect("read request to EOF");
        assert_eq!(request, b"request then FIN");
        stream.write_all(&response).await.expect("respond");
    });

    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, reply) = connect(proxy.addr, upstream.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    stream.write_all(b"request then FIN").await.expect("write");
    stream.shutdown().await.expect("half-close");
    let received = read_to_end(&mut stream).await.expect("read response");
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "response corrupted");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_half_close_lets_the_client_keep_sending() {
    // The upstream sends a greeting, shuts down its write side, then still reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(b"bye-for-now").await.expect("greeting");
        stream.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read");
        let _ = got_tx.send(rest);
    });

    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, _) = connect(proxy.addr, upstream.into()).await;
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.expect("greeting then EOF");
    assert_eq!(greeting, b"bye-for-now");
    stream.write_all(b"still talking").await.expect("write after upstream FIN");
    stream.shutdown().await.expect("close");
    assert_eq!(got_rx.await.expect("upstream got data"), b"still talking");
    proxy.stop().await;
}

/// A name whose first address silently drops SYNs (an nftables rule in a namespace of the
/// test's own) and whose second has a live server: the CONNECT succeeds through the second
/// after the attempt delay, not after the 30 s per-address timeout, and the attempt still
/// waiting on the first is closed (no SYN-SENT socket is left).
#[test]
fn a_name_whose_first_address_drops_syns_connects_through_the_next_at_once() {
    happy_eyeballs_through("he4", "127.0.0.2", "127.0.0.3");
}

/// The same across families: `::1` drops SYNs, 127.0.0.1 answers.
#[test]
fn a_name_whose_ipv6_address_drops_syns_connects_over_ipv4() {
    happy_eyeballs_through("he6", "::1", "127.0.0.1");
}

fn happy_eyeballs_through(tag: &str, dropping: &str, live: &str) {
    use common::netns::LoopbackNs;
    use std::net::IpAddr;
    use std::time::{Duration, Instant};
    // Far below the per-address timeout (30 s): the CONNECT must not wait for it.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);
    if !common::real::available("nft", "nftables") || !common::real::available("ss", "iproute2") {
        return;
    }
    let ns = match LoopbackNs::create(tag) {
        Ok(ns) => ns,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "no network namespace: {e}");
            eprintln!("SKIPPED: no network namespace ({e})");
            return;
        }
    };
    let dropping: IpAddr = dropping.parse().expect("ip");
    let live: IpAddr = live.parse().expect("ip");
    let name = ns.name.clone();
    let inside = move |program: &str, args: &[&str]| -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name, program])
            .args(args)
            .output()
            .expect("run in the namespace");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ns.run(move || async move {
        let server =
            TcpListener::bind(SocketAddr::new(live, 0)).await.expect("bind the live server");
        let port = server.local_addr().expect("addr").port();
        let family = if dropping.is_ipv4() { "ip" } else { "ip6" };
        inside("nft", &["add", "table", "inet", "t"]);
        inside(
            "nft",
            &["add", "chain", "inet", "t", "in", "{ type filter hook input priority 0; }"],
        );
        let rule = format!("{family} daddr {dropping} tcp dport {port} counter drop");
        let rule: Vec<&str> = rule.split(' ').collect();
        inside("nft", &[&["add", "rule", "inet", "t", "in"][..], &rule].concat());

        let mut config = test_config();
        config.server.pool.enabled = false;
        config.server.pool.connect_timeout_ms = 30_000;
        config.server.connect_phase_timeout_ms = 60_000;
        let resolver = StaticResolver::new().with("eyeballs.test", [dropping, live]);
        let proxy = TestProxy::start_with_resolver(config, resolver).await;
        let started = Instant::now();
        let target = TargetAddr::Domain("eyeballs.test".into(), port);
        let (mut stream, reply) = tokio::time::timeout(TEST_DEADLINE, connect(proxy.addr, target))
            .await
            .expect("the CONNECT was answered long before the per-address timeout");
        let took = started.elapsed();
        assert_eq!(reply.code, ReplyCode::Succeeded);
        let (mut accepted, _) = server.accept().await.expect("the live server accepted");
        eprintln!("CONNECT through a SYN-dropping first address took {took:?}");
        // The first attempt reached the dropping address and was dropped there...
        let counted = inside("nft", &["list", "chain", "inet", "t", "in"]);
        let packets: u64 = counted
            .split("packets ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("the rule's counter");
        assert!(packets >= 1, "no SYN reached {dropping}: {counted}");
        // ...and its socket was closed before the reply was sent.
        let waiting = inside("ss", &["-Htn", "state", "syn-sent"]);
        assert!(waiting.trim().is_empty(), "a connect attempt lingers: {waiting}");

        assert_eq!(round_trip_through(&mut stream, &mut accepted).await, b"ping");
        drop(stream);
        proxy.stop().await;
    });
}

/// Sends "ping" from the client to the server end of a relayed connection.
async fn round_trip_through(client: &mut TcpStream, server: &mut TcpStream) -> Vec<u8> {
    client.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 4];
    server.read_exact(&mut got).await.expect("read");
    got.to_vec()
}
