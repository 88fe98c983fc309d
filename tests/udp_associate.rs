//! UDP ASSOCIATE through an in-process proxy, driven by the tests' own RFC 1928 client: every
//! reply field, pinning and foreign sources, fragments and malformed headers, the largest
//! payloads, names resolved once per association, access rules on every datagram, the reply
//! filter, the association's lifetime (control connection, idle timeout) and its
//! `max_connections` slot, names from a hosts file and by route. No name here reaches a real
//! DNS server: a static resolver answers, or the daemon's own resolver asks the tests' server.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::udp::{datagram, eventually, raw_request, Association, CountingResolver, UdpEcho};
use common::{serve_once_admitted, test_config, EchoServer, TestProxy};
use poolsocks::config::{Config, DnsConfig, UdpReplyFilter};
use poolsocks::resolve::{DnsResolver, Resolver, StaticResolver};
use poolsocks::server::metrics::ServerMetrics;
use poolsocks::server::Server;
use poolsocks::socks::{Command, TargetAddr};
use poolsocks::telemetry::{EventQuery, Telemetry};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

struct Rig {
    proxy: TestProxy,
    metrics: Arc<ServerMetrics>,
    telemetry: Telemetry,
}

async fn rig_on(config: Config, resolver: Arc<dyn Resolver>, listener: TcpListener) -> Rig {
    let server = Server::build_with_resolver(config, resolver).await.expect("server builds");
    let metrics = server.metrics();
    let telemetry = server.telemetry();
    let proxy = TestProxy::start_server_on(server, listener).await;
    Rig { proxy, metrics, telemetry }
}

async fn rig(config: Config, resolver: Arc<dyn Resolver>) -> Rig {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    rig_on(config, resolver, listener).await
}

async fn plain_rig() -> Rig {
    rig(test_config(), StaticResolver::new().into_arc()).await
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn to(addr: SocketAddr) -> TargetAddr {
    TargetAddr::Ip(addr)
}

/// The proxy's answer to a UDP ASSOCIATE, field by field, and the reply header of a relayed
/// datagram, byte by byte; the destination sees the proxy's outbound socket, not the client.
#[tokio::test]
async fn the_reply_names_the_relay_and_datagrams_carry_a_header_naming_their_source() {
    let rig = plain_rig().await;
    let mut echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let reply = &association.reply;
    // VER 5, REP 0, RSV 0, ATYP 1, BND.ADDR = the address the client reached, BND.PORT set.
    assert_eq!(&reply.bytes[..8], &[5, 0, 0, 1, 127, 0, 0, 1]);
    assert_ne!(reply.bound.port(), 0);
    assert_ne!(reply.bound.port(), rig.proxy.addr.port(), "a UDP port of its own");

    association.send(to(echo.addr), b"ping").await;
    let (whole, from, payload) = association.recv().await;
    let mut expected = vec![0, 0, 0, 1, 127, 0, 0, 1];
    expected.extend_from_slice(&echo.addr.port().to_be_bytes());
    expected.extend_from_slice(b"ping");
    assert_eq!(whole, expected, "RSV 0 0, FRAG 0, ATYP 1, the echo's address and port, payload");
    assert_eq!((from, payload), (to(echo.addr), b"ping".to_vec()));

    let (seen_from, seen) = echo.next().await;
    assert_eq!(seen, b"ping");
    let client_port = association.socket.local_addr().expect("addr").port();
    assert_ne!(seen_from.port(), client_port, "the destination sees the proxy, not the client");
    assert_ne!(seen_from, reply.bound, "through the outbound socket, not the relay socket");

    let snapshot = rig.metrics.snapshot();
    assert_eq!(snapshot.sessions_by_command.udp_associate, 1);
    assert_eq!(snapshot.udp.associations_active, 1);
    assert_eq!(snapshot.udp.datagrams_client_to_destination, 1);
    assert_eq!(snapshot.udp.datagrams_destination_to_client, 1);
    assert_eq!(snapshot.udp.bytes_client_to_destination, 4);
    assert_eq!(snapshot.udp.bytes_destination_to_client, 4);
    assert_eq!(snapshot.udp.dropped.total(), 0);
    association.close().await;
    let snapshot = rig.metrics.snapshot();
    assert_eq!((snapshot.udp.associations_active, snapshot.sessions_active), (0, 0));
    rig.proxy.stop().await;
}

/// A listener on every address: the relay is bound on (and the reply names) the address this
/// client reached, not 0.0.0.0, so a multi-homed host answers on the right one.
#[tokio::test]
async fn the_relay_is_on_the_address_the_client_reached() {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let mut config = test_config();
    config.server.allow_open_proxy = true;
    let rig = rig_on(config, StaticResolver::new().into_arc(), listener).await;
    let echo = UdpEcho::start().await;
    for reached in ["127.0.0.1", "127.0.0.2"] {
        let proxy = SocketAddr::new(ip(reached), rig.proxy.addr.port());
        let association = Association::open(proxy).await;
        assert_eq!(association.relay.ip(), ip(reached), "BND.ADDR is the address reached");
        assert_eq!(association.round_trip(to(echo.addr), b"hi", echo.addr).await, b"hi");
        association.close().await;
    }
    rig.proxy.stop().await;
}

/// `udp_bind_address` moves the relay (and the reply) to that address.
#[tokio::test]
async fn udp_bind_address_is_where_the_relay_listens() {
    let mut config = test_config();
    config.server.udp_bind_address = Some(ip("127.0.0.3"));
    let rig = rig(config, StaticResolver::new().into_arc()).await;
    let echo = UdpEcho::start().await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let association =
        Association::open_requesting(rig.proxy.addr, TargetAddr::unspecified(), Some(socket)).await;
    assert_eq!(association.relay.ip(), ip("127.0.0.3"));
    assert_eq!(association.round_trip(to(echo.addr), b"moved", echo.addr).await, b"moved");
    association.close().await;
    rig.proxy.stop().await;
}

/// Over IPv6 the reply names an IPv6 relay (ATYP 4), and one association reaches IPv4 and IPv6
/// destinations, each reply header naming its sender in its own family.
#[tokio::test]
async fn an_ipv6_client_reaches_ipv4_and_ipv6_destinations() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        // Under CI a missing prerequisite fails, as everywhere else.
        assert!(std::env::var_os("CI").is_none(), "no IPv6 loopback here");
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    };
    let rig = rig_on(test_config(), StaticResolver::new().into_arc(), listener).await;
    let echo_v4 = UdpEcho::start().await;
    let echo_v6 = UdpEcho::start_on("[::1]:0".parse().expect("addr")).await;
    let association = Association::open(rig.proxy.addr).await;
    assert_eq!(association.reply.bytes[3], 4, "ATYP 4");
    assert_eq!(association.relay.ip(), ip("::1"));
    assert_eq!(association.round_trip(to(echo_v4.addr), b"four", echo_v4.addr).await, b"four");
    assert_eq!(association.round_trip(to(echo_v6.addr), b"six", echo_v6.addr).await, b"six");
    let (whole, _, _) = {
        association.send(to(echo_v6.addr), b"x").await;
        association.recv().await
    };
    assert_eq!(whole.len(), 4 + 16 + 2 + 1, "an IPv6 sender is named with ATYP 4");
    association.close().await;
    rig.proxy.stop().await;
}

/// Names are resolved by the proxy, once for a stream of datagrams to the same name.
#[tokio::test]
async fn names_are_resolved_by_the_proxy_once_per_association() {
    let (resolver, lookups) =
        CountingResolver::new(StaticResolver::new().with("echo.test", [ip("127.0.0.1")]));
    let rig = rig(test_config(), resolver).await;
    let mut echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let name = TargetAddr::Domain("echo.test".into(), echo.addr.port());
    for i in 0..20u8 {
        assert_eq!(association.round_trip(name.clone(), &[i], echo.addr).await, [i]);
        assert_eq!(echo.next().await.1, [i]);
    }
    // The same name written differently is the same cache entry.
    let shouted = TargetAddr::Domain("ECHO.test.".into(), echo.addr.port());
    assert_eq!(association.round_trip(shouted, b"again", echo.addr).await, b"again");
    assert_eq!(lookups.load(Ordering::SeqCst), 1, "one lookup for 21 datagrams");

    let nowhere = TargetAddr::Domain("nowhere.test".into(), 9);
    association.send(nowhere.clone(), b"lost").await;
    association.send(nowhere, b"lost too").await;
    assert_eq!(association.round_trip(to(echo.addr), b"after", echo.addr).await, b"after");
    let metrics = rig.metrics.clone();
    eventually("both datagrams to nowhere counted", || {
        metrics.snapshot().udp.dropped.unresolvable == 2
    })
    .await;
    association.close().await;
    rig.proxy.stop().await;
}

/// Only the client may use the relay: another address never pins it, and once the first
/// datagram pinned the client's port, another port of the same address is foreign too.
#[tokio::test]
async fn datagrams_from_anyone_but_the_client_are_dropped_and_counted() {
    let rig = plain_rig().await;
    let mut echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let stranger = UdpSocket::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
    stranger.send_to(&datagram(to(echo.addr), b"stranger"), association.relay).await.expect("send");
    assert_eq!(association.round_trip(to(echo.addr), b"client", echo.addr).await, b"client");
    let neighbour = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    neighbour
        .send_to(&datagram(to(echo.addr), b"neighbour"), association.relay)
        .await
        .expect("send");
    assert_eq!(association.round_trip(to(echo.addr), b"client 2", echo.addr).await, b"client 2");
    // The relay socket handles datagrams in order: both strangers came before the second echo.
    assert_eq!(rig.metrics.snapshot().udp.dropped.foreign_source, 2);
    assert_eq!(echo.next().await.1, b"client");
    assert_eq!(echo.next().await.1, b"client 2");
    assert!(echo.seen.try_recv().is_err(), "no stranger's datagram reached the destination");
    association.close().await;
    rig.proxy.stop().await;
}

/// A request naming the client's port pins it from the start: an earlier datagram from another
/// port is foreign, even though it is the first.
#[tokio::test]
async fn dst_port_of_the_request_pins_the_client_before_any_datagram() {
    let rig = plain_rig().await;
    let echo = UdpEcho::start().await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let port = socket.local_addr().expect("addr").port();
    let requested = TargetAddr::Ip(SocketAddr::new(ip("127.0.0.1"), port));
    let association = Association::open_requesting(rig.proxy.addr, requested, Some(socket)).await;
    let early = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    early.send_to(&datagram(to(echo.addr), b"early"), association.relay).await.expect("send");
    assert_eq!(association.round_trip(to(echo.addr), b"mine", echo.addr).await, b"mine");
    assert_eq!(rig.metrics.snapshot().udp.dropped.foreign_source, 1);
    association.close().await;
    rig.proxy.stop().await;
}

/// FRAG other than 0, headers that do not parse, and datagrams too large for the other side
/// are dropped and counted; the largest that fits goes through intact.
#[tokio::test]
async fn fragments_malformed_and_oversized_datagrams_are_dropped_and_counted() {
    let rig = plain_rig().await;
    let echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let mut fragment = datagram(to(echo.addr), b"part 1");
    fragment[2] = 1;
    association.send_raw(&fragment).await;
    association.send_raw(&[0, 0, 0]).await;
    association.send_raw(&[0, 0, 0, 9, 1, 2, 3, 4, 0, 80]).await;
    association.send_raw(&[0, 0, 0, 3, 0, 0, 80]).await;
    // RSV must be zero (RFC 1928 section 7): a non-zero one is not relayed.
    let mut reserved = datagram(to(echo.addr), b"rsv set");
    reserved[1] = 1;
    association.send_raw(&reserved).await;
    assert_eq!(association.round_trip(to(echo.addr), b"whole", echo.addr).await, b"whole");
    let dropped = rig.metrics.snapshot().udp.dropped;
    assert_eq!((dropped.fragment, dropped.malformed), (1, 4));

    // Over IPv4 a datagram carries 65,507 bytes: with the 10-byte header, a payload of 65,497.
    let largest: Vec<u8> = (0..65_497u32).map(|i| (i % 251) as u8).collect();
    assert!(association.round_trip(to(echo.addr), &largest, echo.addr).await == largest);

    // A destination's 65,507-byte reply cannot reach an IPv4 client with its header.
    let big = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let big_addr = big.local_addr().expect("addr");
    association.send(to(big_addr), b"send me the biggest").await;
    let mut buf = vec![0u8; 70_000];
    let (_, proxy_side) = big.recv_from(&mut buf).await.expect("request reached the server");
    big.send_to(&vec![7u8; 65_507], proxy_side).await.expect("send big");
    big.send_to(b"done", proxy_side).await.expect("send done");
    let (_, from, payload) = association.recv().await;
    assert_eq!((from, payload), (to(big_addr), b"done".to_vec()), "the big one was dropped");
    let metrics = rig.metrics.clone();
    eventually("the oversized reply counted", || metrics.snapshot().udp.dropped.too_large == 1)
        .await;
    association.close().await;
    rig.proxy.stop().await;
}

/// The access rules judge every datagram's destination, before DNS (a denied name is never
/// resolved) and after (a name cannot smuggle a denied address); denials are dropped,
/// counted, and reported once per association per period, not once per datagram.
#[tokio::test]
async fn denied_destinations_are_dropped_counted_and_reported_without_flooding() {
    let mut config = Config::from_toml(
        "[[access.rules]]\naction = \"deny\"\ndomains = [\"blocked.test\"]\n\
         [[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.2/32\"]\n",
        None,
    )
    .expect("config");
    config.server.handshake_timeout_ms = 500;
    let (resolver, lookups) = CountingResolver::new(
        StaticResolver::new()
            .with("smuggle.test", [ip("127.0.0.2")])
            .with("blocked.test", [ip("127.0.0.1")]),
    );
    let rig = rig(config, resolver).await;
    let echo = UdpEcho::start().await;
    let denied = UdpSocket::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
    let denied_port = denied.local_addr().expect("addr").port();
    let association = Association::open(rig.proxy.addr).await;

    association.send(to(denied.local_addr().expect("addr")), b"literal").await;
    association.send(TargetAddr::Domain("smuggle.test".into(), denied_port), b"by name").await;
    association.send(TargetAddr::Domain("www.blocked.test".into(), echo.addr.port()), b"x").await;
    association.send(TargetAddr::unspecified(), b"to 0.0.0.0").await;
    for _ in 0..100 {
        association.send(to(denied.local_addr().expect("addr")), b"flood").await;
    }
    assert_eq!(association.round_trip(to(echo.addr), b"allowed", echo.addr).await, b"allowed");
    let metrics = rig.metrics.clone();
    // The name's lookup finishes on its own time; the rest were judged in order.
    eventually("104 denials counted", || metrics.snapshot().udp.dropped.denied == 104).await;
    assert_eq!(lookups.load(Ordering::SeqCst), 1, "only smuggle.test was resolved");
    let mut buf = [0u8; 64];
    assert!(denied.try_recv_from(&mut buf).is_err(), "nothing reached the denied address");
    let reported = rig
        .telemetry
        .query(&EventQuery { category: Some("access".into()), ..EventQuery::default() });
    assert_eq!(reported.len(), 1, "one report for 104 denials within the period: {reported:?}");
    assert_eq!(reported[0].message, "datagram denied by access rules");
    association.close().await;
    rig.proxy.stop().await;
}

/// Replies come only from the exact destinations the association sent to (what a NAT does);
/// `address` lets other ports of those hosts answer, `any` anyone the rules allow.
#[tokio::test]
async fn replies_pass_the_reply_filter_or_are_dropped() {
    for (filter, other_port_passes, other_host_passes) in [
        (UdpReplyFilter::AddressAndPort, false, false),
        (UdpReplyFilter::Address, true, false),
        (UdpReplyFilter::Any, true, true),
    ] {
        let mut config = test_config();
        config.server.udp_reply_filter = filter;
        let rig = rig(config, StaticResolver::new().into_arc()).await;
        let association = Association::open(rig.proxy.addr).await;
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let other_port = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let other_host = UdpSocket::bind("127.0.0.4:0").await.expect("bind");
        association.send(to(server.local_addr().expect("addr")), b"hello").await;
        let mut buf = [0u8; 64];
        let (_, outbound) = server.recv_from(&mut buf).await.expect("reached the server");
        other_port.send_to(b"other port", outbound).await.expect("send");
        other_host.send_to(b"other host", outbound).await.expect("send");
        server.send_to(b"answer", outbound).await.expect("send");
        let mut got = Vec::new();
        let expected = 1 + usize::from(other_port_passes) + usize::from(other_host_passes);
        for _ in 0..expected {
            got.push(association.recv().await.2);
        }
        assert!(got.contains(&b"answer".to_vec()), "{filter:?}: {got:?}");
        assert_eq!(got.contains(&b"other port".to_vec()), other_port_passes, "{filter:?}");
        assert_eq!(got.contains(&b"other host".to_vec()), other_host_passes, "{filter:?}");
        let foreign = (3 - expected) as u64;
        let metrics = rig.metrics.clone();
        eventually("filtered replies counted", || {
            metrics.snapshot().udp.dropped.foreign_source == foreign
        })
        .await;
        assert!(association.socket.try_recv_from(&mut buf).is_err(), "{filter:?}: nothing more");
        association.close().await;
        rig.proxy.stop().await;
    }
}

/// The association lives as long as its control connection: when the client closes it, the
/// relay and outbound sockets are closed before the proxy closes its side.
#[tokio::test]
async fn closing_the_control_connection_closes_the_association_and_frees_its_ports() {
    let rig = plain_rig().await;
    let mut echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let relay = association.relay;
    assert_eq!(association.round_trip(to(echo.addr), b"one", echo.addr).await, b"one");
    let (outbound, _) = echo.next().await;
    association.close().await;
    UdpSocket::bind(relay).await.expect("the relay port is free again");
    UdpSocket::bind(SocketAddr::new(ip("0.0.0.0"), outbound.port()))
        .await
        .expect("the outbound port is free again");
    let snapshot = rig.metrics.snapshot();
    assert_eq!((snapshot.udp.associations_active, snapshot.sessions_active), (0, 0));
    rig.proxy.stop().await;
}

/// No datagram either way for `udp_idle_timeout_secs`: the proxy closes the association and
/// its control connection. Datagrams keep it open.
#[tokio::test]
async fn an_idle_association_is_closed_after_the_udp_idle_timeout() {
    let mut config = test_config();
    config.server.udp_idle_timeout_secs = 1;
    let rig = rig(config, StaticResolver::new().into_arc()).await;
    let echo = UdpEcho::start().await;
    let mut association = Association::open(rig.proxy.addr).await;
    for _ in 0..4 {
        assert_eq!(association.round_trip(to(echo.addr), b"alive", echo.addr).await, b"alive");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::ZERO, association.control.read(&mut byte)).await.is_err(),
        "still open after 1.6 s of traffic"
    );
    let quiet_since = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), association.control.read(&mut byte))
        .await
        .expect("closed by the proxy");
    assert!(matches!(read, Ok(0)), "EOF: {read:?}");
    let quiet = quiet_since.elapsed();
    assert!(quiet >= Duration::from_millis(500) && quiet < Duration::from_secs(3), "{quiet:?}");
    UdpSocket::bind(association.relay).await.expect("relay port free");
    rig.proxy.stop().await;
}

/// An association is a client being served: it holds a `max_connections` slot until it ends.
#[tokio::test]
async fn an_association_holds_a_max_connections_slot() {
    let mut config = test_config();
    config.server.max_connections = 1;
    let rig = rig(config, StaticResolver::new().into_arc()).await;
    let echo = UdpEcho::start().await;
    let tcp_echo = EchoServer::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let mut refused = TcpStream::connect(rig.proxy.addr).await.expect("accepted");
    assert!(common::closed_without_data(&mut refused).await, "over the limit: closed at once");
    assert_eq!(rig.metrics.snapshot().rejected_over_limit, 1);
    assert_eq!(association.round_trip(to(echo.addr), b"still", echo.addr).await, b"still");
    association.close().await;
    assert!(serve_once_admitted(rig.proxy.addr, tcp_echo.addr).await, "the slot came back");
    rig.proxy.stop().await;
}

/// `udp_associate = false` and `bind = false` answer 0x07, as before these commands existed.
#[tokio::test]
async fn commands_turned_off_get_0x07() {
    let mut config = test_config();
    config.server.udp_associate = false;
    config.server.bind = false;
    let rig = rig(config, StaticResolver::new().into_arc()).await;
    for command in [Command::UdpAssociate, Command::Bind] {
        let target = TargetAddr::Ip("127.0.0.1:9".parse().expect("addr"));
        let (mut control, reply) = raw_request(rig.proxy.addr, command, target).await;
        assert_eq!(reply.bytes, [5, 7, 0, 1, 0, 0, 0, 0, 0, 0], "{command:?}");
        assert!(common::closed_without_data(&mut control).await);
    }
    let snapshot = rig.metrics.snapshot();
    assert_eq!(
        (snapshot.sessions_by_command.udp_associate, snapshot.sessions_by_command.bind),
        (0, 0)
    );
    rig.proxy.stop().await;
}

/// The daemon's own resolver, reading a hosts file of the test's and asking a DNS server of the
/// test's (nothing leaves the machine).
async fn dns_resolver(hosts: &std::path::Path, dns: &common::dns::TestDns) -> DnsResolver {
    let config = DnsConfig { servers: vec![dns.addr], ..DnsConfig::default() };
    DnsResolver::from_config(&config).expect("resolver").with_hosts_file(hosts)
}

/// A name the hosts file lists resolves to exactly its entries there, both families, in the
/// file's order, without a DNS query (`localhost` gains no `::1` the file does not give it);
/// other names go to the name servers; an edited file counts from the next lookup.
#[tokio::test]
async fn a_name_in_the_hosts_file_resolves_to_exactly_its_entries_there() {
    let dns =
        common::dns::TestDns::start(&[("dns-only.test", "127.0.0.3".parse().expect("ip"))]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.2 multi.test\n::1 multi.test Alias.Test\n127.0.0.1 multi.test\n",
    )
    .expect("write hosts");
    let resolver = dns_resolver(&hosts, &dns).await;
    let at = |list: &[&str]| -> Vec<SocketAddr> {
        list.iter().map(|ip| SocketAddr::new(ip.parse().expect("ip"), 7)).collect()
    };
    assert_eq!(resolver.lookup("localhost", 7).await.expect("localhost"), at(&["127.0.0.1"]));
    assert_eq!(
        resolver.lookup("MULTI.test.", 7).await.expect("multi"),
        at(&["127.0.0.2", "::1", "127.0.0.1"])
    );
    assert_eq!(resolver.lookup("alias.test", 7).await.expect("alias"), at(&["::1"]));
    assert_eq!(dns.queries.load(Ordering::SeqCst), 0, "the hosts file answered alone");
    assert_eq!(resolver.lookup("dns-only.test", 7).await.expect("dns"), at(&["127.0.0.3"]));
    assert!(dns.queries.load(Ordering::SeqCst) > 0, "a name the file lacks went to DNS");

    let edited = dir.path().join("hosts.new");
    std::fs::write(&edited, "::1 localhost\n127.0.0.1 localhost\n").expect("write hosts");
    std::fs::rename(&edited, &hosts).expect("replace hosts");
    assert_eq!(resolver.lookup("localhost", 7).await.expect("edited"), at(&["::1", "127.0.0.1"]));
}

/// A datagram to `localhost` goes where the hosts file says (127.0.0.1 only), so it reaches an
/// IPv4-only service: the resolver adds no `::1` of its own, which would swallow it.
#[tokio::test]
async fn a_datagram_to_localhost_goes_where_the_hosts_file_says() {
    let dns = common::dns::TestDns::start(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").expect("write hosts");
    let resolver = dns_resolver(&hosts, &dns).await;
    let rig = rig(test_config(), Arc::new(resolver)).await;
    let mut echo = UdpEcho::start().await;
    let association = Association::open(rig.proxy.addr).await;
    let name = TargetAddr::Domain("localhost".into(), echo.addr.port());
    assert_eq!(association.round_trip(name, b"v4 only", echo.addr).await, b"v4 only");
    assert_eq!(echo.next().await.1, b"v4 only");
    assert_eq!(dns.queries.load(Ordering::SeqCst), 0);
    association.close().await;
    rig.proxy.stop().await;
}

/// In a namespace with nothing but loopback, a name's first address in each answer has no
/// route: datagrams go to its first address that has one (the other family), every time.
#[test]
fn a_datagram_to_a_name_goes_to_its_first_address_with_a_route() {
    let ns = match common::netns::LoopbackNs::create("udpr") {
        Ok(ns) => ns,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "no network namespace: {e}");
            eprintln!("SKIPPED: no network namespace ({e})");
            return;
        }
    };
    ns.run(|| async {
        let resolver = StaticResolver::new()
            .with("six-first.test", [ip("2001:db8::1"), ip("127.0.0.1")])
            .with("four-first.test", [ip("192.0.2.1"), ip("::1")]);
        let rig = rig(test_config(), resolver.into_arc()).await;
        let mut echo_v4 = UdpEcho::start().await;
        let mut echo_v6 = UdpEcho::start_on("[::1]:0".parse().expect("addr")).await;
        let association = Association::open(rig.proxy.addr).await;
        for round in 0..3u8 {
            let six_first = TargetAddr::Domain("six-first.test".into(), echo_v4.addr.port());
            assert_eq!(association.round_trip(six_first, &[round], echo_v4.addr).await, [round]);
            assert_eq!(echo_v4.next().await.1, [round]);
            let four_first = TargetAddr::Domain("four-first.test".into(), echo_v6.addr.port());
            assert_eq!(association.round_trip(four_first, &[round], echo_v6.addr).await, [round]);
            assert_eq!(echo_v6.next().await.1, [round]);
        }
        assert_eq!(rig.metrics.snapshot().udp.dropped.send_error, 0);
        association.close().await;
        rig.proxy.stop().await;
    });
}
