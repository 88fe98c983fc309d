//! Full SOCKS5 flows with pooling across mixed and failing destinations; the pool's stats must
//! agree with what the upstream servers themselves saw.

mod common;

use std::time::Duration;

use common::*;
use poolsocks::config::{SocksMethod, UserConfig};
use poolsocks::secret::Secret;
use poolsocks::socks::{ReplyCode, TargetAddr};

/// First sightings of the refused destination made no connection.
fn first_sightings_refused(stats: &poolsocks::pool::PoolStats) -> u64 {
    let refused = stats.per_destination.iter();
    refused.filter(|d| d.counters.created == 0 && d.counters.connect_failures > 0).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_and_failing_destinations_with_authentication_and_exact_stats() {
    let mut upstreams =
        vec![TaggedServer::start().await, TaggedServer::start().await, TaggedServer::start().await];
    let refused: TargetAddr = closed_port().await.into();
    let mut config = test_config();
    config.server.pool.enabled = true;
    config.server.pool.max_idle_per_dest = 2;
    config.server.pool.max_total_idle = 4; // less than 3 x 2: the budget has to arbitrate
    config.auth.socks_method = Some(SocksMethod::Userpass);
    config.auth.users = vec![UserConfig { username: "u".into(), password: Secret::new("p") }];
    let server = common::build_server(config).await.expect("build");
    let pool = server.pool().expect("pool enabled");
    let proxy = TestProxy::start_server(server).await;

    // A fixed, shuffled-looking schedule over the three good destinations, a refused one and a
    // domain name that resolves to the first one.
    let by_name = TargetAddr::Domain("localhost".into(), upstreams[0].addr.port());
    let mut sessions = 0u64;
    let mut failures = 0u64;
    for step in 0..60usize {
        let choice = (step * 7 + step / 3) % 5;
        let target: TargetAddr = match choice {
            0..=2 => upstreams[choice].addr.into(),
            3 => refused.clone(),
            _ => by_name.clone(),
        };
        let (mut stream, reply) = connect_with_password(proxy.addr, target, "u", "p").await;
        if choice == 3 {
            assert_eq!(reply.code, ReplyCode::ConnectionRefused);
            failures += 1;
            continue;
        }
        assert_eq!(reply.code, ReplyCode::Succeeded);
        assert_eq!(
            round_trip(&mut stream, format!("step {step}").as_bytes()).await,
            format!("step {step}").as_bytes()
        );
        sessions += 1;
    }

    // Let every destination come to rest, then compare the pool's books with the servers'.
    let mut keys: Vec<TargetAddr> = upstreams.iter().map(|u| u.addr.into()).collect();
    keys.push(by_name.clone());
    keys.push(refused.clone());
    for key in &keys {
        let mut view = pool.watch_destination(key).await.expect("watch");
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(|s| s.is_quiet()))
            .await
            .expect("at rest")
            .expect("view");
    }
    let budget = pool.watch_budget().await.expect("budget");
    let stats = pool.stats().await.expect("stats");
    // Drain what the servers saw until their open sockets match the pool's idle spares.
    let mut accepted = 0;
    let mut open = 0;
    for upstream in &mut upstreams {
        upstream.drain();
        accepted += upstream.accepted();
        open += upstream.open();
    }
    // Connections still closing after their sessions show up as open a moment longer: await
    // the servers' close events until their open sockets match the pool's idle spares.
    while open != stats.total_idle {
        let [a, b, c] = &mut upstreams[..] else { unreachable!("three upstreams") };
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                Some(event) = a.events.recv() => a.seen.push(event),
                Some(event) = b.events.recv() => b.seen.push(event),
                Some(event) = c.events.recv() => c.seen.push(event),
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "upstreams hold {open} sockets but the pool says {} idle",
            stats.total_idle
        );
        open = upstreams.iter().map(|u| u.open()).sum();
    }

    assert_eq!(stats.connections_in_use, 0);
    assert_eq!(stats.pending_creates, 0);
    assert!(stats.total_idle <= 4, "max_total_idle exceeded: {stats:?}");
    assert!(budget.borrow().high_water <= 4, "budget high water {:?}", budget.borrow());
    for dest in &stats.per_destination {
        assert!(dest.idle_high_water <= 2, "max_idle_per_dest exceeded: {dest:?}");
    }
    // Each destination's first checkout is a first sighting: dialed for its client, no spare.
    assert_eq!(stats.first_sightings, stats.per_destination.len() as u64, "{stats:?}");
    assert_eq!(
        stats.pool_hits + stats.pool_misses + stats.fallback_dials + stats.first_sightings,
        sessions + failures,
        "{stats:?}"
    );
    assert_eq!(
        accepted as u64,
        stats.total_created + stats.fallback_dials + stats.first_sightings
            - first_sightings_refused(&stats),
        "accepts vs created: {stats:?}"
    );
    assert!(stats.connect_failures >= 1, "the refused destination's dials are counted");
    assert!(stats.pool_hits > 0, "no session was served by a spare: {stats:?}");
    proxy.stop().await;
}
