//! A randomized crowd: thousands of sessions mixing well-behaved clients with truncated,
//! oversized, garbage and stalled handshakes. Every byte of every good session must arrive
//! intact both ways, and every bad one must end (reply or close) without hurting the others.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use poolsocks::socks::{Command, ReplyCode, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SESSIONS: u64 = 3000;
const WORKERS: u64 = 48;
const EVENT_DEADLINE: Duration = Duration::from_secs(20);

/// splitmix64: a tiny deterministic generator, so a failure can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// FNV-1a: a checksum to compare what was sent with what came back.
fn checksum(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A good session: CONNECT, several random-sized writes (the first pipelined with the
/// request), and a byte-exact echo of all of it.
async fn good(proxy: SocketAddr, upstream: SocketAddr, rng: &mut Rng) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let mut wire = vec![5, 1, 0];
    Request { command: Command::Connect, target: upstream.into() }.write_to(&mut wire);
    let chunks: Vec<Vec<u8>> = (0..1 + rng.below(4))
        .map(|_| {
            let len = 1 + rng.below(32 * 1024) as usize;
            rng.bytes(len)
        })
        .collect();
    let sent: Vec<u8> = chunks.concat();
    wire.extend_from_slice(&chunks[0]);
    stream.write_all(&wire).await.expect("greeting, request and first chunk");
    let (mut reader, mut writer) = stream.into_split();
    let rest = chunks[1..].to_vec();
    let writing = tokio::spawn(async move {
        for chunk in rest {
            writer.write_all(&chunk).await.expect("write chunk");
        }
        writer.shutdown().await.expect("half-close");
    });
    let mut head = [0u8; 2];
    reader.read_exact(&mut head).await.expect("selection");
    let reply = poolsocks::socks::Reply::read_from(&mut reader).await.expect("reply");
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let mut received = Vec::new();
    tokio::time::timeout(EVENT_DEADLINE, reader.read_to_end(&mut received))
        .await
        .expect("echo finished")
        .expect("read echo");
    writing.await.expect("writer");
    assert_eq!(received.len(), sent.len(), "lost bytes");
    assert_eq!(checksum(&received), checksum(&sent), "corrupted bytes");
}

/// A bad session of a random kind; it must end (answered or closed) within the deadline.
async fn bad(proxy: SocketAddr, rng: &mut Rng) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let bytes: Vec<u8> = match rng.below(6) {
        // Truncated somewhere in greeting + request, then the client closes its side.
        0 => {
            let full = [
                5u8, 1, 0, 5, 1, 0, 3, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't', 0,
                80,
            ];
            full[..rng.below(full.len() as u64) as usize].to_vec()
        }
        // A domain length promising more than is sent, then silence.
        1 => vec![5, 1, 0, 5, 1, 0, 3, 255, b'x', b'y'],
        // Pure garbage of random length.
        2 => {
            let len = 1 + rng.below(512) as usize;
            rng.bytes(len)
        }
        // Valid greeting, garbage request.
        3 => {
            let mut bytes = vec![5, 1, 0];
            let len = 1 + rng.below(64) as usize;
            bytes.extend(rng.bytes(len));
            bytes
        }
        // Stalled: connect and say nothing.
        4 => Vec::new(),
        // A version-4 greeting.
        _ => vec![4, 1, 0, 80, 127, 0, 0, 1, 0],
    };
    let _ = stream.write_all(&bytes).await;
    if rng.below(2) == 0 {
        let _ = stream.shutdown().await;
    }
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(EVENT_DEADLINE, stream.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "a bad session was left hanging: {bytes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_mixed_sessions_lose_no_byte_and_leave_nothing_hanging() {
    let seed =
        std::env::var("HOSTILE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_1234);
    eprintln!("seed {seed} (replay with HOSTILE_SEED={seed})");
    let echo = EchoServer::start().await;
    let mut config = test_config();
    config.server.handshake_timeout_ms = 200;
    let proxy = TestProxy::start(config).await;

    let next = Arc::new(AtomicU64::new(0));
    let good_done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (next, good_done) = (next.clone(), good_done.clone());
        let (proxy_addr, upstream) = (proxy.addr, echo.addr);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ worker.wrapping_mul(0x1000_0000_01b3));
            while next.fetch_add(1, Ordering::Relaxed) < SESSIONS {
                if rng.below(10) < 6 {
                    good(proxy_addr, upstream, &mut rng).await;
                    good_done.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad(proxy_addr, &mut rng).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker panicked (see its message above)");
    }
    let good_sessions = good_done.load(Ordering::Relaxed);
    assert!(good_sessions > SESSIONS / 2, "only {good_sessions} good sessions ran");
    proxy.stop().await;
}
