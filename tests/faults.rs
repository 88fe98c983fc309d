//! Upstream faults and slow clients: the client gets the right reply or a clean close, and
//! everyone else keeps being served.

mod common;

use std::time::Duration;

use common::*;
use poolsocks::socks::ReplyCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const EVENT_DEADLINE: Duration = Duration::from_secs(10);

/// Serves one good session through `proxy` to a fresh echo server; panics if it fails.
async fn good_session(proxy: std::net::SocketAddr) {
    let echo = EchoServer::start().await;
    let (mut stream, reply) = connect(proxy, echo.addr.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"still serving").await, b"still serving");
}

#[tokio::test]
async fn an_upstream_reset_mid_transfer_ends_the_client_session_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        // Wait for the request, so the reset comes mid-transfer and not during the connect
        // (then the client would rightly get a failure reply instead).
        let mut request = [0u8; 3];
        stream.read_exact(&mut request).await.expect("request");
        stream.write_all(&[7u8; 64 * 1024]).await.expect("write");
        // Linger 0: close sends RST instead of FIN.
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(stream);
    });
    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, reply) = connect(proxy.addr, origin.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    stream.write_all(b"GET").await.expect("request");
    let mut received = Vec::new();
    let ended = tokio::time::timeout(EVENT_DEADLINE, stream.read_to_end(&mut received)).await;
    assert!(ended.is_ok(), "client session was left hanging after the upstream reset");
    assert!(received.len() <= 64 * 1024);
    assert!(received.iter().all(|&b| b == 7), "bytes corrupted");
    good_session(proxy.addr).await;
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_that_accepts_and_closes_at_once_gives_success_then_eof() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let proxy = TestProxy::start(test_config()).await;
    let (mut stream, reply) = connect(proxy.addr, origin.into()).await;
    assert_eq!(reply.code, ReplyCode::Succeeded, "the TCP connect itself succeeded");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(EVENT_DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(_)) | Ok(Err(_))), "left hanging");
    assert!(rest.is_empty());
    drop(stream);
    good_session(proxy.addr).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_dripping_one_byte_at_a_time_is_dropped_at_the_handshake_timeout() {
    let mut config = test_config();
    config.server.handshake_timeout_ms = 400;
    let proxy = TestProxy::start(config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = tokio::time::Instant::now();
    // A slowloris: a valid greeting, then a domain request one byte every 50 ms. Each byte
    // arrives well within any per-read timeout; only a whole-handshake deadline stops it.
    stream.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await.expect("selection");
    let mut request = vec![5, 1, 0, 3, 200];
    request.extend_from_slice(&[b'a'; 200]);
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut dropped = false;
    for byte in request {
        ticker.tick().await;
        if stream.write_all(&[byte]).await.is_err() {
            dropped = true;
            break;
        }
        // A closed connection shows as EOF on a non-blocking read probe.
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::ZERO, stream.read(&mut probe)).await {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the drip-feeding client was never dropped");
    let lived = started.elapsed();
    assert!(lived >= Duration::from_millis(400), "dropped before the timeout ({lived:?})");
    good_session(proxy.addr).await;
    proxy.stop().await;
}

#[tokio::test]
async fn silent_clients_cannot_hold_max_connections_beyond_the_handshake_timeout() {
    let mut config = test_config();
    config.server.max_connections = 4;
    config.server.handshake_timeout_ms = 300;
    let proxy = TestProxy::start(config).await;
    let mut squatters = Vec::new();
    for _ in 0..4 {
        squatters.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    // Every squatter is dropped by the timeout...
    for squatter in &mut squatters {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(EVENT_DEADLINE, squatter.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a silent client kept its slot");
    }
    // ...and their slots are free again: a good client is served (bounded retries while the
    // handlers finish releasing their permits).
    let echo = EchoServer::start().await;
    let served = serve_once_admitted(proxy.addr, echo.addr).await;
    assert!(served);
    proxy.stop().await;
}
