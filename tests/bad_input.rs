//! Hostile and broken clients get the right reply or a clean close, and never stop the proxy
//! from serving a well-behaved client at the same time.

mod common;

use std::time::Duration;

use common::*;
use poolsocks::socks::{ReplyCode, METHOD_NO_ACCEPTABLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for awaiting an event that must happen; only fails a broken build, never paces it.
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// What a bad client eventually saw.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The proxy closed the connection after sending exactly these bytes.
    ClosedAfter(Vec<u8>),
}

async fn outcome(mut stream: TcpStream) -> Outcome {
    let mut received = Vec::new();
    let read = tokio::time::timeout(EVENT_DEADLINE, stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "proxy never closed the connection");
    Outcome::ClosedAfter(received)
}

async fn send_raw(proxy: std::net::SocketAddr, bytes: &[u8], then_half_close: bool) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    if then_half_close {
        stream.shutdown().await.expect("half-close");
    }
    stream
}

#[tokio::test]
async fn every_kind_of_bad_handshake_is_answered_or_closed_while_good_clients_are_served() {
    let echo = EchoServer::start().await;
    let proxy = TestProxy::start(test_config()).await; // handshake timeout 500 ms

    let mut oversized_domain = vec![5, 1, 0, 5, 1, 0, 3, 255];
    oversized_domain.extend_from_slice(&[b'a'; 40]); // promises 255 bytes, sends 40, then stalls
    let garbage: Vec<u8> =
        (0..64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();

    let cases: Vec<(&str, TcpStream, Outcome)> = vec![
        (
            "wrong version (SOCKS4)",
            send_raw(proxy.addr, &[4, 1, 0, 80, 127, 0, 0, 1, 0], false).await,
            Outcome::ClosedAfter(vec![]),
        ),
        (
            "zero methods",
            send_raw(proxy.addr, &[5, 0], false).await,
            Outcome::ClosedAfter(vec![5, METHOD_NO_ACCEPTABLE]),
        ),
        (
            "truncated greeting",
            send_raw(proxy.addr, &[5, 3, 0], true).await,
            Outcome::ClosedAfter(vec![]),
        ),
        (
            "truncated request",
            send_raw(proxy.addr, &[5, 1, 0, 5, 1, 0, 1, 127, 0], true).await,
            Outcome::ClosedAfter(vec![5, 0]),
        ),
        (
            "oversized domain length, stalled",
            send_raw(proxy.addr, &oversized_domain, false).await,
            Outcome::ClosedAfter(vec![5, 0]),
        ),
        ("garbage", send_raw(proxy.addr, &garbage, false).await, Outcome::ClosedAfter(vec![])),
        ("silent client", send_raw(proxy.addr, &[], false).await, Outcome::ClosedAfter(vec![])),
        (
            "greeting then silence",
            send_raw(proxy.addr, &[5, 1, 0], false).await,
            Outcome::ClosedAfter(vec![5, 0]),
        ),
    ];

    // While all of those are pending, a well-behaved client is served in full.
    for round in 0..3u8 {
        let (mut stream, reply) = connect(proxy.addr, echo.addr.into()).await;
        assert_eq!(reply.code, ReplyCode::Succeeded);
        let payload = [round; 4096];
        assert_eq!(round_trip(&mut stream, &payload).await, payload);
    }

    for (name, stream, expected) in cases {
        assert_eq!(outcome(stream).await, expected, "{name}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    let mut config = test_config();
    config.server.handshake_timeout_ms = 300;
    let proxy = TestProxy::start(config).await;
    let started = tokio::time::Instant::now();
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(outcome(stream).await, Outcome::ClosedAfter(vec![]));
    // Dropped by the timeout, not by anything else: it lived at least that long.
    assert!(started.elapsed() >= Duration::from_millis(300));
    proxy.stop().await;
}

#[tokio::test]
async fn clients_over_max_connections_are_accepted_and_closed_then_served_once_a_slot_frees() {
    let echo = EchoServer::start().await;
    let mut config = test_config();
    config.server.max_connections = 2;
    config.server.handshake_timeout_ms = 30_000;
    let proxy = TestProxy::start(config).await;

    // Two clients hold both slots (connected, mid-handshake).
    let first = send_raw(proxy.addr, &[5, 1, 0], false).await;
    let mut second = send_raw(proxy.addr, &[5, 1, 0], false).await;
    let mut selection = [0u8; 2];
    second.read_exact(&mut selection).await.expect("second admitted");

    // The third is closed at once, not left waiting.
    let third = TcpStream::connect(proxy.addr).await.expect("accepted by the kernel");
    assert_eq!(outcome(third).await, Outcome::ClosedAfter(vec![]));

    // Free a slot; the handler notices the EOF and releases its permit. The next admission
    // happens as soon as that completes (bounded retries, no sleeping).
    drop(first);
    let served = serve_once_admitted(proxy.addr, echo.addr).await;
    assert!(served, "a slot never freed up after a client left");
    drop(second);
    proxy.stop().await;
}
