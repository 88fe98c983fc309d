//! Edge cases of the pool, driven at the actor level with real sockets on 127.0.0.1.
//!
//! Reuse is proven from the upstream server's side: every accepted connection has an index, a
//! client asks "who" and the server says which accepted connection is answering; spares that
//! never carried bytes are identified by their address as the server saw it.

mod common;

use common::DistantDialer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poolsocks::pool::{category, Admission, Fault, ManagerMsg, Pool, PoolOptions, RefillMode};
use poolsocks::socks::TargetAddr;
use poolsocks::telemetry::{EventQuery, Severity, Telemetry};
use poolsocks::upstream::{
    BoxFuture, ConnectError, Connector, DialLimits, Dialer, Origin, TcpDialer, Upstream,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// Bounds a wait that should finish at once, so a bug fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// An upstream server that records what it accepted.

struct UpstreamServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// Peer address of each accepted connection, in accept order.
    peers: Mutex<Vec<SocketAddr>>,
    closers: Mutex<Vec<Option<oneshot::Sender<()>>>>,
    accepted: watch::Sender<usize>,
    live: watch::Sender<usize>,
    greeted: watch::Sender<usize>,
}

impl UpstreamServer {
    async fn start(greeting: Option<&'static [u8]>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            peers: Mutex::new(Vec::new()),
            closers: Mutex::new(Vec::new()),
            accepted: watch::Sender::new(0),
            live: watch::Sender::new(0),
            greeted: watch::Sender::new(0),
        });
        let server = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Ok((socket, peer)) = listener.accept().await {
                let (close_tx, close_rx) = oneshot::channel();
                let index = {
                    let mut peers = server.peers.lock().unwrap();
                    peers.push(peer);
                    server.closers.lock().unwrap().push(Some(close_tx));
                    peers.len() - 1
                };
                server.live.send_modify(|n| *n += 1);
                server.accepted.send_modify(|n| *n += 1);
                tokio::spawn(serve(socket, index, greeting, close_rx, Arc::clone(&server)));
            }
        });
        UpstreamServer { addr, shared }
    }

    fn target(&self) -> TargetAddr {
        TargetAddr::Ip(self.addr)
    }

    fn accepted(&self) -> usize {
        *self.shared.accepted.borrow()
    }

    fn live(&self) -> usize {
        *self.shared.live.borrow()
    }

    /// Which accepted connection the client side `stream` is. A connect completes before the
    /// server's accept loop records it, so this waits for the record.
    async fn index_of(&self, stream: &TcpStream) -> usize {
        let local = stream.local_addr().unwrap();
        let mut accepted = self.shared.accepted.subscribe();
        let find = async {
            loop {
                let found = self.shared.peers.lock().unwrap().iter().position(|p| *p == local);
                if let Some(index) = found {
                    return index;
                }
                accepted.changed().await.unwrap();
            }
        };
        tokio::time::timeout(PATIENCE, find).await.expect("the server accepted this connection")
    }

    /// Closes every connection accepted so far, from the server side.
    fn close_all(&self) -> usize {
        let mut closers = self.shared.closers.lock().unwrap();
        let mut closed = 0;
        for closer in closers.iter_mut().filter_map(Option::take) {
            // A connection that already ended has dropped its receiver: nothing to close.
            if closer.send(()).is_ok() {
                closed += 1;
            }
        }
        closed
    }

    async fn wait_live(&self, pred: impl FnMut(&usize) -> bool) {
        wait_count(&self.shared.live, pred, "upstream connection count never matched").await;
    }

    /// Waits until the server has accepted `n` connections. A pool's dial completes in the
    /// kernel before the server's accept loop takes the connection, so a spare the pool holds
    /// may not be the server's yet (and `close_all` would miss it).
    async fn wait_accepted(&self, n: usize) {
        let never = "the server never accepted that many connections";
        wait_count(&self.shared.accepted, |a| *a >= n, never).await;
    }

    async fn wait_greeted(&self, n: usize) {
        wait_count(&self.shared.greeted, |g| *g >= n, "greetings not sent").await;
    }
}

/// Waits, at most `PATIENCE`, until one of the server's counters satisfies `pred`.
async fn wait_count(counter: &watch::Sender<usize>, pred: impl FnMut(&usize) -> bool, never: &str) {
    let mut rx = counter.subscribe();
    tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await.expect(never).unwrap();
}

async fn serve(
    socket: TcpStream,
    index: usize,
    greeting: Option<&'static [u8]>,
    mut close: oneshot::Receiver<()>,
    shared: Arc<Shared>,
) {
    let (read, mut write) = socket.into_split();
    if let Some(greeting) = greeting {
        if write.write_all(greeting).await.is_ok() {
            shared.greeted.send_modify(|n| *n += 1);
        }
    }
    let mut lines = BufReader::new(read).lines();
    loop {
        tokio::select! {
            _ = &mut close => break,
            line = lines.next_line() => match line {
                Ok(Some(line)) if line == "who" => {
                    if write.write_all(format!("conn {index}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
    drop((lines, write));
    shared.live.send_modify(|n| *n -= 1);
}

/// Asks the upstream which accepted connection this is (this moves bytes: the stream is used).
async fn who(stream: &mut TcpStream) -> usize {
    stream.write_all(b"who\n").await.unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut line).await.unwrap();
    line.trim()
        .strip_prefix("conn ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"))
}

// ---------------------------------------------------------------------------------------------
// A dialer a test can make fail or hang, counting its calls.

#[derive(Default)]
struct ScriptedDialer {
    /// 0: dial for real, 1: fail, 2: hang.
    mode: AtomicUsize,
    calls: AtomicUsize,
}

const PASS: usize = 0;
const FAIL: usize = 1;
const HANG: usize = 2;

impl Dialer for ScriptedDialer {
    fn dial(
        &self,
        target: TargetAddr,
        timeout: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode.load(Ordering::SeqCst);
        Box::pin(async move {
            match mode {
                PASS => TcpDialer::new().dial(target, timeout).await,
                FAIL => Err(ConnectError::Io {
                    addr: "127.0.0.1:9".parse().unwrap(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }),
                _ => std::future::pending().await,
            }
        })
    }
}

/// Dials like `TcpDialer`, and refuses the next `refusals` checks of a connection's peer
/// against the rules: the answer a reload that denies the destination would give.
#[derive(Default)]
struct RefusingDialer {
    refusals: AtomicUsize,
}

impl Dialer for RefusingDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        TcpDialer::new().dial(target, limits)
    }

    fn still_allowed(&self, _target: &TargetAddr, _peer: SocketAddr) -> bool {
        self.refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
    }
}

// ---------------------------------------------------------------------------------------------
// Pool helpers.

fn options() -> PoolOptions {
    PoolOptions {
        max_idle_per_dest: 4,
        max_total_idle: 100,
        idle_timeout: Duration::from_secs(90),
        connect_timeout: Duration::from_secs(5),
        checkout_timeout: Duration::from_secs(5),
        janitor_period: None,
        cold_after: Duration::from_secs(30),
        // These tests are about a manager's mechanics: every destination gets one at once, and
        // spares although a loopback dial is cheap.
        admission: Admission::Always,
        cheap_dial: Duration::ZERO,
        // And evictions for any newcomer (the policy of who may evict is tested elsewhere).
        eviction_margin: 0.0,
        ..PoolOptions::default()
    }
}

async fn spawn(options: PoolOptions) -> (Pool, Telemetry) {
    spawn_with(options, Arc::new(TcpDialer::new())).await
}

async fn spawn_with(options: PoolOptions, dialer: Arc<dyn Dialer>) -> (Pool, Telemetry) {
    let telemetry = Telemetry::new(&poolsocks::config::TelemetryConfig {
        enabled: true,
        max_events: 1000,
        retention_hours: 1,
    });
    let pool = Pool::spawn(options, dialer, telemetry.clone()).await.unwrap();
    (pool, telemetry)
}

async fn wait_dest(
    pool: &Pool,
    target: &TargetAddr,
    what: &str,
    pred: impl FnMut(&poolsocks::pool::DestStats) -> bool,
) -> poolsocks::pool::DestStats {
    let mut rx = pool.watch_destination(target).await.unwrap();
    let reached =
        tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await.map(|r| r.map(|s| s.clone()));
    match reached {
        Ok(Ok(stats)) => stats,
        _ => panic!("destination never reached: {what}; last {:?}", *rx.borrow()),
    }
}

/// Waits until nothing is in use or in flight, then checks the counters against the sockets
/// the upstream servers really hold: idle spares are the only connections left open.
async fn assert_settled(pool: &Pool, servers: &[&UpstreamServer]) {
    for server in servers {
        wait_dest(pool, &server.target(), "quiet", |s| s.is_quiet()).await;
    }
    // The budget hears of the managers' last moves by message, a moment later.
    let mut budget = pool.watch_budget().await.unwrap();
    tokio::time::timeout(
        PATIENCE,
        budget.wait_for(|b| b.reserved + b.lent + b.evicting + b.waiting == 0),
    )
    .await
    .expect("the budget never settled")
    .unwrap();
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.connections_in_use, 0, "{stats:#?}");
    assert_eq!(stats.pending_creates, 0, "{stats:#?}");
    assert_eq!(stats.budget.reserved + stats.budget.lent + stats.budget.evicting, 0, "{stats:#?}");
    assert_eq!(stats.budget.pooled, stats.total_idle, "{stats:#?}");
    for server in servers {
        let idle = stats
            .per_destination
            .iter()
            .find(|d| d.destination == server.target().to_string())
            .map_or(0, |d| d.idle);
        server.wait_live(|live| *live == idle).await;
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_second_client_gets_the_spare_dialed_after_the_first_miss() {
    let server = UpstreamServer::start(None).await;
    let (pool, _) = spawn(options()).await;
    let target = server.target();

    let mut first = pool.acquire(&target).await.unwrap();
    assert_eq!(first.origin, Origin::Dialed);
    let first_index = who(&mut first.stream).await;
    first.finish(false);

    // The miss started a background dial (racing the client's own, so either may be 0): the
    // upstream accepted the other connection before the second client asked, and that one
    // answers it.
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1).await;
    server.wait_accepted(2).await;
    assert_eq!(server.accepted(), 2);
    let spare_index = 1 - first_index;
    let mut second = pool.acquire(&target).await.unwrap();
    assert_eq!(second.origin, Origin::Pooled);
    assert_eq!(server.index_of(&second.stream).await, spare_index);
    assert_eq!(who(&mut second.stream).await, spare_index);
    second.finish(false);

    // Handing out the spare started its replacement (connection 2), which a third client gets.
    wait_dest(&pool, &target, "the replacement", |s| s.idle == 1).await;
    let mut third = pool.acquire(&target).await.unwrap();
    assert_eq!(third.origin, Origin::Pooled);
    assert_eq!(who(&mut third.stream).await, 2);
    third.finish(false);

    assert_settled(&pool, &[&server]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!((stats.pool_hits, stats.pool_misses), (2, 1));
    assert_eq!(stats.total_reused, 2);
    // One dial for the miss, one spare after it, one replacement per hit.
    assert_eq!(stats.total_created, 4);
    assert_eq!(server.accepted(), 4);
    assert_eq!(stats.total_idle, 1);
    pool.shutdown().await;
    server.wait_live(|l| *l == 0).await;
}

#[tokio::test]
async fn a_used_connection_is_never_pooled_but_an_untouched_one_is() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.refill = RefillMode::Off;
    let (pool, _) = spawn(opts).await;
    let target = server.target();

    let mut used = pool.acquire(&target).await.unwrap();
    who(&mut used.stream).await;
    used.finish(false);
    let untouched = pool.acquire(&target).await.unwrap();
    let untouched_index = server.index_of(&untouched.stream).await;
    untouched.finish(true);

    let stats =
        wait_dest(&pool, &target, "the untouched one pooled", |s| s.idle == 1 && s.is_quiet())
            .await;
    assert_eq!(stats.counters.returned_untouched, 1);
    server.wait_live(|l| *l == 1).await;

    // The next client gets exactly the untouched connection, never the used one.
    let mut next = pool.acquire(&target).await.unwrap();
    assert_eq!(next.origin, Origin::Pooled);
    assert_eq!(who(&mut next.stream).await, untouched_index);
    next.finish(false);
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn peer_closed_spares_are_never_handed_out() {
    let server = UpstreamServer::start(None).await;
    let (pool, _) = spawn(options()).await;
    let target = server.target();

    let first = pool.acquire(&target).await.unwrap();
    first.finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1).await;
    server.wait_accepted(2).await;
    let closed_before = server.accepted();

    // The upstream closes everything; the spare is dead as soon as the server has let go.
    server.close_all();
    server.wait_live(|l| *l == 0).await;

    // Checked out at once, before the pool may even have noticed: still never the dead spare.
    let mut next = pool.acquire(&target).await.unwrap();
    let index = who(&mut next.stream).await;
    assert!(index >= closed_before, "got dead connection {index}");
    next.finish(false);

    assert_settled(&pool, &[&server]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!(
        stats.peer_closed + stats.validation_drops,
        1,
        "the dead spare is dropped exactly once: {stats:#?}"
    );

    // An idle spare whose peer closes is dropped at once, without any checkout.
    wait_dest(&pool, &target, "a new spare", |s| s.idle == 1).await;
    let created = pool.stats().await.unwrap().total_created;
    server.wait_accepted(created as usize).await;
    server.close_all();
    let stats = wait_dest(&pool, &target, "the close noticed", |s| s.idle == 0).await;
    assert_eq!(stats.counters.peer_closed + stats.counters.validation_drops, 2);
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn a_spare_found_unusable_at_hand_out_is_closed_counted_stale_and_the_client_dials() {
    let server = UpstreamServer::start(None).await;
    let dialer = Arc::new(RefusingDialer::default());
    let mut opts = options();
    // No background dials: the only spare is the untouched return below.
    opts.refill = RefillMode::Off;
    let (pool, _) = spawn_with(opts, dialer.clone()).await;
    let target = server.target();

    let untouched = pool.acquire(&target).await.unwrap();
    let spare_index = server.index_of(&untouched.stream).await;
    untouched.finish(true);
    wait_dest(&pool, &target, "the untouched one pooled", |s| s.idle == 1 && s.is_quiet()).await;

    // The manager hands the spare out; the handler's own check (rules changed since it was
    // pooled) refuses it: closed, and this client dials for itself.
    dialer.refusals.store(1, Ordering::SeqCst);
    let mut next = pool.acquire(&target).await.unwrap();
    assert_eq!(next.origin, Origin::Dialed, "the refused spare was handed out");
    assert_ne!(who(&mut next.stream).await, spare_index);
    assert_eq!(dialer.refusals.load(Ordering::SeqCst), 0, "the hand-out check was asked");
    server.wait_live(|live| *live == 1).await;
    next.finish(false);

    assert_settled(&pool, &[&server]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.stale_checkouts, 1, "{stats:#?}");
    // Handed out once, a hit never: the client was served by its own dial (the second miss).
    let counts = (stats.total_reused, stats.pool_hits, stats.pool_misses);
    assert_eq!(counts, (1, 0, 2), "{stats:#?}");
    assert_eq!(server.accepted(), 2);
    assert_eq!(stats.total_idle, 0);
}

#[tokio::test]
async fn greeting_bytes_on_a_spare_reach_the_client_intact() {
    const GREETING: &[u8] = b"220 upstream ready\r\n";
    let server = UpstreamServer::start(Some(GREETING)).await;
    let (pool, _) = spawn(options()).await;
    let target = server.target();

    let first = pool.acquire(&target).await.unwrap();
    first.finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1).await;
    // The spare's greeting has been written: it sits unread in the spare's socket.
    server.wait_greeted(2).await;

    let mut second = pool.acquire(&target).await.unwrap();
    assert_eq!(second.origin, Origin::Pooled);
    let index = server.index_of(&second.stream).await;
    let mut greeting = vec![0u8; GREETING.len()];
    second.stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, GREETING);
    assert_eq!(who(&mut second.stream).await, index);
    second.finish(false);

    assert_settled(&pool, &[&server]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.validation_drops + stats.peer_closed, 0);
}

#[tokio::test]
async fn the_janitor_expires_spares_older_than_idle_timeout() {
    let server = UpstreamServer::start(None).await;
    let (pool, _) = spawn(options()).await;
    let target = server.target();

    let first = pool.acquire(&target).await.unwrap();
    first.finish(false);
    wait_dest(&pool, &target, "a quiet spare", |s| s.idle == 1 && s.is_quiet()).await;
    server.wait_live(|l| *l == 1).await;

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(89)).await;
    assert_eq!(pool.run_janitor().await.unwrap().expired, 0);
    assert_eq!(server.live(), 1);

    tokio::time::advance(Duration::from_secs(2)).await;
    let report = pool.run_janitor().await.unwrap();
    assert_eq!(report.expired, 1);
    assert_eq!(pool.stats().await.unwrap().expired, 1);
    tokio::time::resume();
    server.wait_live(|l| *l == 0).await;
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn the_janitor_timer_runs_on_tokio_time() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.idle_timeout = Duration::from_secs(10);
    opts.janitor_period = Some(Duration::from_secs(1));
    let (pool, _) = spawn(opts).await;
    let target = server.target();

    let first = pool.acquire(&target).await.unwrap();
    first.finish(false);
    wait_dest(&pool, &target, "a quiet spare", |s| s.idle == 1 && s.is_quiet()).await;

    // No manual pass: the interval timer does it once paused time passes the timeout.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(12)).await;
    let stats = wait_dest(&pool, &target, "expired by the timer", |s| s.idle == 0).await;
    assert_eq!(stats.counters.expired, 1);
    tokio::time::resume();
    server.wait_live(|l| *l == 0).await;
}

#[tokio::test]
async fn spares_are_handed_out_last_in_first_out() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.refill = RefillMode::Off; // only the test's returns become spares: a known order
    opts.max_idle_per_dest = 3;
    let (pool, _) = spawn(opts).await;
    let target = server.target();

    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(pool.acquire(&target).await.unwrap());
    }
    let mut order = Vec::new();
    for session in &sessions {
        order.push(server.index_of(&session.stream).await);
    }
    for (pooled, session) in sessions.into_iter().enumerate() {
        session.finish(true);
        wait_dest(&pool, &target, "returned", |s| s.idle == pooled + 1 && s.awaiting_slots == 0)
            .await;
    }

    let mut handed_out = Vec::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let upstream = pool.acquire(&target).await.unwrap();
        assert_eq!(upstream.origin, Origin::Pooled);
        handed_out.push(server.index_of(&upstream.stream).await);
        held.push(upstream);
    }
    let newest_first: Vec<usize> = order.iter().rev().copied().collect();
    assert_eq!(handed_out, newest_first);
    for mut upstream in held {
        let index = server.index_of(&upstream.stream).await;
        assert_eq!(who(&mut upstream.stream).await, index);
        upstream.finish(false);
    }
    assert_settled(&pool, &[&server]).await;
    assert_eq!(server.accepted(), 3);
}

/// Watches every destination and the budget while a test runs, failing on any published state
/// over a limit, and returns how many states it saw. (The exact proof is the high-water marks
/// the actors keep themselves; this checks them from outside, while it runs.)
fn sample_limits(
    dests: Vec<watch::Receiver<poolsocks::pool::DestStats>>,
    mut budget: watch::Receiver<poolsocks::pool::BudgetStats>,
    per_dest: usize,
    total: usize,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<usize>>) {
    let (stop, _) = watch::channel(false);
    let mut samplers = Vec::new();
    for mut dest in dests {
        let mut stop_rx = stop.subscribe();
        samplers.push(tokio::spawn(async move {
            let mut seen = 0;
            loop {
                {
                    let s = dest.borrow_and_update();
                    assert!(s.idle <= per_dest, "per-destination limit exceeded: {s:?}");
                }
                seen += 1;
                tokio::select! {
                    _ = stop_rx.changed() => return seen,
                    changed = dest.changed() => if changed.is_err() { return seen },
                }
            }
        }));
    }
    let mut stop_rx = stop.subscribe();
    samplers.push(tokio::spawn(async move {
        let mut seen = 0;
        loop {
            {
                let b = budget.borrow_and_update();
                assert!(b.in_use() <= total, "global limit exceeded: {b:?}");
            }
            seen += 1;
            tokio::select! {
                _ = stop_rx.changed() => return seen,
                changed = budget.changed() => if changed.is_err() { return seen },
            }
        }
    }));
    (stop, samplers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_under_concurrent_check_ins() {
    let servers = [
        UpstreamServer::start(None).await,
        UpstreamServer::start(None).await,
        UpstreamServer::start(None).await,
    ];
    let mut opts = options();
    opts.max_idle_per_dest = 3;
    opts.max_total_idle = 5;
    let (pool, telemetry) = spawn(opts).await;

    let mut dests = Vec::new();
    for server in &servers {
        dests.push(pool.watch_destination(&server.target()).await.unwrap());
    }
    let (stop, samplers) = sample_limits(dests, pool.watch_budget().await.unwrap(), 3, 5);

    // 36 sessions open at once (all misses, each starting a background dial), then all hand
    // their connection back untouched at once: far more than either limit can take.
    let mut sessions = Vec::new();
    for round in 0..12 {
        for server in &servers {
            let pool = pool.clone();
            let target = server.target();
            sessions.push(tokio::spawn(async move {
                let upstream = pool.acquire(&target).await.unwrap();
                (round, upstream)
            }));
        }
    }
    let mut held: Vec<Upstream> = Vec::new();
    for session in sessions {
        held.push(session.await.unwrap().1);
    }
    let returns: Vec<_> =
        held.into_iter().map(|u| tokio::spawn(async move { u.finish(true) })).collect();
    for r in returns {
        r.await.unwrap();
    }

    let refs: Vec<&UpstreamServer> = servers.iter().collect();
    assert_settled(&pool, &refs).await;
    stop.send_replace(true);
    for sampler in samplers {
        assert!(sampler.await.unwrap() > 1, "the sampler saw the pool change");
    }

    let stats = pool.stats().await.unwrap();
    assert!(stats.budget.high_water <= 5, "{stats:#?}");
    assert!(stats.per_destination.iter().all(|d| d.idle_high_water <= 3));
    assert!(stats.total_idle <= 5);
    assert!(stats.dropped_full + stats.evicted + stats.refill_denied > 0, "{stats:#?}");
    // What the upstreams still hold is exactly what the pool says it holds, once at rest: a
    // slot freed by the last eviction may start one more refill after the first settling.
    assert_settled(&pool, &refs).await;
    let stats = pool.stats().await.unwrap();
    let live: usize = servers.iter().map(UpstreamServer::live).sum();
    assert_eq!(live, stats.total_idle, "{stats:#?}");
    assert!(!telemetry
        .query(&EventQuery {
            category: Some(category::POOL_LIMIT.into()),
            severity: Some(Severity::Warning),
            ..Default::default()
        })
        .is_empty());
}

/// Three upstreams X, Y, Z and a pool with room for two spares (no background dials), filled
/// by one untouched return at X and then one at Y: X's spare is the least recently pooled.
async fn full_budget_of_two() -> ([UpstreamServer; 3], Pool, Telemetry) {
    let servers = [
        UpstreamServer::start(None).await,
        UpstreamServer::start(None).await,
        UpstreamServer::start(None).await,
    ];
    let mut opts = options();
    opts.refill = RefillMode::Off;
    opts.max_idle_per_dest = 2;
    opts.max_total_idle = 2;
    let (pool, telemetry) = spawn(opts).await;
    for server in &servers[..2] {
        let upstream = pool.acquire(&server.target()).await.unwrap();
        upstream.finish(true);
        wait_dest(&pool, &server.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    }
    (servers, pool, telemetry)
}

#[tokio::test]
async fn eviction_picks_the_least_recently_pooled_spare() {
    // X and Y each pooled one spare: the budget is full, X's is the least recent.
    let (servers, pool, telemetry) = full_budget_of_two().await;
    let [x, y, z] = &servers;
    // A third destination's return evicts X's spare, not Y's.
    let upstream = pool.acquire(&z.target()).await.unwrap();
    upstream.finish(true);
    wait_dest(&pool, &z.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    let xs = wait_dest(&pool, &x.target(), "evicted", |s| s.idle == 0).await;
    assert_eq!(xs.counters.evicted, 1);
    x.wait_live(|l| *l == 0).await;
    assert_eq!(y.live(), 1);

    // Now Y's is the least recent: X's next return evicts it.
    let upstream = pool.acquire(&x.target()).await.unwrap();
    upstream.finish(true);
    wait_dest(&pool, &x.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    let ys = wait_dest(&pool, &y.target(), "evicted", |s| s.idle == 0).await;
    assert_eq!(ys.counters.evicted, 1);
    y.wait_live(|l| *l == 0).await;

    assert_settled(&pool, &[x, y, z]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.evicted, 2);
    assert_eq!(stats.total_idle, 2);
    assert_eq!(stats.budget.high_water, 2);
    let evictions = telemetry
        .query(&EventQuery { category: Some(category::POOL_LIMIT.into()), ..Default::default() });
    assert_eq!(evictions.len(), 2);
    assert!(evictions.iter().all(|e| e.severity == Severity::Warning));
}

/// Waits until the GlobalBudget's published view satisfies `pred`.
async fn wait_budget(
    pool: &Pool,
    what: &str,
    pred: impl FnMut(&poolsocks::pool::BudgetStats) -> bool,
) -> poolsocks::pool::BudgetStats {
    let mut rx = pool.watch_budget().await.unwrap();
    let reached =
        tokio::time::timeout(PATIENCE, rx.wait_for(pred)).await.map(|r| r.map(|s| s.clone()));
    match reached {
        Ok(Ok(stats)) => stats,
        _ => panic!("budget never reached: {what}; last {:?}", *rx.borrow()),
    }
}

#[tokio::test]
async fn an_untouched_return_is_pooled_with_the_slot_its_session_kept() {
    let x = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.refill = RefillMode::Off;
    let (pool, _telemetry) = spawn(opts).await;

    // A miss, returned untouched: pooled with a slot reserved for it.
    let upstream = pool.acquire(&x.target()).await.unwrap();
    upstream.finish(true);
    wait_dest(&pool, &x.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    let before = wait_budget(&pool, "pooled", |b| b.pooled == 1 && b.reserved == 0).await;
    assert_eq!(before.granted, 1);

    // A hit: the session keeps the spare's slot while it holds the connection.
    let upstream = pool.acquire(&x.target()).await.unwrap();
    assert_eq!(upstream.origin, Origin::Pooled);
    wait_budget(&pool, "lent", |b| b.lent == 1 && b.pooled == 0).await;
    upstream.finish(true);

    // Back untouched, pooled again with that slot: no new reservation.
    wait_dest(&pool, &x.target(), "pooled again", |s| s.idle == 1 && s.is_quiet()).await;
    let after = wait_budget(&pool, "pooled again", |b| b.pooled == 1 && b.lent == 0).await;
    assert_eq!(after.granted, 1, "{after:?}");
    assert_eq!(after.high_water, 1, "{after:?}");
    assert_eq!(x.accepted(), 1, "the same connection went round");
    assert_settled(&pool, &[&x]).await;
    assert_eq!(pool.stats().await.unwrap().returned_untouched, 2);
}

#[tokio::test]
async fn a_lent_slot_is_taken_back_before_any_spare_is_evicted() {
    let (servers, pool, _telemetry) = full_budget_of_two().await;
    let [x, y, z] = &servers;
    // X's spare goes to a session, which keeps its slot: the budget is still full.
    let held = pool.acquire(&x.target()).await.unwrap();
    assert_eq!(held.origin, Origin::Pooled);
    wait_budget(&pool, "lent", |b| b.lent == 1 && b.pooled == 1).await;

    // Z's return needs room: X's lent slot is taken back, Y's spare stays.
    let upstream = pool.acquire(&z.target()).await.unwrap();
    upstream.finish(true);
    wait_dest(&pool, &z.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    let budget = wait_budget(&pool, "reclaimed", |b| b.lent == 0 && b.evicting == 0).await;
    assert_eq!((budget.lent_reclaimed, budget.evictions), (1, 0), "{budget:?}");
    assert!(budget.in_use() <= 2 && budget.high_water <= 2, "{budget:?}");
    let ys = wait_dest(&pool, &y.target(), "kept", |s| s.idle == 1).await;
    assert_eq!(ys.counters.evicted, 0);
    assert_eq!(y.live(), 1);

    // X's session ends untouched with no slot of its own: it asks for one, and the least
    // recently pooled spare of another destination (Y's) makes room.
    held.finish(true);
    wait_dest(&pool, &x.target(), "pooled", |s| s.idle == 1 && s.is_quiet()).await;
    let ys = wait_dest(&pool, &y.target(), "evicted", |s| s.idle == 0).await;
    assert_eq!(ys.counters.evicted, 1);
    y.wait_live(|l| *l == 0).await;
    assert_settled(&pool, &[x, y, z]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!((stats.total_idle, stats.budget.high_water), (2, 2), "{stats:#?}");
}

#[tokio::test]
async fn a_full_destination_drops_untouched_returns_and_counts_them() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.refill = RefillMode::Off;
    opts.max_idle_per_dest = 1;
    let (pool, _) = spawn(opts).await;
    let target = server.target();

    let a = pool.acquire(&target).await.unwrap();
    let b = pool.acquire(&target).await.unwrap();
    a.finish(true);
    wait_dest(&pool, &target, "one pooled", |s| {
        s.idle == 1 && s.in_use == 1 && s.awaiting_slots == 0
    })
    .await;
    b.finish(true);
    let stats = wait_dest(&pool, &target, "settled", |s| s.is_quiet()).await;
    assert_eq!(stats.idle, 1);
    assert_eq!(stats.counters.dropped_full, 1);
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn cold_destinations_are_pruned_and_their_history_kept() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.refill = RefillMode::Off;
    let (pool, _) = spawn(opts).await;
    let target = server.target();

    let mut upstream = pool.acquire(&target).await.unwrap();
    who(&mut upstream.stream).await;
    upstream.finish(false);
    wait_dest(&pool, &target, "quiet", |s| s.is_quiet()).await;
    let manager = pool.manager_of(&target).await.unwrap().expect("a manager");

    tokio::time::pause();
    let report = pool.run_janitor().await.unwrap();
    assert_eq!((report.pruned, report.destinations), (0, 1), "traffic was recent");
    tokio::time::advance(Duration::from_secs(31)).await;
    let report = pool.run_janitor().await.unwrap();
    assert_eq!((report.pruned, report.destinations), (1, 0));
    tokio::time::resume();

    manager.wait(Some(PATIENCE)).await.unwrap();
    assert!(pool.manager_of(&target).await.unwrap().is_none());
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.destinations, 0);
    assert_eq!(stats.destinations_pruned, 1);
    assert_eq!((stats.pool_misses, stats.total_created), (1, 1));

    // The destination comes back on demand.
    let again = pool.acquire(&target).await.unwrap();
    again.finish(false);
    assert_eq!(pool.stats().await.unwrap().destinations, 1);
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn a_destination_with_spares_is_not_pruned() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.idle_timeout = Duration::from_secs(600);
    let (pool, _) = spawn(opts).await;
    let target = server.target();
    pool.acquire(&target).await.unwrap().finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1 && s.is_quiet()).await;

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(60)).await;
    let report = pool.run_janitor().await.unwrap();
    tokio::time::resume();
    assert_eq!((report.pruned, report.expired, report.destinations), (0, 0, 1));
    assert_settled(&pool, &[&server]).await;
}

async fn assert_restarted(pool: &Pool, target: &TargetAddr, old_id: ractor::ActorId) {
    let new = pool.manager_of(target).await.unwrap().expect("a new manager");
    assert_ne!(new.get_id(), old_id);
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.manager_restarts, 1);
}

#[tokio::test]
async fn a_killed_manager_is_restarted_and_clients_are_still_served() {
    let server = UpstreamServer::start(None).await;
    let (pool, telemetry) = spawn(options()).await;
    let target = server.target();
    pool.acquire(&target).await.unwrap().finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1 && s.is_quiet()).await;

    let manager = pool.manager_of(&target).await.unwrap().expect("a manager");
    let old_id = manager.get_id();
    manager.kill_and_wait(Some(PATIENCE)).await.unwrap();
    // Its spare died with it, really closed.
    server.wait_live(|l| *l == 0).await;
    assert_restarted(&pool, &target, old_id).await;
    let errors = telemetry.query(&EventQuery {
        category: Some(category::POOL_SUPERVISOR.into()),
        severity: Some(Severity::Error),
        ..Default::default()
    });
    assert_eq!(errors.len(), 1);

    let mut next = pool.acquire(&target).await.unwrap();
    assert!(who(&mut next.stream).await >= 2, "a new connection");
    next.finish(false);
    assert_settled(&pool, &[&server]).await;
    let stats = pool.stats().await.unwrap();
    assert_eq!(stats.pool_misses, 2, "history carried over the restart");
    assert_eq!(stats.budget.pooled, stats.total_idle);
}

#[tokio::test]
async fn a_panicking_manager_is_restarted() {
    let server = UpstreamServer::start(None).await;
    let (pool, _) = spawn(options()).await;
    let target = server.target();
    pool.acquire(&target).await.unwrap().finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1 && s.is_quiet()).await;

    let manager = pool.manager_of(&target).await.unwrap().expect("a manager");
    let old_id = manager.get_id();
    assert!(manager.cast(ManagerMsg::InjectFault(Fault::Panic("test".into()))).is_ok());
    manager.wait(Some(PATIENCE)).await.unwrap();
    server.wait_live(|l| *l == 0).await;
    assert_restarted(&pool, &target, old_id).await;

    // The new manager pools again: a miss, then a hit.
    pool.acquire(&target).await.unwrap().finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1).await;
    let hit = pool.acquire(&target).await.unwrap();
    assert_eq!(hit.origin, Origin::Pooled);
    hit.finish(false);
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn a_wedged_manager_makes_clients_dial_directly() {
    let server = UpstreamServer::start(None).await;
    let mut opts = options();
    opts.checkout_timeout = Duration::from_millis(100);
    let (pool, telemetry) = spawn(opts).await;
    let target = server.target();
    pool.acquire(&target).await.unwrap().finish(false);
    wait_dest(&pool, &target, "a spare", |s| s.idle == 1 && s.is_quiet()).await;

    let manager = pool.manager_of(&target).await.unwrap().expect("a manager");
    assert!(manager.cast(ManagerMsg::InjectFault(Fault::Stall(Duration::from_secs(1)))).is_ok());
    let mut direct = pool.acquire(&target).await.unwrap();
    assert_eq!(direct.origin, Origin::Dialed);
    assert_eq!(who(&mut direct.stream).await, 2, "a fresh connection");
    direct.finish(false);
    assert_eq!(pool.fallback_dials(), 1);
    assert_eq!(pool.stats().await.unwrap().fallback_dials, 1);
    assert_eq!(
        telemetry
            .query(&EventQuery {
                category: Some(category::POOL_FALLBACK.into()),
                ..Default::default()
            })
            .len(),
        1
    );
    // After its stall the manager sees that nobody waits for that checkout any more and skips
    // it: the spare is kept, and no lease is left counted.
    let stats =
        wait_dest(&pool, &target, "the late checkout skipped", |s| s.counters.abandoned == 1).await;
    assert_eq!((stats.idle, stats.in_use, stats.counters.hits), (1, 0, 0));
    assert_settled(&pool, &[&server]).await;
}

#[tokio::test]
async fn a_dead_pool_never_fails_a_client() {
    let server = UpstreamServer::start(None).await;
    let (pool, _) = spawn(options()).await;
    pool.shutdown().await;
    let mut direct = pool.acquire(&server.target()).await.unwrap();
    assert_eq!(direct.origin, Origin::Dialed);
    assert_eq!(who(&mut direct.stream).await, 0);
    direct.finish(false);
    assert_eq!(pool.fallback_dials(), 1);
    server.wait_live(|l| *l == 0).await;
}

#[tokio::test]
async fn background_dial_failures_are_counted_logged_and_backed_off() {
    let server = UpstreamServer::start(None).await;
    let dialer = Arc::new(ScriptedDialer::default());
    let (pool, telemetry) = spawn_with(options(), dialer.clone()).await;
    let target = server.target();

    // The client's own dial succeeds; then the destination goes down, and the background dial
    // that success started fails (counted, logged, backed off).
    let first = pool.acquire(&target).await.unwrap();
    dialer.mode.store(FAIL, Ordering::SeqCst);
    first.finish(false);
    let stats = wait_dest(&pool, &target, "the dial failed", |s| {
        s.is_quiet() && s.counters.connect_failures == 1
    })
    .await;
    assert!(stats.backing_off);
    assert_eq!(dialer.calls.load(Ordering::SeqCst), 2);
    let errors = telemetry
        .query(&EventQuery { category: Some(category::POOL_DIAL.into()), ..Default::default() });
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].severity, Severity::Error);
    assert!(errors[0].details.contains_key("backoff_ms"));

    // The client gets the error (the pool does not hide it), and a failed client dial starts
    // no background dial at all.
    assert!(pool.acquire(&target).await.is_err());
    wait_dest(&pool, &target, "quiet", |s| s.is_quiet() && s.counters.connect_failures == 2).await;
    assert_eq!(dialer.calls.load(Ordering::SeqCst), 3);
    assert_settled(&pool, &[&server]).await;
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn a_hanging_dialer_cannot_leave_creates_pending() {
    let server = UpstreamServer::start(None).await;
    let dialer = Arc::new(ScriptedDialer::default());
    let mut opts = options();
    opts.connect_timeout = Duration::from_millis(200);
    opts.connect_phase_timeout = Duration::from_millis(200);
    let (pool, _) = spawn_with(opts, dialer.clone()).await;
    let target = server.target();

    // A client's dial that hangs is cut at the connect phase's limit.
    dialer.mode.store(HANG, Ordering::SeqCst);
    let error = pool.acquire(&target).await.err().expect("a timeout");
    assert_eq!(error.reply_code(), poolsocks::socks::ReplyCode::TtlExpired);
    // A background dial that hangs ends too: none is left pending.
    dialer.mode.store(PASS, Ordering::SeqCst);
    let first = pool.acquire(&target).await.unwrap();
    dialer.mode.store(HANG, Ordering::SeqCst);
    first.finish(false);
    let stats = wait_dest(&pool, &target, "the dial timed out", |s| {
        s.is_quiet() && s.counters.connect_failures == 2
    })
    .await;
    assert_eq!(stats.pending_creates, 0);
    assert_settled(&pool, &[&server]).await;
}

// ---------------------------------------------------------------------------------------------
// A pool that keeps up with demand.

#[tokio::test]
async fn the_refill_target_rises_with_demand_and_falls_back_when_it_stops() {
    let server = UpstreamServer::start(None).await;
    let target = server.target();
    let mut opts = options();
    opts.max_idle_per_dest = 12;
    opts.max_total_idle = 5; // below the per-destination limit: the budget must arbitrate too
    let dialer = Arc::new(DistantDialer { delay: Duration::from_millis(20) });
    let (pool, _) = spawn_with(opts, dialer).await;

    // Sample every published state while the load runs: the spares held or on their way never
    // pass the per-destination limit, idle ones never pass the global one, and the budget never
    // grants more than it has; remember the highest target.
    let mut dest = pool.watch_destination(&target).await.unwrap();
    let mut budget = pool.watch_budget().await.unwrap();
    let (stop, _) = watch::channel(false);
    let mut stop_rx = stop.subscribe();
    let sampler = tokio::spawn(async move {
        let mut highest_target = 0;
        loop {
            {
                let s = dest.borrow_and_update();
                let committed = s.idle as u64 + s.pending_creates + s.awaiting_slots;
                assert!(committed <= 12, "per-destination limit exceeded: {s:?}");
                assert!(s.idle <= 5, "global limit exceeded: {s:?}");
                highest_target = highest_target.max(s.refill.refill_target);
            }
            assert!(budget.borrow_and_update().in_use() <= 5, "budget exceeded");
            tokio::select! {
                _ = stop_rx.changed() => return highest_target,
                changed = dest.changed() => if changed.is_err() { return highest_target },
                changed = budget.changed() => if changed.is_err() { return highest_target },
            }
        }
    });

    // A burst: 16 handlers, each running 16 short sessions back to back.
    let handlers: Vec<_> = (0..16)
        .map(|_| {
            let pool = pool.clone();
            let target = target.clone();
            tokio::spawn(async move {
                for _ in 0..16 {
                    let mut upstream = pool.acquire(&target).await.unwrap();
                    who(&mut upstream.stream).await;
                    upstream.finish(false);
                }
            })
        })
        .collect();
    for handler in handlers {
        handler.await.unwrap();
    }
    assert_settled(&pool, &[&server]).await;
    stop.send_replace(true);
    let highest_target = sampler.await.unwrap();
    let busy = pool.stats().await.unwrap();
    let busy_dest = &busy.per_destination[0];
    // 256 checkouts in a few hundred ms over a 20 ms dial: more than one spare is needed.
    assert!(highest_target > 1, "the target never rose: {busy_dest:?}");
    assert!(busy_dest.refill.checkouts_per_sec > 1.0, "{busy_dest:?}");
    assert!(busy_dest.refill.dial_time_ms.is_some_and(|ms| ms >= 20.0), "{busy_dest:?}");
    assert!(busy_dest.idle > 1, "the pool did not fill up to its target: {busy_dest:?}");
    assert!(busy.budget.high_water <= 5, "{busy:#?}");
    assert!(busy.pool_hits > 0, "{busy:#?}");
    assert_eq!(busy.trimmed, 0, "nothing is surplus while demand lasts");

    // Demand stops. A minute later (paused time, well short of idle_timeout) the rate has
    // decayed, the target is back to one spare, and the Janitor closes the surplus.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(60)).await;
    let report = pool.run_janitor().await.unwrap();
    tokio::time::resume();
    assert_eq!(report.expired, 0);
    assert_eq!(report.trimmed, busy_dest.idle as u64 - 1, "{report:?}");
    let quiet = pool.stats().await.unwrap();
    let quiet_dest = &quiet.per_destination[0];
    assert_eq!(quiet_dest.refill.refill_target, 1, "{quiet_dest:?}");
    assert!(quiet_dest.refill.checkouts_per_sec < 0.01, "{quiet_dest:?}");
    assert_eq!((quiet_dest.idle, quiet.trimmed), (1, report.trimmed));
    // From the upstream's side: only the one remaining spare is still open.
    assert_settled(&pool, &[&server]).await;
    server.wait_live(|l| *l == 1).await;
    pool.shutdown().await;
}
