//! 500 concurrent handlers against a few destinations, with real sockets on 127.0.0.1.
//!
//! Each handler runs a few sessions back to back: most ask the upstream "who" (so the
//! connection carried bytes and must never serve anyone else), some hand their connection back
//! untouched. The upstream servers' own records prove that no connection that carried one
//! session's bytes served another, that pooled hand-outs really skipped a connect, and that the
//! pool's counters match the sockets the servers still hold at the end.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolsocks::pool::{Pool, PoolOptions};
use poolsocks::socks::TargetAddr;
use poolsocks::telemetry::Telemetry;
use poolsocks::upstream::{Connector, Origin, TcpDialer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const HANDLERS: usize = 500;
const SESSIONS_PER_HANDLER: usize = 3;
const DESTINATIONS: usize = 4;
const PATIENCE: Duration = Duration::from_secs(60);

struct UpstreamServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// How many "who" questions each accepted connection answered.
    answered: Arc<Mutex<Vec<usize>>>,
    /// Connections accepted so far (the kernel completes a connect before `accept` sees it).
    accepted: watch::Sender<usize>,
    live: watch::Sender<usize>,
}

impl UpstreamServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = UpstreamServer {
            addr: listener.local_addr().unwrap(),
            peers: Arc::default(),
            answered: Arc::default(),
            accepted: watch::Sender::new(0),
            live: watch::Sender::new(0),
        };
        let (peers, answered, accepted, live) = (
            Arc::clone(&server.peers),
            Arc::clone(&server.answered),
            server.accepted.clone(),
            server.live.clone(),
        );
        tokio::spawn(async move {
            while let Ok((socket, peer)) = listener.accept().await {
                let index = {
                    let mut peers = peers.lock().unwrap();
                    peers.push(peer);
                    answered.lock().unwrap().push(0);
                    peers.len() - 1
                };
                live.send_modify(|n| *n += 1);
                accepted.send_modify(|n| *n += 1);
                let (answered, live) = (Arc::clone(&answered), live.clone());
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line == "who" {
                            answered.lock().unwrap()[index] += 1;
                            let reply = format!("conn {index}\n");
                            if write.write_all(reply.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    }
                    live.send_modify(|n| *n -= 1);
                });
            }
        });
        server
    }

    fn target(&self) -> TargetAddr {
        TargetAddr::Ip(self.addr)
    }

    fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }
}

async fn who(stream: &mut TcpStream) -> usize {
    stream.write_all(b"who\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await.unwrap();
    line.trim()
        .strip_prefix("conn ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"))
}

/// What one session saw.
struct Session {
    destination: usize,
    origin: Origin,
    /// The accepted connection that answered, if the session talked.
    answered_by: Option<usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_handlers_keep_the_counters_exact() {
    let mut servers = Vec::new();
    for _ in 0..DESTINATIONS {
        servers.push(UpstreamServer::start().await);
    }
    let servers = Arc::new(servers);
    let options = PoolOptions {
        max_idle_per_dest: 8,
        max_total_idle: 20,
        idle_timeout: Duration::from_secs(90),
        connect_timeout: Duration::from_secs(10),
        // Generous: this test is about exact counts; a fallback would still be counted.
        checkout_timeout: Duration::from_secs(10),
        janitor_period: Some(Duration::from_secs(1)),
        ..PoolOptions::default()
    };
    let pool =
        Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled()).await.unwrap();

    // Sample the limits while it runs, from the actors' own published states.
    let mut budget = pool.watch_budget().await.unwrap();
    let budget_sampler = tokio::spawn(async move {
        let mut worst = 0;
        loop {
            worst = worst.max(budget.borrow_and_update().in_use());
            assert!(worst <= 20, "global limit exceeded");
            if budget.changed().await.is_err() {
                return worst;
            }
        }
    });

    let (start_tx, start_rx) = watch::channel(false);
    let mut handlers = Vec::new();
    for handler in 0..HANDLERS {
        let pool = pool.clone();
        let servers = Arc::clone(&servers);
        let mut start = start_rx.clone();
        handlers.push(tokio::spawn(async move {
            // All 500 start together.
            start.wait_for(|go| *go).await.unwrap();
            let mut seen = Vec::new();
            for session in 0..SESSIONS_PER_HANDLER {
                let destination = (handler + session) % DESTINATIONS;
                let server = &servers[destination];
                let mut upstream = pool.acquire(&server.target()).await.unwrap();
                let origin = upstream.origin;
                // Every fifth session changes its mind and moves no byte.
                if (handler + session) % 5 == 0 {
                    upstream.finish(true);
                    seen.push(Session { destination, origin, answered_by: None });
                } else {
                    let index = who(&mut upstream.stream).await;
                    upstream.finish(false);
                    seen.push(Session { destination, origin, answered_by: Some(index) });
                }
            }
            seen
        }));
    }
    start_tx.send_replace(true);
    let mut sessions = Vec::new();
    for handler in handlers {
        sessions.extend(tokio::time::timeout(PATIENCE, handler).await.unwrap().unwrap());
    }
    assert_eq!(sessions.len(), HANDLERS * SESSIONS_PER_HANDLER);

    // From the upstreams' side: no connection answered two sessions, and every connection a
    // session talked over is the one the session was given.
    for (d, server) in servers.iter().enumerate() {
        let answered = server.answered.lock().unwrap().clone();
        assert!(
            answered.iter().all(|&n| n <= 1),
            "destination {d}: a connection served two sessions: {answered:?}"
        );
        let talked: Vec<usize> =
            sessions.iter().filter(|s| s.destination == d).filter_map(|s| s.answered_by).collect();
        let distinct: HashSet<usize> = talked.iter().copied().collect();
        assert_eq!(distinct.len(), talked.len());
    }

    // Wait for the pool to come to rest, then compare its counters with the upstreams.
    for server in servers.iter() {
        let mut dest = pool.watch_destination(&server.target()).await.unwrap();
        tokio::time::timeout(PATIENCE, dest.wait_for(|s| s.is_quiet()))
            .await
            .expect("destination never came to rest")
            .unwrap();
    }
    let mut budget = pool.watch_budget().await.unwrap();
    tokio::time::timeout(
        PATIENCE,
        budget.wait_for(|b| b.reserved + b.lent + b.evicting + b.waiting == 0),
    )
    .await
    .expect("budget never came to rest")
    .unwrap();
    let stats = pool.stats().await.unwrap();
    let total = (HANDLERS * SESSIONS_PER_HANDLER) as u64;
    println!(
        "sessions {total}: hits {} misses {} fallbacks {} created {} returned untouched {} \
         dropped_full {} evicted {} refill_denied {} idle {}",
        stats.pool_hits,
        stats.pool_misses,
        stats.fallback_dials,
        stats.total_created,
        stats.returned_untouched,
        stats.dropped_full,
        stats.evicted,
        stats.refill_denied,
        stats.total_idle
    );
    // Each destination's first checkout is a first sighting (dialed directly, no manager yet).
    assert_eq!(stats.first_sightings, DESTINATIONS as u64, "{stats:#?}");
    assert_eq!(
        stats.pool_hits + stats.pool_misses + stats.fallback_dials + stats.first_sightings,
        total,
        "{stats:#?}"
    );
    let pooled_sessions = sessions.iter().filter(|s| s.origin == Origin::Pooled).count() as u64;
    assert_eq!(stats.pool_hits, pooled_sessions);
    assert!(stats.pool_hits > 0, "sessions after the first wave reuse spares");
    assert_eq!(stats.connections_in_use, 0);
    assert_eq!(stats.pending_creates, 0);
    assert_eq!(stats.budget.pooled, stats.total_idle);
    assert!(stats.budget.high_water <= 20);
    assert!(stats.per_destination.iter().all(|d| d.idle <= 8 && d.idle_high_water <= 8));
    // Every connection the upstreams accepted was opened by the pool's path (a miss, a spare,
    // or a fallback), and a hit opened none. A dial completes in the kernel before the server's
    // accept loop sees it, so first let each server catch up with what its destination opened.
    for server in servers.iter() {
        let created = stats
            .per_destination
            .iter()
            .find(|d| d.destination == server.target().to_string())
            .map_or(0, |d| d.counters.created) as usize;
        let mut accepted = server.accepted.subscribe();
        tokio::time::timeout(PATIENCE, accepted.wait_for(|a| *a >= created))
            .await
            .expect("the pool counted connections its upstream never accepted")
            .unwrap();
    }
    let accepted: usize = servers.iter().map(UpstreamServer::accepted).sum();
    // First sightings are dialed directly by their clients, like fallbacks.
    assert_eq!(
        accepted as u64,
        stats.total_created + stats.fallback_dials + stats.first_sightings,
        "{stats:#?}"
    );
    // What the upstreams still hold is exactly the pool's idle spares.
    for server in servers.iter() {
        let idle = stats
            .per_destination
            .iter()
            .find(|d| d.destination == server.target().to_string())
            .map_or(0, |d| d.idle);
        let mut live = server.live.subscribe();
        tokio::time::timeout(PATIENCE, live.wait_for(|l| *l == idle))
            .await
            .expect("upstream still holds connections the pool does not")
            .unwrap();
    }

    pool.shutdown().await;
    for server in servers.iter() {
        let mut live = server.live.subscribe();
        tokio::time::timeout(PATIENCE, live.wait_for(|l| *l == 0))
            .await
            .expect("shutdown closes every spare")
            .unwrap();
    }
    let worst = tokio::time::timeout(PATIENCE, budget_sampler)
        .await
        .expect("the budget's view closes with the pool")
        .unwrap();
    assert!(worst <= 20);
}
