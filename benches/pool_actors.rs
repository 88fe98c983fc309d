//! Actor overhead of the pool (issue 10, scenario 7; issue 9's note): what a checkout and a
//! release by message cost, without any dial on the path.
//!
//! What is measured: a handler calls `Pool::acquire` (the public path the SOCKS server uses),
//! gets a pooled spare (a real loopback socket, accepted and held by a local listener), and
//! hands it back untouched (`finish(true)`). The pool runs with `RefillMode::Off` and is filled
//! beforehand, so no dial happens during a run: a pair is the checkout call (its reply carries
//! the socket; the spare's budget slot is lent to the session) plus the untouched return (the
//! spare is pooled again with that slot and its peer-close waker registered; the GlobalBudget
//! hears of both by message). Misses (none expected on an idle machine) are counted and shown:
//! a miss means the pool ran dry, e.g. because the machine stalled the runtime long enough for
//! more checkouts to queue than there are spares.
//!
//! - Closed loop (criterion, and a summary table): 1, 100, 500 and 1,000 handlers, each doing
//!   pairs back to back, against one destination and against 100. Throughput in pairs/s; by
//!   Little's law the latency of one pair is handlers / throughput; the checkout round trip is
//!   also recorded per call in an HDR histogram (p50/p99).
//! - Open loop: 10,000 checkouts/s spread over 1,000 handlers (each wakes every 100 ms, paced
//!   by a thread that does not wait for answers); p50/p99/p99.9 of the checkout round trip.
//!
//! `cargo bench --bench pool_actors -- --quick summary` is the CI smoke (the tables only, short
//! runs: about 15 s); `cargo bench --bench pool_actors` runs criterion and the full tables.
//! Misses are counted: a miss means the pool ran dry because returns waited on the budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use hdrhistogram::Histogram;
use poolsocks::config::PoolConfig;
use poolsocks::pool::{Admission, Pool, PoolOptions, RefillMode};
use poolsocks::socks::TargetAddr;
use poolsocks::telemetry::Telemetry;
use poolsocks::upstream::{Connector, Origin, TcpDialer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// A pool filled with spares to `destinations` loopback listeners, on a two-worker runtime
/// (the machine's cores) shared by the actors and the handlers, as in the daemon.
struct Rig {
    rt: Runtime,
    pool: Pool,
    targets: Vec<TargetAddr>,
    misses: Arc<AtomicU64>,
}

impl Rig {
    fn new(destinations: usize, spares_per_dest: usize) -> Rig {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (pool, targets) = rt.block_on(async {
            let mut targets = Vec::new();
            for _ in 0..destinations {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a listener");
                targets.push(TargetAddr::Ip(listener.local_addr().expect("its address")));
                tokio::spawn(async move {
                    // Hold each connection until the pool closes it, so sockets never leak.
                    while let Ok((mut socket, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let mut sink = [0u8; 64];
                            while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
                        });
                    }
                });
            }
            let config = PoolConfig { enabled: true, ..PoolConfig::default() };
            let options = PoolOptions {
                max_idle_per_dest: spares_per_dest,
                max_total_idle: destinations * spares_per_dest,
                idle_timeout: Duration::from_secs(3600),
                checkout_timeout: Duration::from_secs(5),
                janitor_period: None,
                cold_after: Duration::from_secs(3600),
                refill: RefillMode::Off,
                admission: Admission::Always,
                ..PoolOptions::from_config(&config)
            };
            let pool = Pool::spawn(options, Arc::new(TcpDialer::new()), Telemetry::disabled())
                .await
                .expect("spawn the pool");
            // Fill: open the spares as misses, then hand them all back untouched.
            for target in &targets {
                let mut held = Vec::new();
                for _ in 0..spares_per_dest {
                    held.push(pool.acquire(target).await.expect("dial a spare"));
                }
                for upstream in held {
                    upstream.finish(true);
                }
                let mut dest = pool.watch_destination(target).await.expect("watch");
                dest.wait_for(|s| s.idle == spares_per_dest && s.is_quiet())
                    .await
                    .expect("the pool filled up");
            }
            (pool, targets)
        });
        Rig { rt, pool, targets, misses: Arc::new(AtomicU64::new(0)) }
    }

    /// `pairs` checkout+release pairs by `handlers` concurrent handlers; returns the wall time
    /// and the checkout round trips.
    fn closed_loop(&self, handlers: usize, pairs: u64, record: bool) -> (Duration, Histogram<u64>) {
        self.rt.block_on(async {
            let base = pairs / handlers as u64;
            let extra = pairs % handlers as u64;
            let start = Instant::now();
            let tasks: Vec<_> = (0..handlers)
                .map(|h| {
                    let pool = self.pool.clone();
                    let target = self.targets[h % self.targets.len()].clone();
                    let misses = Arc::clone(&self.misses);
                    let count = base + u64::from((h as u64) < extra);
                    tokio::spawn(async move {
                        // Only when asked; a plain vector, allocated up front: a histogram per
                        // handler is ~600 KiB, and its page faults would land in the timings.
                        let mut samples = record.then(|| Vec::with_capacity(count as usize));
                        for _ in 0..count {
                            let asked = Instant::now();
                            let upstream = pool.acquire(&target).await.expect("a checkout");
                            if let Some(samples) = samples.as_mut() {
                                samples.push(asked.elapsed().as_nanos() as u64);
                            }
                            if upstream.origin == Origin::Dialed {
                                misses.fetch_add(1, Ordering::Relaxed);
                            }
                            upstream.finish(true);
                        }
                        samples
                    })
                })
                .collect();
            let mut all_samples = Vec::with_capacity(tasks.len());
            for task in tasks {
                all_samples.push(task.await.expect("a handler"));
            }
            let elapsed = start.elapsed();
            let mut all = histogram();
            for sample in all_samples.into_iter().flatten().flatten() {
                let _ = all.record(sample);
            }
            (elapsed, all)
        })
    }

    /// `rate` checkouts per second for `duration`, round-robin over `handlers` handlers, paced
    /// by a thread that never waits for an answer (so a slow pool cannot slow the arrivals).
    fn open_loop(&self, rate: u32, handlers: usize, duration: Duration) -> OpenLoop {
        let expected_per_handler =
            (duration.as_secs_f64() * f64::from(rate) / handlers as f64) as usize * 2 + 16;
        let wakeups: Vec<Arc<Notify>> = (0..handlers).map(|_| Arc::new(Notify::new())).collect();
        let done = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..handlers)
            .map(|h| {
                let pool = self.pool.clone();
                let target = self.targets[h % self.targets.len()].clone();
                let wakeup = Arc::clone(&wakeups[h]);
                let done = Arc::clone(&done);
                let misses = Arc::clone(&self.misses);
                self.rt.spawn(async move {
                    // Room for the expected turns and then some (see `closed_loop`).
                    let mut samples = Vec::with_capacity(expected_per_handler);
                    loop {
                        wakeup.notified().await;
                        if done.load(Ordering::Acquire) {
                            return samples;
                        }
                        let asked = Instant::now();
                        let upstream = pool.acquire(&target).await.expect("a checkout");
                        samples.push(asked.elapsed().as_nanos() as u64);
                        if upstream.origin == Origin::Dialed {
                            misses.fetch_add(1, Ordering::Relaxed);
                        }
                        upstream.finish(true);
                    }
                })
            })
            .collect();

        let period = Duration::from_secs(1) / rate;
        let total = (duration.as_secs_f64() * f64::from(rate)) as u64;
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack (50 us by
        // default, half the period), so sleeps end close to each arrival time.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0);
        }
        let start = Instant::now();
        let mut worst_lag = Duration::ZERO;
        for n in 0..total {
            let due = start + period * n as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                worst_lag = worst_lag.max(now - due);
            }
            wakeups[n as usize % handlers].notify_one();
        }
        let elapsed = start.elapsed();
        done.store(true, Ordering::Release);
        for wakeup in &wakeups {
            wakeup.notify_one();
        }
        let mut all = histogram();
        self.rt.block_on(async {
            for task in tasks {
                for sample in task.await.expect("a handler") {
                    let _ = all.record(sample);
                }
            }
        });
        OpenLoop { hist: all, offered: total, elapsed, worst_lag }
    }

    fn shutdown(self) {
        self.rt.block_on(self.pool.shutdown());
    }
}

struct OpenLoop {
    hist: Histogram<u64>,
    offered: u64,
    elapsed: Duration,
    worst_lag: Duration,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Spares per destination: twice the handlers that share it (a returned spare is back in the
/// pool a few messages later), so every checkout of a run is a hit.
fn spares_for(handlers: usize, destinations: usize) -> usize {
    handlers.div_ceil(destinations) * 2 + 8
}

const SHAPES: [(&str, usize); 2] = [("one_destination", 1), ("100_destinations", 100)];

fn closed_loop(c: &mut Criterion) {
    for (shape, destinations) in SHAPES {
        let mut group = c.benchmark_group(format!("checkout_release/{shape}"));
        group.throughput(Throughput::Elements(1));
        for handlers in [1usize, 100, 1000] {
            let rig = Rig::new(destinations, spares_for(handlers, destinations));
            group.bench_with_input(BenchmarkId::new("handlers", handlers), &handlers, |b, &h| {
                b.iter_custom(|pairs| rig.closed_loop(h, pairs, false).0)
            });
            rig.shutdown();
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = closed_loop
}

fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// One table with both closed-loop readings (throughput and Little's-law latency) and the
/// measured checkout round trip, then the open loop.
fn summary(quick: bool) {
    let pairs: u64 = if quick { 40_000 } else { 300_000 };
    println!("\n## Pool actor overhead: closed loop ({pairs} checkout+release pairs per row)\n");
    println!(
        "| destinations | handlers | pairs/s | latency = handlers/throughput (µs) | checkout p50 (µs) | checkout p99 (µs) | misses |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (_, destinations) in SHAPES {
        for handlers in [1usize, 100, 500, 1000] {
            let rig = Rig::new(destinations, spares_for(handlers, destinations));
            rig.closed_loop(handlers, pairs / 10, false); // warm-up
            let (elapsed, hist) = rig.closed_loop(handlers, pairs, true);
            let throughput = pairs as f64 / elapsed.as_secs_f64();
            println!(
                "| {destinations} | {handlers} | {throughput:.0} | {:.1} | {:.1} | {:.1} | {} |",
                handlers as f64 / throughput * 1e6,
                micros(hist.value_at_quantile(0.5)),
                micros(hist.value_at_quantile(0.99)),
                rig.misses.load(Ordering::Relaxed),
            );
            rig.shutdown();
        }
    }

    let duration = Duration::from_secs(if quick { 3 } else { 10 });
    let rig = Rig::new(1, 64);
    let open = rig.open_loop(10_000, 1000, duration);
    let h = &open.hist;
    println!(
        "\n## Open loop: 10,000 checkouts/s over 1,000 handlers, one destination, {duration:?}\n"
    );
    println!("| checkouts | achieved/s | p50 (µs) | p90 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | pacer worst lag (µs) | misses |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
        h.len(),
        open.offered as f64 / open.elapsed.as_secs_f64(),
        micros(h.value_at_quantile(0.5)),
        micros(h.value_at_quantile(0.9)),
        micros(h.value_at_quantile(0.99)),
        micros(h.value_at_quantile(0.999)),
        micros(h.max()),
        open.worst_lag.as_secs_f64() * 1e6,
        rig.misses.load(Ordering::Relaxed),
    );
    rig.shutdown();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --benches` runs this in test mode, and `--list` only lists: skip the tables.
    let listing_or_testing = args.iter().any(|a| a == "--list" || a == "--test");
    let quick = args.iter().any(|a| a == "--quick");
    // A name filter (`-- one_destination`) picks criterion groups; `-- summary` only the tables.
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-') && a.as_str() != "bench");
    if filter.map_or(true, |f| f != "summary") {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    if !listing_or_testing && filter.map_or(true, |f| f == "summary") {
        summary(quick);
    }
}
