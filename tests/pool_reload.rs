//! The pool taking a reloaded config by message, at the actor level: the budget lowering
//! `max_total_idle` with reservations in flight, managers trimming to a lower per-destination
//! limit, spares closed when the rules deny their peer or a port is newly excluded, and the
//! pool turned off and on through a running server. Spares are counted at the upstream servers.

mod common;

use common::upstreams::Upstreams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolsocks::access::AccessPolicy;
use poolsocks::config::{Config, PoolConfig, PortRange};
use poolsocks::pool::{Admission, BudgetStats, Pool, PoolOptions, RefillMode};
use poolsocks::resolve::StaticResolver;
use poolsocks::socks::{ReplyCode, TargetAddr};
use poolsocks::telemetry::Telemetry;
use poolsocks::upstream::{
    BoxFuture, ConnectError, Connector, DialLimits, Dialer, Origin, PolicyDialer, TcpDialer,
};
use tokio::net::TcpStream;
use tokio::sync::watch;

const PATIENCE: Duration = Duration::from_secs(20);

/// Dials like `TcpDialer`, but after the first dial to a `held` destination (its first
/// client's own, after which the manager starts the background one) the dials there wait
/// until the gate opens.
struct GatedDialer {
    held: Mutex<HashMap<TargetAddr, usize>>,
    gate: watch::Receiver<bool>,
}

impl Dialer for GatedDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        let wait = self.held.lock().expect("lock").get_mut(&target).is_some_and(|dials| {
            *dials += 1;
            *dials > 1
        });
        let mut gate = self.gate.clone();
        Box::pin(async move {
            if wait {
                let _ = gate.wait_for(|open| *open).await;
            }
            TcpDialer::new().dial(target, limits).await
        })
    }
}

fn options(max_idle_per_dest: usize, max_total_idle: usize, refill: RefillMode) -> PoolOptions {
    let mut options = PoolOptions::from_config(&PoolConfig {
        enabled: true,
        max_idle_per_dest,
        max_total_idle,
        ..PoolConfig::default()
    });
    options.janitor_period = None;
    options.admission = Admission::Always;
    options.refill = refill;
    options.connect_phase_timeout = PATIENCE * 2;
    // Loopback dials are cheap: spares anyway, the tests count them.
    options.cheap_dial = Duration::ZERO;
    options
}

async fn wait_budget(
    budget: &mut watch::Receiver<BudgetStats>,
    done: impl FnMut(&BudgetStats) -> bool,
) {
    let reached = matches!(tokio::time::timeout(PATIENCE, budget.wait_for(done)).await, Ok(Ok(_)));
    assert!(reached, "budget never got there: {:?}", *budget.borrow());
}

/// One session that moves a byte (so its connection is closed, not pooled), leaving the
/// background dial it started.
async fn session(pool: &Pool, target: SocketAddr) {
    let upstream = pool.acquire(&TargetAddr::Ip(target)).await.expect("acquire");
    upstream.finish(false);
}

#[tokio::test(flavor = "multi_thread")]
async fn lowering_max_total_idle_evicts_down_to_it_with_reservations_in_flight() {
    let mut upstreams = Upstreams::start(41).await;
    let (gate, gate_rx) = watch::channel(false);
    let dialer = Arc::new(GatedDialer { held: Mutex::new(HashMap::new()), gate: gate_rx });
    let held: Vec<SocketAddr> = upstreams.addrs[30..40].to_vec();
    dialer.held.lock().expect("lock").extend(held.iter().map(|a| (TargetAddr::Ip(*a), 0)));
    let pool =
        Pool::spawn(options(1, 40, RefillMode::Replace), dialer.clone(), Telemetry::disabled())
            .await
            .expect("pool");
    let mut budget = pool.watch_budget().await.expect("watch budget");

    // 30 destinations with a spare each, then 10 whose background dials hang: 10 slots
    // reserved for dials in flight.
    for addr in upstreams.addrs[..30].iter().copied() {
        session(&pool, addr).await;
    }
    upstreams.await_open(30).await;
    for addr in held {
        session(&pool, addr).await;
    }
    wait_budget(&mut budget, |b| b.pooled == 30 && b.reserved == 10).await;

    // Watch every state the budget publishes from the change on.
    let mut watched = budget.clone();
    let watcher = tokio::spawn(async move {
        let mut over = Vec::new();
        let mut seen = 0;
        while watched.changed().await.is_ok() {
            let b = watched.borrow_and_update().clone();
            if b.max_total_idle == 10 {
                seen += 1;
                if b.reserved + b.lent + b.pooled > 10 {
                    over.push(b.clone());
                }
                if b.pooled == 10 && b.evicting == 0 && b.reserved == 0 {
                    break;
                }
            }
        }
        (seen, over)
    });

    pool.reconfigure(options(1, 10, RefillMode::Replace)).await.expect("reconfigure");
    wait_budget(&mut budget, |b| b.max_total_idle == 10 && b.evicting == 0).await;
    {
        let b = budget.borrow();
        // Over by 30: the 30 pooled spares went (least recently pooled first); the 10 dials in
        // flight keep their slots.
        assert_eq!((b.pooled, b.reserved, b.evictions), (0, 10, 30), "{b:?}");
    }
    // A new destination asks for a slot while the total is at the limit: it must wait for an
    // eviction, never push the total over.
    session(&pool, upstreams.addrs[40]).await;
    upstreams.await_open(0).await;

    gate.send_replace(true);
    let (seen, over) =
        tokio::time::timeout(PATIENCE, watcher).await.expect("watcher").expect("task");
    assert!(over.is_empty(), "over the limit: {over:?}");
    assert!(seen > 0);
    upstreams.await_open(10).await;
    wait_budget(&mut budget, |b| b.pooled == 10 && b.reserved == 0).await;
    let stats = pool.stats().await.expect("stats");
    assert_eq!(stats.total_idle, 10);
    assert_eq!(stats.budget.in_use(), 10);
    assert_eq!(stats.evicted, stats.budget.evictions);
    pool.shutdown().await;
}

/// A pool whose spares come only from untouched returns: 4 per destination, 100 in all.
async fn pool_of_returns_only() -> Pool {
    Pool::spawn(options(4, 100, RefillMode::Off), Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool")
}

/// `count` spares to `target`, from untouched returns (no background dials).
async fn spares_by_return(pool: &Pool, target: &TargetAddr, count: usize) {
    let mut sessions = Vec::new();
    for _ in 0..count {
        let upstream = pool.acquire(target).await.expect("acquire");
        assert_eq!(upstream.origin, Origin::Dialed);
        sessions.push(upstream);
    }
    for upstream in sessions {
        upstream.finish(true);
    }
    let mut dest = pool.watch_destination(target).await.expect("watch");
    let waited = tokio::time::timeout(PATIENCE, dest.wait_for(|d| d.idle == count));
    let reached = matches!(waited.await, Ok(Ok(_)));
    assert!(reached, "{:?}", *dest.borrow());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_per_destination_limit_trims_the_oldest_spares() {
    let mut upstreams = Upstreams::start(1).await;
    let target = TargetAddr::Ip(upstreams.addrs[0]);
    let pool = pool_of_returns_only().await;
    spares_by_return(&pool, &target, 4).await;
    upstreams.await_open(4).await;

    pool.reconfigure(options(1, 100, RefillMode::Off)).await.expect("reconfigure");
    upstreams.await_open(1).await;
    // The upstream may see the last close a moment before the manager publishes it.
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let waited = tokio::time::timeout(PATIENCE, view.wait_for(|d| d.idle == 1));
    assert!(matches!(waited.await, Ok(Ok(_))));
    let dest = view.borrow().clone();
    assert_eq!((dest.idle, dest.counters.trimmed), (1, 3), "{dest:?}");
    let mut budget = pool.watch_budget().await.expect("watch budget");
    wait_budget(&mut budget, |b| b.pooled == 1 && b.evicting == 0).await;
    let stats = pool.stats().await.expect("stats");
    assert_eq!((stats.total_idle, stats.budget.pooled), (1, 1));
    // The one kept is handed out as usual.
    let upstream = pool.acquire(&target).await.expect("acquire");
    assert_eq!(upstream.origin, Origin::Pooled);
    upstream.finish(false);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spares_whose_peer_the_new_rules_deny_are_closed() {
    let mut upstreams = Upstreams::start(2).await;
    let (denied, kept) = (TargetAddr::Ip(upstreams.addrs[0]), TargetAddr::Ip(upstreams.addrs[1]));
    let policy = AccessPolicy::allow_all().shared();
    let dialer = Arc::new(PolicyDialer::new(policy.clone(), Arc::new(StaticResolver::new())));
    let pool = Pool::spawn(options(4, 100, RefillMode::Off), dialer, Telemetry::disabled())
        .await
        .expect("pool");
    spares_by_return(&pool, &denied, 2).await;
    spares_by_return(&pool, &kept, 1).await;
    upstreams.await_open(3).await;

    let rules = Config::from_toml(
        &format!(
            "[[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.1/32\"]\nports = [{}]\n",
            upstreams.addrs[0].port()
        ),
        None,
    )
    .expect("valid");
    policy.store(Arc::new(AccessPolicy::from_config(&rules)));
    pool.reconfigure(options(4, 100, RefillMode::Off)).await.expect("reconfigure");
    upstreams.await_open(1).await;
    let mut view = pool.watch_destination(&denied).await.expect("watch");
    let waited = tokio::time::timeout(PATIENCE, view.wait_for(|d| d.idle == 0));
    assert!(matches!(waited.await, Ok(Ok(_))));
    let mut budget = pool.watch_budget().await.expect("watch budget");
    wait_budget(&mut budget, |b| b.pooled == 1).await;
    let stats = pool.stats().await.expect("stats");
    assert_eq!((stats.total_idle, stats.closed_by_rules), (1, 2));
    assert_eq!(stats.budget.pooled, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spares_of_a_newly_excluded_port_are_closed_and_none_come_back() {
    let mut upstreams = Upstreams::start(2).await;
    let (excluded, kept) = (TargetAddr::Ip(upstreams.addrs[0]), TargetAddr::Ip(upstreams.addrs[1]));
    let pool = pool_of_returns_only().await;
    spares_by_return(&pool, &excluded, 2).await;
    spares_by_return(&pool, &kept, 1).await;
    upstreams.await_open(3).await;

    let port = upstreams.addrs[0].port();
    let mut reloaded = options(4, 100, RefillMode::Off);
    reloaded.exclude_ports = vec![PortRange { first: port, last: port }];
    pool.reconfigure(reloaded).await.expect("reconfigure");
    // Counted where the spares were held: only the kept destination's is still open.
    upstreams.await_open(1).await;
    let mut view = pool.watch_destination(&excluded).await.expect("watch");
    let waited = tokio::time::timeout(PATIENCE, view.wait_for(|d| d.idle == 0));
    assert!(matches!(waited.await, Ok(Ok(_))), "{:?}", *view.borrow());
    assert_eq!(view.borrow().counters.closed_by_rules, 2);
    let mut budget = pool.watch_budget().await.expect("watch budget");
    wait_budget(&mut budget, |b| b.pooled == 1).await;

    // An untouched return to the excluded port is closed, not kept as a spare.
    let upstream = pool.acquire(&excluded).await.expect("acquire");
    assert_eq!(upstream.origin, Origin::Dialed);
    upstream.finish(true);
    upstreams.await_open(1).await;
    let stats = pool.stats().await.expect("stats");
    assert_eq!((stats.total_idle, stats.budget.pooled), (1, 1), "{stats:?}");
    // The other destination's spare is handed out as before.
    let upstream = pool.acquire(&kept).await.expect("acquire");
    assert_eq!(upstream.origin, Origin::Pooled);
    upstream.finish(false);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn turning_the_pool_off_closes_every_spare_and_on_starts_one() {
    let mut upstreams = Upstreams::start(1).await;
    let target: TargetAddr = upstreams.addrs[0].into();
    let mut config = common::test_config();
    config.server.pool.enabled = true;
    config.server.pool.max_idle_per_dest = 1;
    let server = common::build_server(config.clone()).await.expect("server");
    let reloader = server.reloader();
    let proxy = common::TestProxy::start_server(server).await;
    let twice = |target: TargetAddr| async move {
        for _ in 0..2 {
            let (mut stream, reply) = common::connect(proxy.addr, target.clone()).await;
            assert_eq!(reply.code, ReplyCode::Succeeded);
            assert_eq!(common::round_trip(&mut stream, b"x").await, b"x");
        }
    };
    twice(target.clone()).await;
    upstreams.await_open(1).await; // the spare

    let mut off = config.clone();
    off.server.pool.enabled = false;
    let report = reloader.reload(off.clone()).await.expect("reload off");
    assert_eq!(report.changed, ["server.pool.enabled"]);
    upstreams.await_open(0).await;
    twice(target.clone()).await;
    upstreams.await_open(0).await; // direct: nothing kept

    let report = reloader.reload(config.clone()).await.expect("reload on");
    assert_eq!(report.changed, ["server.pool.enabled"]);
    twice(target.clone()).await;
    upstreams.await_open(1).await; // a spare from the new pool

    // A key that needs a restart is refused, naming it; nothing else changes.
    let mut moved = config.clone();
    moved.server.bind_port = 1;
    moved.server.pool.max_total_idle = 5;
    let refused = reloader.reload(moved).await.expect_err("refused");
    assert_eq!(refused.to_string().split(' ').next(), Some("server.bind_port"));
    for (key, change) in [
        ("server.proxy_protocol, server.proxy_protocol_trusted", {
            let mut c = config.clone();
            c.server.proxy_protocol = true;
            c.server.proxy_protocol_trusted = vec!["10.0.0.5/32".parse().expect("net")];
            c
        }),
        ("server.reuse_port", {
            let mut c = config.clone();
            c.server.reuse_port = true;
            c
        }),
        ("sessions.stats_api_port", {
            let mut c = config.clone();
            c.sessions.stats_api_port = 9999;
            c
        }),
    ] {
        let refused = reloader.reload(change).await.expect_err("refused");
        assert!(refused.to_string().starts_with(&format!("{key} changed")), "{refused}");
    }
    proxy.stop().await;
    upstreams.await_open(0).await;
}

/// Whether the proxy admits a new client now (a client over `max_connections` is accepted
/// and closed at once, so its greeting gets no answer).
async fn admitted(proxy: SocketAddr) -> Option<TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream.write_all(&[5, 1, 0]).await.ok()?;
    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await.ok()?;
    Some(stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn lowering_max_connections_cuts_no_session_and_takes_effect_as_they_end() {
    let echo = common::EchoServer::start().await;
    let mut config = common::test_config();
    config.server.max_connections = 3;
    let server = common::build_server(config.clone()).await.expect("server");
    let reloader = server.reloader();
    let proxy = common::TestProxy::start_server(server).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let (stream, reply) = common::connect(proxy.addr, echo.addr.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        held.push(stream);
    }
    assert!(admitted(proxy.addr).await.is_none(), "three of three taken");

    config.server.max_connections = 1;
    let report = reloader.reload(config.clone()).await.expect("reload");
    assert_eq!(report.changed, ["server.max_connections"]);
    for stream in &mut held {
        assert_eq!(common::round_trip(stream, b"kept").await, b"kept", "no session cut");
    }
    assert!(admitted(proxy.addr).await.is_none());
    drop(held);
    // As the three end, two of their places are forgotten: one client at a time from now on.
    assert!(common::serve_once_admitted(proxy.addr, echo.addr).await);
    let mut one = None;
    for _ in 0..10_000 {
        one = admitted(proxy.addr).await;
        if one.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(one.is_some(), "the one place came back");
    assert!(admitted(proxy.addr).await.is_none(), "and only one");

    // Raised again: room at once, while the one is still held.
    config.server.max_connections = 2;
    reloader.reload(config).await.expect("reload");
    assert!(admitted(proxy.addr).await.is_some());
    drop(one);
    proxy.stop().await;
}
