//! Issue 14, item 9: memory comes back once the pool has let go of many destinations. Alone in
//! its binary, so no other test's allocations move the process's RSS meanwhile.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use poolsocks::pool::{Admission, Pool, PoolOptions};
use poolsocks::socks::TargetAddr;
use poolsocks::telemetry::Telemetry;
use poolsocks::upstream::{Connector, TcpDialer};
use tokio::net::TcpListener;

const DESTINATIONS: usize = 5_000;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_after_thousands_of_destinations_are_pruned() {
    // Every loopback address on one port, each connection held until the pool closes it.
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
            });
        }
    });
    let options = PoolOptions {
        janitor_period: None,
        cheap_dial: Duration::ZERO,
        admission: Admission::Always,
        cold_after: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
        ..PoolOptions::default()
    };
    let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
        .await
        .expect("pool");
    let target = |n: usize| {
        let ip = Ipv4Addr::new(127, 4, (n / 250) as u8, (n % 250) as u8 + 1);
        TargetAddr::Ip(SocketAddr::new(ip.into(), port))
    };
    let before = rss_kib();
    for n in 0..DESTINATIONS {
        pool.acquire(&target(n)).await.expect("served").finish(false);
    }
    let stats = pool.stats().await.expect("stats");
    assert_eq!(stats.destinations, DESTINATIONS, "one manager each");
    let peak = rss_kib();
    let grown = peak.saturating_sub(before);
    assert!(grown > 10_000, "the managers should have cost memory: {before} -> {peak} KiB");

    // Cold now; the Janitor prunes them, and a pass later asks the allocator to give back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut after = peak;
    loop {
        pool.run_janitor().await.expect("janitor");
        let stats = pool.stats().await.expect("stats");
        after = after.min(rss_kib());
        if stats.destinations == 0 && after < before + grown / 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RSS {before} KiB before, {peak} at {DESTINATIONS} destinations, still {after} \
             with {} left",
            stats.destinations
        );
        tokio::task::yield_now().await;
    }
    println!("RSS: {before} KiB before, {peak} KiB at {DESTINATIONS} destinations, {after} KiB after pruning");
    pool.shutdown().await;
}
