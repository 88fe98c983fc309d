//! The pool through the real SOCKS server: reuse proven from the upstream's side, used
//! connections never handed on, connect timeout, and the pool-off mode as a plain proxy.

mod common;

use std::time::Duration;

use common::*;
use poolsocks::config::Config;
use poolsocks::pool::Pool;
use poolsocks::socks::{ReplyCode, TargetAddr};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

fn pool_config() -> Config {
    let mut config = test_config();
    config.server.pool.enabled = true;
    config
}

async fn start(config: Config) -> (TestProxy, Option<Pool>) {
    let server = common::build_server(config).await.expect("build");
    let pool = server.pool();
    (TestProxy::start_server(server).await, pool)
}

/// Waits until the destination's counters are at rest: nothing in use or being dialed.
async fn await_quiet(pool: &Pool, target: &TargetAddr) -> poolsocks::pool::DestStats {
    let mut view = pool.watch_destination(target).await.expect("watch");
    let quiet = tokio::time::timeout(Duration::from_secs(10), view.wait_for(|s| s.is_quiet()))
        .await
        .expect("destination came to rest")
        .expect("view alive");
    quiet.clone()
}

/// One whole session to `upstream`, so the pool has seen its destination once: a first
/// sighting is dialed directly and only remembered; the pool keeps spares from the second on.
async fn first_sighting(proxy: &TestProxy, upstream: &mut TaggedServer) {
    let before = upstream.accepted();
    let (mut stream, reply) = connect(proxy.addr, upstream.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let conn = who(&mut stream).await;
    assert_eq!(conn, before + 1, "a first sighting is dialed for its client");
    drop(stream);
    upstream.await_closed(conn).await;
}

fn bound_peer(reply: &poolsocks::socks::Reply) -> std::net::SocketAddr {
    match reply.bound {
        TargetAddr::Ip(addr) => addr,
        ref other => panic!("bound address is not an IP: {other}"),
    }
}

#[tokio::test]
async fn the_second_client_gets_a_spare_the_upstream_accepted_before_it_asked() {
    let mut upstream = TaggedServer::start().await;
    let target: TargetAddr = upstream.addr.into();
    let (proxy, pool) = start(pool_config()).await;
    let pool = pool.expect("pool enabled");
    first_sighting(&proxy, &mut upstream).await;

    // Client 1 misses: its connection is dialed for it, and a spare is dialed beside it.
    let (mut first, reply) = connect(proxy.addr, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    upstream.await_accepted(3).await;
    let first_conn =
        upstream.index_of(bound_peer(&reply)).expect("client 1's connection was accepted");
    assert_eq!(who(&mut first).await, first_conn);

    // Client 2 asks only now; it must be served by the spare already accepted upstream.
    let accepted_before = upstream.accepted();
    let (mut second, reply) = connect(proxy.addr, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let second_conn =
        upstream.index_of(bound_peer(&reply)).expect("served by an accepted connection");
    assert!(second_conn <= accepted_before, "client 2 waited for a new connection");
    assert_ne!(second_conn, first_conn);
    assert_eq!(
        who(&mut second).await,
        second_conn,
        "the destination agrees which connection it is"
    );

    drop((first, second));
    upstream.await_closed(first_conn).await;
    upstream.await_closed(second_conn).await;
    let rest = await_quiet(&pool, &target).await;
    // A hit is a session served on a spare: counted once that session is over.
    let stats = pool.stats().await.expect("stats");
    assert_eq!((stats.pool_hits, stats.pool_misses), (1, 1));
    upstream.drain();
    assert_eq!(
        rest.idle,
        upstream.open(),
        "idle spares are exactly the sockets held open upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_connection_that_carried_bytes_is_closed_never_given_to_another_client() {
    let mut upstream = TaggedServer::start().await;
    let target: TargetAddr = upstream.addr.into();
    let (proxy, pool) = start(pool_config()).await;
    let pool = pool.expect("pool enabled");
    first_sighting(&proxy, &mut upstream).await;

    let mut served = Vec::new();
    for _ in 0..6 {
        let (mut stream, reply) = connect(proxy.addr, target.clone()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        let conn = who(&mut stream).await;
        assert!(!served.contains(&conn), "connection {conn} served two sessions");
        served.push(conn);
        drop(stream);
        upstream.await_closed(conn).await;
        await_quiet(&pool, &target).await;
    }
    let stats = pool.stats().await.expect("stats");
    assert_eq!(stats.pool_hits + stats.pool_misses, 6);
    assert!(
        stats.pool_hits >= 5,
        "after the first miss every client should find a spare: {stats:?}"
    );
    assert_eq!(stats.connections_in_use, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_without_a_byte_hands_its_spare_back_untouched() {
    let mut upstream = TaggedServer::start().await;
    let target: TargetAddr = upstream.addr.into();
    let (proxy, pool) = start(pool_config()).await;
    let pool = pool.expect("pool enabled");
    // Seen twice: admitted, its manager dials a spare (a second sighting is dialed for its
    // client before the pool hears of it, so only from now on is a session leased).
    first_sighting(&proxy, &mut upstream).await;
    first_sighting(&proxy, &mut upstream).await;
    assert_eq!(await_quiet(&pool, &target).await.idle, 1, "the spare after admission");

    // A client that gives up: CONNECT, then abort (RST) without sending anything. (A FIN would
    // be a half-close: the client might still want what the server sends.)
    let (stream, reply) = connect(proxy.addr, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    upstream.await_accepted(3).await;
    let unused = upstream.index_of(bound_peer(&reply)).expect("accepted");
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(stream);
    let rest = await_quiet(&pool, &target).await;
    assert!(rest.counters.returned_untouched >= 1, "{rest:?}");
    upstream.drain();
    assert!(
        !upstream.seen.contains(&common::UpstreamEvent::Closed { index: unused }),
        "it was closed"
    );

    // The next clients can be served by it: it is still a spare nobody used.
    let mut seen = Vec::new();
    for _ in 0..rest.idle {
        let (mut stream, _) = connect(proxy.addr, target.clone()).await;
        seen.push(who(&mut stream).await);
    }
    assert!(seen.contains(&unused), "the untouched connection {unused} was never reused: {seen:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn connect_timeout_applies_with_the_pool_on_and_counters_come_back_to_zero() {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let blackhole = listener.local_addr().expect("addr");
    let _filler =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(blackhole)).await;

    let mut config = pool_config();
    config.server.pool.connect_timeout_ms = 300;
    let (proxy, pool) = start(config).await;
    let pool = pool.expect("pool enabled");
    let target: TargetAddr = blackhole.into();
    let (_stream, reply) = connect(proxy.addr, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::TtlExpired);
    let rest = await_quiet(&pool, &target).await;
    assert_eq!(rest.idle, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn with_the_pool_off_every_client_gets_a_connection_dialed_at_its_request() {
    let mut upstream = TaggedServer::start().await;
    let (proxy, pool) = start(test_config()).await;
    assert!(pool.is_none());
    for client in 1..=5 {
        upstream.drain();
        assert_eq!(upstream.accepted(), client - 1, "a connection was opened ahead of demand");
        let (mut stream, reply) = connect(proxy.addr, upstream.addr.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        upstream.await_accepted(client).await;
        assert_eq!(who(&mut stream).await, client, "served by the connection dialed for it");
        stream.shutdown().await.expect("close");
        drop(stream);
        upstream.await_closed(client).await;
    }
    proxy.stop().await;
}
