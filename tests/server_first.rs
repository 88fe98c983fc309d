//! Issue 15: servers that speak first and drop idle connections. The pool may make a session
//! faster, never make it fail: whatever a spare's server did while it waited (greeted, then
//! reset, closed, or said `421` and closed), every client gets `0x00`, a fresh greeting and a
//! live connection, as it would with the pool off.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use poolsocks::pool::{DestStats, Pool};
use poolsocks::socks::{ReplyCode, TargetAddr};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(20);
/// How long the test servers let a connection sit idle before they drop it.
const SERVER_IDLE_LIMIT: Duration = Duration::from_millis(400);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    /// Greeting, then a reset (MariaDB after `connect_timeout`).
    Reset,
    /// Greeting, then a FIN (sshd after `LoginGraceTime`).
    Fin,
    /// Greeting, then `421 idle timeout` and a FIN (SMTP, FTP).
    Line421,
}

/// A server that greets each connection with `220 conn N`, answers `PING` with `PONG N`, and
/// drops a connection that sent nothing for [`SERVER_IDLE_LIMIT`] the way `drop` says.
async fn greeting_server(drop: Drop) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                if stream.write_all(format!("220 conn {n}\r\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 64];
                match tokio::time::timeout(SERVER_IDLE_LIMIT, stream.read(&mut buf)).await {
                    Ok(Ok(read)) if read > 0 => {
                        let reply = format!("PONG {n}\r\n");
                        let _ = stream.write_all(reply.as_bytes()).await;
                        // Stay open until the client is done.
                        let _ = stream.read(&mut buf).await;
                    }
                    Ok(_) => {}
                    Err(_) => match drop {
                        Drop::Reset => {
                            let _ =
                                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        }
                        Drop::Fin => {}
                        Drop::Line421 => {
                            let _ = stream.write_all(b"421 idle timeout\r\n").await;
                        }
                    },
                }
            });
        }
    });
    (addr, accepted)
}

fn pool_config() -> poolsocks::config::Config {
    let mut config = test_config();
    config.server.pool.enabled = true;
    config
}

async fn start() -> (TestProxy, Pool) {
    let server = build_server(pool_config()).await.expect("build");
    let pool = server.pool().expect("pool on");
    (TestProxy::start_server(server).await, pool)
}

/// One session: `0x00`, a greeting from a connection never greeted to anyone before, and a
/// live answer from that same connection.
async fn serve_one(proxy: SocketAddr, target: &TargetAddr, greeted: &mut Vec<usize>) {
    let (stream, reply) = connect(proxy, target.clone()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded, "never a failure because of the pool");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, stream.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("read");
    let conn: usize = line
        .trim()
        .strip_prefix("220 conn ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a fresh greeting, got {line:?}"));
    assert!(!greeted.contains(&conn), "greeting of connection {conn} seen twice");
    greeted.push(conn);
    stream.get_mut().write_all(b"PING\r\n").await.expect("ping");
    let mut pong = String::new();
    tokio::time::timeout(DEADLINE, stream.read_line(&mut pong))
        .await
        .expect("pong in time")
        .expect("read");
    assert_eq!(pong.trim(), format!("PONG {conn}"), "a live connection");
}

/// Waits until no spare the destination holds is alive: none held or being made.
async fn await_no_live_spare(view: &mut watch::Receiver<DestStats>) -> DestStats {
    tokio::time::timeout(DEADLINE, view.wait_for(|s| s.idle == 0 && s.is_quiet()))
        .await
        .expect("every spare died or none was made")
        .expect("view")
        .clone()
}

async fn five_clients_after_their_spares_died(drop: Drop) {
    let (upstream, _accepted) = greeting_server(drop).await;
    let target = TargetAddr::Ip(upstream);
    let (proxy, pool) = start().await;
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let mut greeted = Vec::new();
    for client in 1..=5 {
        serve_one(proxy.addr, &target, &mut greeted).await;
        // The next client comes after the server dropped whatever spare was made meanwhile.
        let rest = await_no_live_spare(&mut view).await;
        println!("{drop:?} client {client}: {rest:?}");
    }
    let stats = view.borrow().clone();
    let died = stats.counters.peer_closed + stats.counters.validation_drops;
    assert!(died >= 2, "the scenario made spares that died: {stats:?}");
    assert!(stats.policy.speaks_first, "a greeting before any client marks it: {stats:?}");
    let limit = stats.policy.server_idle_limit_ms.expect("the server's idle limit is learned");
    assert!((300..2_000).contains(&limit), "learned {limit} ms for a {SERVER_IDLE_LIMIT:?} limit");
    // A hit is a session served on a spare, and none was: the spares all died first.
    assert_eq!(stats.counters.hits, 0, "{stats:?}");
    assert_eq!(stats.in_use, 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_server_that_resets_idle_connections_after_its_greeting() {
    five_clients_after_their_spares_died(Drop::Reset).await;
}

#[tokio::test]
async fn a_server_that_closes_idle_connections_after_its_greeting() {
    five_clients_after_their_spares_died(Drop::Fin).await;
}

#[tokio::test]
async fn a_server_that_says_421_and_closes_idle_connections() {
    five_clients_after_their_spares_died(Drop::Line421).await;
}

#[tokio::test]
async fn a_spare_that_died_is_never_reported_as_a_rule_denial() {
    let (upstream, _accepted) = greeting_server(Drop::Reset).await;
    let target = TargetAddr::Ip(upstream);
    let server = build_server(pool_config()).await.expect("build");
    let pool = server.pool().expect("pool");
    let telemetry = server.telemetry();
    let proxy = TestProxy::start_server(server).await;
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let mut greeted = Vec::new();
    for _ in 0..3 {
        serve_one(proxy.addr, &target, &mut greeted).await;
        await_no_live_spare(&mut view).await;
    }
    let access = telemetry.query(&poolsocks::telemetry::EventQuery {
        category: Some("access".into()),
        ..Default::default()
    });
    assert!(access.is_empty(), "no rule is configured, yet: {access:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn spares_of_a_server_with_a_learned_idle_limit_are_retired_before_it() {
    // A slower client rhythm than the server's limit: after two spares died, none is dialed.
    let (upstream, accepted) = greeting_server(Drop::Fin).await;
    let target = TargetAddr::Ip(upstream);
    let (proxy, pool) = start().await;
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let mut greeted = Vec::new();
    let mut learned_after = None;
    for client in 1..=6 {
        serve_one(proxy.addr, &target, &mut greeted).await;
        let rest = await_no_live_spare(&mut view).await;
        // The scenario's rhythm, not a synchronisation: clients come less often than the
        // server keeps an idle connection.
        tokio::time::sleep(SERVER_IDLE_LIMIT * 3 / 2).await;
        if learned_after.is_none() && rest.policy.server_idle_limit_ms.is_some() {
            learned_after = Some((client, accepted.load(Ordering::SeqCst)));
        }
    }
    let (client, accepted_then) = learned_after.expect("learned within six clients");
    let stats = view.borrow().clone();
    assert_eq!(stats.policy.target, 0, "{stats:?}");
    // From then on each client cost exactly its own connection: no spare died unused.
    let sessions_since = 6 - client;
    assert_eq!(accepted.load(Ordering::SeqCst) - accepted_then, sessions_since, "{stats:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_half_closes_at_once_still_gets_the_greeting() {
    // The server greets 300 ms after accept; each client sends its CONNECT and shuts down its
    // write side at once. Pool off and on, six sessions each: every one gets all 15 bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await; // the server's own pace
                let _ = stream.write_all(b"220 hello 123\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    for pool in [false, true] {
        let mut config = test_config();
        config.server.pool.enabled = pool;
        let proxy = TestProxy::start(config).await;
        let mut received = Vec::new();
        for _ in 0..6 {
            let (mut stream, reply) = connect(proxy.addr, upstream.into()).await;
            assert_eq!(reply.code, ReplyCode::Succeeded);
            stream.shutdown().await.expect("half-close");
            received.push(read_to_end(&mut stream).await.expect("read").len());
        }
        assert_eq!(received, [15; 6], "pool {pool}: bytes per session");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_greeting_that_arrived_while_the_spare_waited_reaches_the_client() {
    // A server that greets and keeps the connection open: a spare holds the unread greeting,
    // with its readiness consumed by the pool's watch; the client must still be woken for it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let _ = stream.write_all(format!("220 conn {n}\r\n").as_bytes()).await;
                let mut buf = [0u8; 64];
                while let Ok(read) = stream.read(&mut buf).await {
                    if read == 0
                        || stream.write_all(format!("PONG {n}\r\n").as_bytes()).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    let target = TargetAddr::Ip(upstream);
    let (proxy, pool) = start().await;
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let mut greeted = Vec::new();
    for _ in 0..4 {
        serve_one(proxy.addr, &target, &mut greeted).await;
        // The replacement spare is in, its greeting seen by the pool.
        tokio::time::timeout(
            DEADLINE,
            view.wait_for(|s| s.idle == 1 && s.is_quiet() && s.policy.speaks_first),
        )
        .await
        .expect("a greeted spare")
        .expect("view");
    }
    proxy.stop().await;
    // Hits were counted for sessions served on spares.
    assert!(view.borrow().counters.hits >= 3, "{:?}", view.borrow());
}
