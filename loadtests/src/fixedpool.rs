//! The `fixedpool` baseline of issue 18, "the least a pool can be": a
//! `Mutex<HashMap<destination, Vec<TcpStream>>>` holding a fixed stock of N spares per
//! destination.
//!
//! - First sight of a destination: this session dials directly, and N spares are dialed in the
//!   background.
//! - Later checkouts take the newest spare (LIFO) that passes a non-blocking peek (`recv` with
//!   `MSG_PEEK | MSG_DONTWAIT` must say "would block": no EOF, no error, no unexpected bytes),
//!   and dial one spare in the background for each spare handed out or found dead. No spare:
//!   the session dials directly (a miss) and nothing else is dialed.
//! - Spares only: a connection that carried a client's bytes is closed with its session, never
//!   pooled again. No idle timeout, no eviction. A failed spare dial is not retried (the stock
//!   shrinks by one; on the delay line and loopback a dial does not fail).
//! - `max_total` (0 = none) caps spares held plus spares being dialed over all destinations:
//!   at the cap nothing more is dialed. Without it 1,000 destinations x 64 would be 64,000
//!   connections.
//!
//! Its counters use poolsocks' field names (`total_idle`, `pool_hits`, `pool_misses`,
//! `first_sightings`), so the harness reads both the same way (`--stats ADDR`: any GET answers
//! them as JSON).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::baseline::{dial, Connector, Dest};

#[derive(Default)]
struct Stock {
    spares: Vec<TcpStream>,
    /// Spares being dialed for this destination.
    pending: usize,
}

#[derive(Default)]
struct Stocks {
    by_dest: HashMap<Dest, Stock>,
    /// Spares held, over all destinations.
    idle: usize,
    /// Spares held plus spares being dialed (what `max_total` caps).
    held: usize,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    first_sightings: AtomicU64,
    dials: AtomicU64,
    dial_failures: AtomicU64,
    discarded: AtomicU64,
}

pub struct FixedPool {
    per_dest: usize,
    max_total: usize,
    stocks: Mutex<Stocks>,
    counters: Counters,
}

/// What a checkout found, for the counters and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Spare,
    FirstSight,
    Miss,
}

impl FixedPool {
    pub fn new(per_dest: usize, max_total: usize) -> Arc<Self> {
        Arc::new(FixedPool {
            per_dest,
            max_total,
            stocks: Mutex::new(Stocks::default()),
            counters: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Stocks> {
        // A panic while holding the lock leaves counts that are still consistent enough for a
        // baseline; carry on rather than fail every session after it.
        self.stocks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A spare for `dest` if one passes the peek, and how many spares to dial now.
    fn take(&self, dest: &Dest) -> (Option<TcpStream>, Found, usize) {
        let mut dead = Vec::new();
        let mut guard = self.lock();
        let Stocks { by_dest, idle, held } = &mut *guard;
        let first = !by_dest.contains_key(dest);
        let stock = by_dest.entry(dest.clone()).or_default();
        let mut handed = None;
        while let Some(spare) = stock.spares.pop() {
            *idle -= 1;
            *held -= 1;
            if usable(&spare) {
                handed = Some(spare);
                break;
            }
            dead.push(spare);
        }
        let wanted = if first { self.per_dest } else { usize::from(handed.is_some()) + dead.len() };
        let room_here = self.per_dest.saturating_sub(stock.spares.len() + stock.pending);
        let room_total =
            if self.max_total == 0 { usize::MAX } else { self.max_total.saturating_sub(*held) };
        let to_dial = wanted.min(room_here).min(room_total);
        stock.pending += to_dial;
        *held += to_dial;
        drop(guard);
        self.counters.discarded.fetch_add(dead.len() as u64, Ordering::Relaxed);
        let found = match (&handed, first) {
            (Some(_), _) => Found::Spare,
            (None, true) => Found::FirstSight,
            (None, false) => Found::Miss,
        };
        let counter = match found {
            Found::Spare => &self.counters.hits,
            Found::FirstSight => &self.counters.first_sightings,
            Found::Miss => &self.counters.misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (handed, found, to_dial)
    }

    /// A spare for `dest` or a direct dial, with the background dials the checkout calls for.
    pub async fn checkout(self: &Arc<Self>, dest: Dest) -> io::Result<(TcpStream, Found)> {
        let (spare, found, to_dial) = self.take(&dest);
        for _ in 0..to_dial {
            let pool = self.clone();
            let dest = dest.clone();
            tokio::spawn(async move { pool.refill(dest).await });
        }
        match spare {
            Some(spare) => Ok((spare, found)),
            None => Ok((dial(&dest).await?, found)),
        }
    }

    async fn refill(&self, dest: Dest) {
        self.counters.dials.fetch_add(1, Ordering::Relaxed);
        let dialed = dial(&dest).await;
        let mut guard = self.lock();
        let Stocks { by_dest, idle, held } = &mut *guard;
        // Destinations are never removed, so the stock is there.
        let stock = by_dest.entry(dest).or_default();
        stock.pending = stock.pending.saturating_sub(1);
        match dialed {
            Ok(spare) => {
                stock.spares.push(spare);
                *idle += 1;
            }
            Err(_) => {
                *held = held.saturating_sub(1);
                self.counters.dial_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters as JSON, with poolsocks' names where the meaning is the same.
    pub fn stats(&self) -> serde_json::Value {
        let (idle, held, destinations) = {
            let stocks = self.lock();
            (stocks.idle, stocks.held, stocks.by_dest.len())
        };
        let c = &self.counters;
        let (hits, misses, first) = (
            c.hits.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
            c.first_sightings.load(Ordering::Relaxed),
        );
        let checkouts = hits + misses + first;
        serde_json::json!({
            "total_idle": idle,
            "pending_creates": held - idle,
            "destinations": destinations,
            "pool_hits": hits,
            "pool_misses": misses,
            "first_sightings": first,
            "hit_rate": if checkouts == 0 { 0.0 } else { hits as f64 / checkouts as f64 },
            "spares_dialed": c.dials.load(Ordering::Relaxed),
            "dial_failures": c.dial_failures.load(Ordering::Relaxed),
            "validation_drops": c.discarded.load(Ordering::Relaxed),
            "config": { "spares_per_dest": self.per_dest, "max_total": self.max_total },
        })
    }
}

/// The pre-hand-out check: the spare's socket has nothing to read and no error pending.
fn usable(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: recv writes at most one byte into `byte`, which outlives the call; the descriptor
    // belongs to `stream`, alive for the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

pub struct PoolConnector(pub Arc<FixedPool>);

impl Connector for PoolConnector {
    async fn connect(&self, dest: Dest) -> io::Result<TcpStream> {
        self.0.checkout(dest).await.map(|(stream, _)| stream)
    }
}

/// Answers any HTTP request on `listener` with the pool's counters (JSON), then closes.
pub async fn serve_stats(listener: TcpListener, pool: Arc<FixedPool>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            let read_head = async {
                let mut head = Vec::with_capacity(512);
                let mut chunk = [0u8; 512];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                io::Result::Ok(())
            };
            if !matches!(tokio::time::timeout(Duration::from_secs(2), read_head).await, Ok(Ok(())))
            {
                return;
            }
            let body = pool.stats().to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn idle_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        (addr, task)
    }

    async fn settle(pool: &FixedPool, idle: u64) -> serde_json::Value {
        // Up to 5 s: CI machines are busy.
        for _ in 0..1000 {
            let stats = pool.stats();
            if stats["total_idle"] == idle && stats["pending_creates"] == 0 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("pool did not settle at {idle} idle: {}", pool.stats());
    }

    #[tokio::test]
    async fn fills_at_first_sight_and_refills_one_per_hand_out() {
        let (addr, _server) = idle_server().await;
        let pool = FixedPool::new(4, 0);
        let dest = Dest::Ip(addr);
        let (_first, found) = pool.checkout(dest.clone()).await.expect("first");
        assert_eq!(found, Found::FirstSight);
        settle(&pool, 4).await;
        let (_second, found) = pool.checkout(dest.clone()).await.expect("second");
        assert_eq!(found, Found::Spare);
        let stats = settle(&pool, 4).await;
        assert_eq!(stats["pool_hits"], 1);
        assert_eq!(stats["first_sightings"], 1);
        assert_eq!(stats["spares_dialed"], 5);
    }

    #[tokio::test]
    async fn a_dead_spare_is_closed_and_replaced_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = FixedPool::new(1, 0);
        let dest = Dest::Ip(addr);
        // Loopback connects complete in the accept queue, before anyone accepts.
        let (direct, found) = pool.checkout(dest.clone()).await.expect("first");
        assert_eq!(found, Found::FirstSight);
        settle(&pool, 1).await;
        let mut kept = Vec::new();
        for _ in 0..2 {
            let (server_side, peer) = listener.accept().await.expect("accept");
            // The spare's server end is closed at once: the spare sees EOF.
            if peer == direct.local_addr().expect("local") {
                kept.push(server_side);
            }
        }
        assert_eq!(kept.len(), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_second, found) = pool.checkout(dest).await.expect("second");
        assert_eq!(found, Found::Miss);
        let stats = settle(&pool, 1).await;
        assert_eq!(stats["validation_drops"], 1);
        assert_eq!(stats["pool_misses"], 1);
        assert_eq!(stats["spares_dialed"], 2);
    }

    #[tokio::test]
    async fn the_total_cap_limits_spares_over_all_destinations() {
        let (a, _server_a) = idle_server().await;
        let (b, _server_b) = idle_server().await;
        let pool = FixedPool::new(4, 6);
        pool.checkout(Dest::Ip(a)).await.expect("a");
        settle(&pool, 4).await;
        pool.checkout(Dest::Ip(b)).await.expect("b");
        let stats = settle(&pool, 6).await;
        assert_eq!(stats["destinations"], 2);
    }
}
