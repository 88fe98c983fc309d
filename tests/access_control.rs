//! Access rules and secure defaults, end to end through the SOCKS server.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use poolsocks::config::{Config, SocksMethod, UserConfig};
use poolsocks::secret::Secret;
use poolsocks::socks::{Command, ReplyCode, TargetAddr, METHOD_NO_AUTH, METHOD_USERPASS};
use poolsocks::telemetry::{EventQuery, Telemetry};
use tokio::net::{TcpListener, TcpStream};

fn with_access(toml: &str) -> Config {
    let mut config = Config::from_toml(toml, None).expect("valid config");
    config.server.handshake_timeout_ms = 500;
    config
}

async fn start(config: Config) -> (TestProxy, Telemetry) {
    let server = common::build_server(config).await.expect("build");
    let telemetry = server.telemetry();
    (TestProxy::start_server(server).await, telemetry)
}

fn denial_events(telemetry: &Telemetry) -> Vec<String> {
    telemetry
        .query(&EventQuery { category: Some("access".into()), ..EventQuery::default() })
        .into_iter()
        .map(|event| format!("{} {:?}", event.message, event.details))
        .collect()
}

#[tokio::test]
async fn a_denied_port_gets_0x02_a_telemetry_event_and_no_upstream_connection() {
    let mut echo = EchoServer::start().await;
    let config = with_access(&format!(
        "[[access.rules]]\naction = \"deny\"\nports = [{}]\n",
        echo.addr.port()
    ));
    let (proxy, telemetry) = start(config).await;
    let (mut stream, reply) = connect(proxy.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed);
    assert!(closed_without_data(&mut stream).await);
    let events = denial_events(&telemetry);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains(&echo.addr.to_string()), "{events:?}");
    proxy.stop().await;
    assert!(echo.accepted.try_recv().is_err(), "the denied destination was contacted");
}

#[tokio::test]
async fn a_name_that_resolves_into_a_denied_network_cannot_smuggle_a_connection() {
    let mut echo = EchoServer::start().await;
    let config = with_access(
        "[[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.0/8\", \"::1/128\"]\n",
    );
    let (proxy, telemetry) = start(config).await;

    let (_, reply) =
        connect(proxy.addr, TargetAddr::Domain("localhost".into(), echo.addr.port())).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "by name");
    let (_, reply) = connect(proxy.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "by address");
    let mapped: std::net::SocketAddr =
        format!("[::ffff:127.0.0.1]:{}", echo.addr.port()).parse().expect("addr");
    let (_, reply) = connect(proxy.addr, mapped.into()).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "by IPv4-mapped IPv6 address");

    assert_eq!(denial_events(&telemetry).len(), 3);
    proxy.stop().await;
    assert!(echo.accepted.try_recv().is_err(), "the denied destination was contacted");
}

#[tokio::test]
async fn a_denied_domain_suffix_is_refused_before_any_dns_lookup() {
    // `.invalid` never resolves: had the proxy looked it up, the reply would be 0x04.
    let config =
        with_access("[[access.rules]]\naction = \"deny\"\ndomains = [\"blocked.invalid\"]\n");
    let (proxy, _) = start(config).await;
    let (_, reply) =
        connect(proxy.addr, TargetAddr::Domain("www.Blocked.invalid".into(), 80)).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed);
    let (_, reply) = connect(proxy.addr, TargetAddr::Domain("unblocked.invalid".into(), 80)).await;
    assert_eq!(reply.code, ReplyCode::HostUnreachable, "other names are still resolved");
    proxy.stop().await;
}

#[tokio::test]
async fn default_deny_with_an_allow_rule() {
    let mut echo = EchoServer::start().await;
    let config = with_access(&format!(
        "[access]\ndefault_action = \"deny\"\n[[access.rules]]\naction = \"allow\"\nnetworks = [\"127.0.0.1/32\"]\nports = [{}]\n",
        echo.addr.port()
    ));
    let (proxy, _) = start(config).await;
    let (mut stream, reply) = connect(proxy.addr, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"allowed").await, b"allowed");
    assert!(echo.accepted.recv().await.is_some());
    drop(stream);
    let (_, reply) = connect(proxy.addr, closed_port().await.into()).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "another port falls to the default");
    proxy.stop().await;
}

#[tokio::test]
async fn clients_outside_client_networks_are_closed_without_a_reply() {
    let config = with_access("[access]\nclient_networks = [\"192.0.2.0/24\"]\n");
    let (proxy, telemetry) = start(config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // Send a greeting; the proxy must not answer it.
    tokio::io::AsyncWriteExt::write_all(&mut stream, &[5, 1, 0]).await.expect("write");
    assert!(closed_without_data(&mut stream).await);
    assert_eq!(denial_events(&telemetry).len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn repeated_failed_logins_lock_the_address_out_even_with_the_right_password() {
    let mut config = test_config();
    config.auth.socks_method = Some(SocksMethod::Userpass);
    config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new("right") }];
    config.auth.login_failure_limit = 3;
    let (proxy, telemetry) = start(config).await;
    let attempt = |password: &'static str| async move {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        greet(&mut stream, &[METHOD_USERPASS]).await;
        authenticate(&mut stream, "alice", password).await.success
    };
    assert!(attempt("right").await, "the right password works at first");
    for _ in 0..3 {
        assert!(!attempt("guess").await);
    }
    assert!(!attempt("right").await, "locked out after 3 failures");
    let events =
        telemetry.query(&EventQuery { category: Some("auth".into()), ..EventQuery::default() });
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(!format!("{events:?}").contains("right"), "no password in telemetry");
    proxy.stop().await;
}

// Listeners beyond loopback: this host is no destination unless a rule names it ---------------

/// A server listening on `bind` (port 0), with a user `alice` and `access` (TOML) as its
/// `[access]` part, and the address its clients dial (loopback, whatever `bind` is).
async fn listening_on(bind: &str, access: &str) -> (TestProxy, SocketAddr, Option<SocketAddr>) {
    let config = with_access(&format!(
        "[server]\nbind_address = \"{bind}\"\nbind_port = 0\n\
         [[auth.users]]\nusername = \"alice\"\npassword = \"pw-alice\"\n\
         [sessions]\nstats_api_enabled = true\nstats_api_port = 0\n{access}"
    ));
    let server = common::build_server(config).await.expect("build");
    let stats = server.stats_addr();
    let listener = TcpListener::bind(format!("{bind}:0")).await.expect("bind proxy");
    let proxy = TestProxy::start_server_on(server, listener).await;
    let dial = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), proxy.addr.port());
    (proxy, dial, stats)
}

async fn connect_as_alice(proxy: SocketAddr, target: TargetAddr) -> (TcpStream, ReplyCode) {
    let (stream, reply) = connect_with_password(proxy, target, "alice", "pw-alice").await;
    (stream, reply.code)
}

#[tokio::test]
async fn a_listener_beyond_loopback_keeps_logged_in_users_off_this_host_by_default() {
    let mut echo = EchoServer::start().await;
    for pool in ["false", "true"] {
        let (proxy, dial, stats) =
            listening_on("0.0.0.0", &format!("[server.pool]\nenabled = {pool}\n")).await;
        let stats = stats.expect("stats endpoint bound");
        let port = echo.addr.port();
        for target in [
            TargetAddr::Ip(echo.addr),
            TargetAddr::Domain("localhost".into(), port),
            TargetAddr::Ip(format!("[::ffff:127.0.0.1]:{port}").parse().expect("addr")),
            TargetAddr::Ip(SocketAddr::new(Ipv4Addr::new(127, 0, 0, 2).into(), port)),
            TargetAddr::Ip(stats),
        ] {
            let (mut stream, code) = connect_as_alice(dial, target.clone()).await;
            assert_eq!(code, ReplyCode::NotAllowed, "pool {pool}: {target}");
            assert!(closed_without_data(&mut stream).await);
        }
        proxy.stop().await;
    }
    assert!(echo.accepted.try_recv().is_err(), "a denied destination was contacted");
}

#[tokio::test]
async fn an_allow_rule_naming_loopback_opens_it_and_one_without_networks_does_not() {
    let mut echo = EchoServer::start().await;
    let (proxy, dial, _) = listening_on(
        "0.0.0.0",
        "[[access.rules]]\naction = \"allow\"\nnetworks = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let (mut stream, code) = connect_as_alice(dial, echo.addr.into()).await;
    assert_eq!(code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"named").await, b"named");
    assert!(echo.accepted.recv().await.is_some());
    drop(stream);
    proxy.stop().await;

    // Allowing a port is no statement about this host: the built-in deny still holds.
    let (proxy, dial, _) = listening_on(
        "0.0.0.0",
        &format!("[[access.rules]]\naction = \"allow\"\nports = [{}]\n", echo.addr.port()),
    )
    .await;
    let (_, code) = connect_as_alice(dial, echo.addr.into()).await;
    assert_eq!(code, ReplyCode::NotAllowed);
    proxy.stop().await;
    assert!(echo.accepted.try_recv().is_err(), "the denied destination was contacted");
}

#[tokio::test]
async fn a_loopback_listener_reaches_this_host_without_rules() {
    let mut echo = EchoServer::start().await;
    let (proxy, dial, stats) = listening_on("127.0.0.1", "").await;
    let (mut stream, code) = connect_as_alice(dial, echo.addr.into()).await;
    assert_eq!(code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"local").await, b"local");
    assert!(echo.accepted.recv().await.is_some());
    let (_, code) = connect_as_alice(dial, stats.expect("stats endpoint bound").into()).await;
    assert_eq!(code, ReplyCode::Succeeded, "the rules, none here, decide");
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn udp_datagrams_and_bind_peers_on_this_host_are_denied_beyond_loopback_too() {
    let config = with_access(
        "[server]\nbind_address = \"0.0.0.0\"\nbind_port = 0\nallow_open_proxy = true\n\
         [[access.rules]]\naction = \"allow\"\nnetworks = [\"127.0.0.2/32\"]\n",
    );
    let server = common::build_server(config).await.expect("build");
    let metrics = server.metrics();
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind proxy");
    let proxy = TestProxy::start_server_on(server, listener).await;
    let dial = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), proxy.addr.port());

    let mut guarded = udp::UdpEcho::start().await;
    let mut allowed = udp::UdpEcho::start_on("127.0.0.2:0".parse().expect("addr")).await;
    let association = udp::Association::open(dial).await;
    association.send(TargetAddr::Ip(guarded.addr), b"guarded").await;
    // Datagrams are handled in order: once the allowed one is echoed, the first was judged.
    let back = association.round_trip(TargetAddr::Ip(allowed.addr), b"named", allowed.addr).await;
    assert_eq!(back, b"named");
    assert_eq!(allowed.next().await.1, b"named");
    assert_eq!(metrics.snapshot().udp.dropped.denied, 1);
    assert!(guarded.seen.try_recv().is_err(), "a datagram reached this host's loopback");
    association.close().await;

    let mut control = TcpStream::connect(dial).await.expect("connect");
    assert_eq!(greet(&mut control, &[METHOD_NO_AUTH]).await.method, METHOD_NO_AUTH);
    let peer = TargetAddr::Ip(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 21));
    let reply = request(&mut control, Command::Bind, peer).await;
    assert_eq!(reply.code, ReplyCode::NotAllowed, "a BIND peer on this host's loopback");
    drop(control);
    proxy.stop().await;
}
