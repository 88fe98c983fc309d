//! Issue 18: where a spare pays. Each test fails on the earlier policy (one background dial per
//! checkout, up to the limits, whatever became of it).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use poolsocks::pool::{Pool, PoolOptions, TargetReason};
use poolsocks::socks::{ReplyCode, TargetAddr};
use poolsocks::telemetry::{EventQuery, Telemetry};
use poolsocks::upstream::{ConnectError, Connector, Origin, TcpDialer};
use tokio::net::TcpListener;

/// An upstream on every loopback address of one port, counting what it accepts and holding
/// each connection open until its client closes.
async fn wildcard_upstream() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            });
        }
    });
    (port, accepted)
}

/// A destination's published view once its manager is quiet (nothing pending or in use).
async fn at_rest(pool: &Pool, target: &TargetAddr) -> poolsocks::pool::DestStats {
    let mut view = pool.watch_destination(target).await.expect("watch");
    let quiet = tokio::time::timeout(Duration::from_secs(10), view.wait_for(|s| s.is_quiet()))
        .await
        .expect("quiet")
        .expect("view")
        .clone();
    quiet
}

fn destination(n: usize, port: u16) -> TargetAddr {
    let ip = Ipv4Addr::new(127, 3, (n / 250) as u8, (n % 250) as u8 + 1);
    TargetAddr::Ip(SocketAddr::new(ip.into(), port))
}

/// A small deterministic generator: the same mix on every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_distant_destinations_under_default_limits_waste_no_spares() {
    const DESTINATIONS: usize = 1_000;
    const CLIENTS: usize = 16;
    const SESSIONS_PER_CLIENT: usize = 250;
    let (port, accepted) = wildcard_upstream().await;
    let options = PoolOptions { janitor_period: None, ..PoolOptions::default() };
    assert_eq!((options.max_total_idle, options.max_idle_per_dest), (100, 4), "default limits");
    let dialer = Arc::new(DistantDialer { delay: Duration::from_millis(5) });
    let pool = Pool::spawn(options, dialer, Telemetry::disabled()).await.expect("pool");

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let pool = pool.clone();
        clients.push(tokio::spawn(async move {
            let mut mix = Mix(0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1));
            for _ in 0..SESSIONS_PER_CLIENT {
                let target = destination(mix.next(DESTINATIONS), port);
                let upstream = pool.acquire(&target).await.expect("served");
                upstream.finish(false);
            }
        }));
    }
    for client in clients {
        client.await.expect("client");
    }
    let mut budget = pool.watch_budget().await.expect("budget");
    tokio::time::timeout(
        Duration::from_secs(20),
        budget.wait_for(|b| b.reserved + b.evicting + b.waiting == 0),
    )
    .await
    .expect("budget at rest")
    .expect("watch");
    let stats = pool.stats().await.expect("stats");
    let sessions = (CLIENTS * SESSIONS_PER_CLIENT) as u64;
    let spares_dialed = stats.total_created.saturating_sub(stats.pool_misses);
    println!(
        "sessions {sessions}: hits {} misses {} first sightings {} spares dialed {spares_dialed} \
         evicted {} denied_colder {} accepted upstream {}",
        stats.pool_hits,
        stats.pool_misses,
        stats.first_sightings,
        stats.evicted,
        stats.budget.denied_colder,
        accepted.load(Ordering::SeqCst)
    );
    // The earlier policy dialed a spare on every miss and evicted another's to hold it:
    // 1.9 upstream connections per session, nine spares in ten evicted unused.
    assert!(
        stats.evicted * 10 <= spares_dialed.max(1),
        "{} of {spares_dialed} spares evicted unused",
        stats.evicted
    );
    let opened = accepted.load(Ordering::SeqCst) as f64;
    assert!(
        opened / sessions as f64 <= 1.05,
        "{opened} upstream connections for {sessions} sessions"
    );
    assert!(stats.budget.high_water <= 100);
    pool.shutdown().await;
}

#[tokio::test]
async fn a_destination_as_cheap_to_dial_as_a_message_gets_no_spares() {
    // Default policy: a loopback upstream dials in microseconds.
    let mut echo = EchoServer::start().await;
    let target = TargetAddr::Ip(echo.addr);
    let options = PoolOptions { janitor_period: None, ..PoolOptions::default() };
    let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool");
    for _ in 0..40 {
        let upstream = pool.acquire(&target).await.expect("served");
        assert_eq!(upstream.origin, Origin::Dialed);
        upstream.finish(false);
    }
    let stats = pool.stats().await.expect("stats");
    // The first dial measured it cheap: no manager was ever started, and every later
    // checkout was dialed by the handle without a message.
    assert_eq!(stats.cheap_destinations, 1, "{stats:?}");
    assert_eq!(stats.destinations, 0, "no manager: {stats:?}");
    assert_eq!(stats.budget.high_water, 0, "no spare was ever made: {stats:?}");
    assert_eq!(stats.first_sightings, 1, "{stats:?}");
    assert_eq!(
        stats.bypassed + stats.pool_misses + stats.first_sightings,
        40,
        "every session is counted once: {stats:?}"
    );
    // The far side saw one connection per session, none more.
    for _ in 0..40 {
        echo.accepted.recv().await.expect("accepted");
    }
    assert!(echo.accepted.try_recv().is_err(), "a connection nobody asked for");
    pool.shutdown().await;
}

/// Dials after a delay that a test changes while the pool runs.
struct AdjustableDialer {
    delay_ms: Arc<AtomicUsize>,
}

impl poolsocks::upstream::Dialer for AdjustableDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: poolsocks::upstream::DialLimits,
    ) -> poolsocks::upstream::BoxFuture<
        'static,
        Result<tokio::net::TcpStream, poolsocks::upstream::ConnectError>,
    > {
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst) as u64);
        Box::pin(async move {
            // Even a zero sleep waits for the timer's next millisecond tick.
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            poolsocks::upstream::Dialer::dial(&TcpDialer::new(), target, limits).await
        })
    }
}

#[tokio::test]
async fn a_cheap_destination_that_turns_distant_is_pooled_again() {
    let echo = EchoServer::start().await;
    let target = TargetAddr::Ip(echo.addr);
    let delay_ms = Arc::new(AtomicUsize::new(0));
    let dialer = AdjustableDialer { delay_ms: Arc::clone(&delay_ms) };
    let options = PoolOptions { janitor_period: None, ..PoolOptions::default() };
    let pool = Pool::spawn(options, Arc::new(dialer), Telemetry::disabled()).await.expect("pool");
    for _ in 0..3 {
        pool.acquire(&target).await.expect("served").finish(false);
    }
    assert_eq!(pool.stats().await.expect("stats").cheap_destinations, 1);

    // The route moved (a failover to another site): each dial now costs 20 ms.
    delay_ms.store(20, Ordering::SeqCst);
    pool.acquire(&target).await.expect("served").finish(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.stats().await.expect("stats").cheap_destinations != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the cheap route was never dropped");
        tokio::task::yield_now().await;
    }
    // Judged again from scratch: admitted on its second sighting, measured by its manager.
    for _ in 0..3 {
        pool.acquire(&target).await.expect("served").finish(false);
    }
    let rest = at_rest(&pool, &target).await;
    assert_ne!(rest.policy.reason, TargetReason::CheapDial, "{rest:?}");
    assert!(rest.refill.dial_time_ms.is_some_and(|ms| ms >= 20.0), "{rest:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_connect_that_fails_starts_no_background_dial() {
    let refused = TargetAddr::Ip(closed_port().await);
    let telemetry = Telemetry::new(&poolsocks::config::TelemetryConfig {
        enabled: true,
        max_events: 100,
        retention_hours: 1,
    });
    let options =
        PoolOptions { janitor_period: None, cheap_dial: Duration::ZERO, ..PoolOptions::default() };
    let pool =
        Pool::spawn(options, Arc::new(TcpDialer::new()), telemetry.clone()).await.expect("pool");
    for _ in 0..5 {
        let failed = pool.acquire(&refused).await;
        assert!(matches!(failed, Err(ConnectError::Io { .. })), "refused");
    }
    let rest = at_rest(&pool, &refused).await;
    // Four misses (after the first sighting), each the client's own dial; none started a spare.
    assert_eq!(rest.counters.connect_failures, 4, "{rest:?}");
    assert!(!rest.backing_off, "no background dial failed: {rest:?}");
    let dial_events =
        telemetry.query(&EventQuery { category: Some("pool.dial".into()), ..Default::default() });
    assert!(
        dial_events.is_empty(),
        "a client's failed CONNECT made the pool dial: {dial_events:?}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn through_the_server_a_refused_port_costs_the_client_alone() {
    let refused = closed_port().await;
    let mut config = test_config();
    config.server.pool.enabled = true;
    let server = build_server(config).await.expect("build");
    let pool = server.pool().expect("pool");
    let telemetry = server.telemetry();
    let proxy = TestProxy::start_server(server).await;
    for _ in 0..3 {
        let (_stream, reply) = connect(proxy.addr, refused.into()).await;
        assert_eq!(reply.code, ReplyCode::ConnectionRefused);
    }
    let stats = pool.stats().await.expect("stats");
    assert_eq!(stats.total_created, 0);
    let errors =
        telemetry.query(&EventQuery { category: Some("pool.dial".into()), ..Default::default() });
    assert!(errors.is_empty(), "{errors:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_destination_clearly_busier_than_a_spare_s_own_still_displaces_it() {
    let (port, _accepted) = wildcard_upstream().await;
    let options = PoolOptions {
        janitor_period: None,
        cheap_dial: Duration::ZERO,
        admission: poolsocks::pool::Admission::Always,
        max_total_idle: 2,
        max_idle_per_dest: 2,
        ..PoolOptions::default()
    };
    let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool");
    // Two quiet destinations fill the budget with one spare each.
    let (cold_a, cold_b, hot) = (destination(1, port), destination(2, port), destination(3, port));
    for cold in [&cold_a, &cold_b] {
        pool.acquire(cold).await.expect("served").finish(false);
        let mut view = pool.watch_destination(cold).await.expect("watch");
        view.wait_for(|s| s.idle == 1 && s.is_quiet()).await.expect("a spare");
    }
    // A third one, asked for again and again, is refused a slot while it is as quiet as they
    // are, and evicts them once it has proven itself much busier.
    let mut hot_view = pool.watch_destination(&hot).await.expect("watch");
    for _ in 0..40 {
        pool.acquire(&hot).await.expect("served").finish(false);
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        hot_view.wait_for(|s| s.idle >= 1 && s.is_quiet()),
    )
    .await
    .expect("the busy destination got a spare")
    .expect("view");
    let stats = pool.stats().await.expect("stats");
    assert!(stats.evicted >= 1, "{stats:?}");
    assert!(stats.budget.denied_colder >= 1, "its first requests were refused: {stats:?}");
    assert!(stats.budget.high_water <= 2);
    pool.shutdown().await;
}

/// Issue 15: operators keep spares away from servers that log every abandoned connection.
#[tokio::test]
async fn excluded_ports_and_networks_get_no_spare_ever() {
    use poolsocks::config::PortRange;
    let mut by_port = EchoServer::start_on("127.0.0.5:0").await;
    let mut by_network = EchoServer::start_on("127.0.0.2:0").await;
    let mut by_name = EchoServer::start().await;
    let mut control = EchoServer::start_on("127.0.0.4:0").await;
    let options = PoolOptions {
        janitor_period: None,
        cheap_dial: Duration::ZERO,
        admission: poolsocks::pool::Admission::Always,
        exclude_ports: vec![PortRange { first: by_port.addr.port(), last: by_port.addr.port() }],
        // 127.0.0.1/32 covers `localhost` only once its dial shows where it went.
        exclude_networks: vec![
            "127.0.0.2/32".parse().expect("net"),
            "127.0.0.1/32".parse().expect("net"),
        ],
        ..PoolOptions::default()
    };
    let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool");
    let name = TargetAddr::Domain("localhost".into(), by_name.addr.port());
    let excluded = [TargetAddr::Ip(by_port.addr), TargetAddr::Ip(by_network.addr), name.clone()];
    for target in &excluded {
        for _ in 0..10 {
            let upstream = pool.acquire(target).await.expect("served");
            assert_eq!(upstream.origin, Origin::Dialed, "{target}");
            upstream.finish(false);
        }
    }
    let rest = at_rest(&pool, &name).await;
    assert_eq!(rest.policy.reason, TargetReason::Excluded, "{rest:?}");
    assert_eq!(rest.idle_high_water, 0, "{rest:?}");
    // Each server saw exactly one connection per session: not one spare.
    for server in [&mut by_port, &mut by_network, &mut by_name] {
        for _ in 0..10 {
            server.accepted.recv().await.expect("accepted");
        }
        assert!(server.accepted.try_recv().is_err(), "a spare reached an excluded server");
    }
    assert_eq!(pool.stats().await.expect("stats").budget.high_water, 0);

    // The same options do keep spares elsewhere, so the test can tell.
    let mut spares = pool.watch_budget().await.expect("budget");
    pool.acquire(&TargetAddr::Ip(control.addr)).await.expect("served").finish(false);
    let _ = control.accepted.recv().await;
    tokio::time::timeout(Duration::from_secs(10), spares.wait_for(|b| b.high_water > 0))
        .await
        .expect("a spare for a destination not excluded")
        .expect("budget view");
    pool.shutdown().await;
}

/// A destination without a manager is dialed at once: its clients wait for no actor. With the
/// Directory held up (a Janitor pass waiting on a stalled manager), a new destination's first
/// two sessions are served by their own dials and neither counts as a fallback; once the
/// Directory is free it counts them as it always did (a first sighting, then an admission and
/// a miss). The handle used to ask the Directory before dialing a destination it had no route
/// for: both sessions waited `checkout_timeout`, then fell back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_destination_is_dialed_without_waiting_for_a_busy_directory() {
    use poolsocks::pool::{DirectoryMsg, Fault, ManagerMsg};
    use ractor::rpc::CallResult;

    let (port, _accepted) = wildcard_upstream().await;
    let options = PoolOptions {
        janitor_period: None,
        cheap_dial: Duration::ZERO,
        checkout_timeout: Duration::from_millis(200),
        sweep_call_timeout: Duration::from_secs(2),
        ..PoolOptions::default()
    };
    let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool");
    let stalled = destination(1, port);
    for _ in 0..2 {
        pool.acquire(&stalled).await.expect("dial").finish(false);
    }
    let manager = pool.manager_of(&stalled).await.expect("pool").expect("admitted");
    let stall = ManagerMsg::InjectFault(Fault::Stall(Duration::from_secs(3)));
    assert!(manager.cast(stall).is_ok());
    let pass = tokio::spawn({
        let pool = pool.clone();
        async move { pool.run_janitor().await }
    });
    // The Directory is inside that pass once a call to it goes unanswered.
    loop {
        let probe = pool.directory().call(DirectoryMsg::Stats, Some(Duration::from_millis(50)));
        if let Ok(CallResult::Timeout) = probe.await {
            break;
        }
    }

    let new = destination(2, port);
    for _ in 0..2 {
        let upstream = pool.acquire(&new).await.expect("dial");
        assert_eq!(upstream.origin, Origin::Dialed);
        upstream.finish(false);
    }
    assert_eq!(pool.fallback_dials(), 0, "served without asking the busy Directory");

    let report = pass.await.expect("janitor task").expect("janitor pass");
    assert_eq!(report.unresponsive, 1, "the pass did wait on the stalled manager");
    // The second sighting reaches its new manager by casts (Directory, then manager): await
    // its miss being counted instead of racing it.
    let mut view = pool.watch_destination(&new).await.expect("pool");
    tokio::time::timeout(Duration::from_secs(5), view.wait_for(|s| s.counters.misses == 1))
        .await
        .expect("the second sighting is counted as a miss")
        .expect("view");
    let stats = pool.stats().await.expect("stats");
    assert_eq!((stats.first_sightings, stats.pool_misses), (2, 2), "{stats:?}");
    assert!(pool.manager_of(&new).await.expect("pool").is_some(), "admitted on its second");
    pool.shutdown().await;
}
