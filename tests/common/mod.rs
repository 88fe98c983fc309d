//! Shared test fixtures: an in-process proxy on an ephemeral port, upstream servers that record
//! what they accepted, and a small SOCKS5 client built on the crate's own codec.
#![allow(dead_code)] // each test binary uses a different subset

pub mod daemon;
pub mod dns;
pub mod fleet;
pub mod netns;
pub mod real;
pub mod udp;
pub mod upstreams;

use std::net::SocketAddr;
use std::sync::Arc;

use poolsocks::config::Config;
pub use poolsocks::resolve::StaticResolver;
use poolsocks::server::{Server, ServerError};
use poolsocks::socks::{
    Command, Greeting, MethodSelection, Reply, Request, TargetAddr, UserPassReply, UserPassRequest,
    METHOD_NO_AUTH, METHOD_USERPASS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A proxy running in this process on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl TestProxy {
    /// An in-process proxy whose names resolve through a static table (only `localhost`):
    /// a test never asks the machine's DNS server.
    pub async fn start(config: Config) -> Self {
        Self::start_with_resolver(config, StaticResolver::new()).await
    }

    pub async fn start_with_resolver(config: Config, resolver: StaticResolver) -> Self {
        let server =
            Server::build_with_resolver(config, Arc::new(resolver)).await.expect("server builds");
        Self::start_server(server).await
    }

    pub async fn start_server(server: Server) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        Self::start_server_on(server, listener).await
    }

    /// Runs `server` on a listener of the test's choosing (`0.0.0.0:0`, `[::1]:0`).
    pub async fn start_server_on(server: Server, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("proxy addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = rx.await;
        }));
        TestProxy { addr, shutdown: Some(tx), task }
    }

    /// Triggers shutdown and waits until the server has drained and returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("server task").expect("server ran cleanly");
    }
}

/// Every dial first waits `delay`, as the handshake with a distant destination would: the
/// delay sits on the connect path (what the pool measures), not in a server that sleeps.
pub struct DistantDialer {
    pub delay: std::time::Duration,
}

impl poolsocks::upstream::Dialer for DistantDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: poolsocks::upstream::DialLimits,
    ) -> poolsocks::upstream::BoxFuture<'static, Result<TcpStream, poolsocks::upstream::ConnectError>>
    {
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            poolsocks::upstream::TcpDialer::new().dial(target, limits).await
        })
    }
}

/// A server whose names resolve through a static table (only `localhost`).
pub async fn build_server(config: Config) -> Result<Server, ServerError> {
    Server::build_with_resolver(config, Arc::new(StaticResolver::new())).await
}

/// Defaults, with a short handshake timeout so tests about silent clients end quickly.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.handshake_timeout_ms = 500;
    config.server.shutdown_grace_secs = 5;
    // Every destination here is on loopback, where a dial is cheaper than a spare (and the
    // default policy keeps none): tests of the pool's mechanics want spares all the same.
    config.server.pool.cheap_dial_us = 0;
    config
}

/// An upstream that echoes every byte and half-closes after the client does. It reports each
/// accepted connection's peer address, so tests see what really reached the destination.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: mpsc::UnboundedReceiver<SocketAddr>,
}

impl EchoServer {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(bind: &str) -> Self {
        let listener = TcpListener::bind(bind).await.expect("bind echo server");
        let addr = listener.local_addr().expect("echo addr");
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, peer)) = listener.accept().await {
                let _ = tx.send(peer);
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    let _ = writer.shutdown().await;
                });
            }
        });
        EchoServer { addr, accepted }
    }
}

/// A port on 127.0.0.1 where nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    // Bound, never listening: a connect is refused, and no other test of this process can be
    // given the port (a listener bound and dropped freed it for the next bind(0), which made
    // the "refused" port answer now and then).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("addr");
    std::mem::forget(socket);
    addr
}

/// Sends the greeting and returns the server's choice.
pub async fn greet(stream: &mut TcpStream, methods: &[u8]) -> MethodSelection {
    let mut buf = Vec::new();
    Greeting { methods: methods.to_vec() }.write_to(&mut buf);
    stream.write_all(&buf).await.expect("send greeting");
    MethodSelection::read_from(stream).await.expect("method selection")
}

pub async fn authenticate(stream: &mut TcpStream, username: &str, password: &str) -> UserPassReply {
    let mut buf = Vec::new();
    UserPassRequest {
        username: username.into(),
        password: poolsocks::secret::Secret::new(password),
    }
    .write_to(&mut buf);
    stream.write_all(&buf).await.expect("send credentials");
    UserPassReply::read_from(stream).await.expect("auth reply")
}

pub async fn request(stream: &mut TcpStream, command: Command, target: TargetAddr) -> Reply {
    let mut buf = Vec::new();
    Request { command, target }.write_to(&mut buf);
    stream.write_all(&buf).await.expect("send request");
    Reply::read_from(stream).await.expect("reply")
}

/// A no-auth CONNECT through `proxy`; returns the stream (ready to relay) and the reply.
pub async fn connect(proxy: SocketAddr, target: TargetAddr) -> (TcpStream, Reply) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    assert_eq!(greet(&mut stream, &[METHOD_NO_AUTH]).await.method, METHOD_NO_AUTH);
    let reply = request(&mut stream, Command::Connect, target).await;
    (stream, reply)
}

/// CONNECT with username/password.
pub async fn connect_with_password(
    proxy: SocketAddr,
    target: TargetAddr,
    user: &str,
    password: &str,
) -> (TcpStream, Reply) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
    assert_eq!(greet(&mut stream, &[METHOD_USERPASS]).await.method, METHOD_USERPASS);
    assert!(authenticate(&mut stream, user, password).await.success, "credentials accepted");
    let reply = request(&mut stream, Command::Connect, target).await;
    (stream, reply)
}

/// Writes `payload`, reads the same number of bytes back and returns them.
pub async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.expect("read back");
    back
}

/// Reads until EOF; returns what came, or the error that ended it.
pub async fn read_to_end(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.map(|_| all)
}

/// True when the peer closed the connection (EOF or reset) without sending anything more.
pub async fn closed_without_data(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte).await, Ok(0) | Err(_))
}

/// What a [`TaggedServer`] saw of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// Connection number `index` (from 1) was accepted from `peer`.
    Accepted { index: usize, peer: SocketAddr },
    /// Connection `index` was closed by the proxy.
    Closed { index: usize },
}

/// An upstream that numbers the connections it accepts, reports every accept and close, and on
/// each connection answers `who\n` with `conn N\n` (then echoes anything else). Tests use it to
/// prove from the destination's side which accepted connection served which client.
pub struct TaggedServer {
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<UpstreamEvent>,
    /// Every event seen so far, in order (filled by [`TaggedServer::next_event`]).
    pub seen: Vec<UpstreamEvent>,
}

impl TaggedServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tagged server");
        let addr = listener.local_addr().expect("addr");
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut index = 0;
            while let Ok((mut stream, peer)) = listener.accept().await {
                index += 1;
                let _ = tx.send(UpstreamEvent::Accepted { index, peer });
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) if &buf[..n] == b"who\n" => {
                                let answer = format!("conn {index}\n");
                                if stream.write_all(answer.as_bytes()).await.is_err() {
                                    break;
                                }
                            }
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = tx.send(UpstreamEvent::Closed { index });
                });
            }
        });
        TaggedServer { addr, events, seen: Vec::new() }
    }

    pub async fn next_event(&mut self) -> UpstreamEvent {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), self.events.recv())
            .await
            .expect("upstream event within 10 s")
            .expect("server running");
        self.seen.push(event);
        event
    }

    /// Takes events already delivered, without waiting.
    pub fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event);
        }
    }

    /// Awaits events until `count` connections have been accepted in all.
    pub async fn await_accepted(&mut self, count: usize) {
        while self.accepted() < count {
            self.next_event().await;
        }
    }

    /// Awaits the close of connection `index`.
    pub async fn await_closed(&mut self, index: usize) {
        while !self.seen.contains(&UpstreamEvent::Closed { index }) {
            self.next_event().await;
        }
    }

    pub fn accepted(&self) -> usize {
        self.seen.iter().filter(|e| matches!(e, UpstreamEvent::Accepted { .. })).count()
    }

    /// Connections accepted and not closed yet.
    pub fn open(&self) -> usize {
        let closed = self.seen.iter().filter(|e| matches!(e, UpstreamEvent::Closed { .. })).count();
        self.accepted() - closed
    }

    /// The connection whose proxy-side address is `peer`.
    pub fn index_of(&self, peer: SocketAddr) -> Option<usize> {
        self.seen.iter().find_map(|e| match e {
            UpstreamEvent::Accepted { index, peer: p } if *p == peer => Some(*index),
            _ => None,
        })
    }
}

/// Asks a [`TaggedServer`] connection which one it is.
pub async fn who(stream: &mut TcpStream) -> usize {
    stream.write_all(b"who\n").await.expect("ask who");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        stream.read_exact(&mut byte).await.expect("who answer");
        answer.push(byte[0]);
    }
    let text = String::from_utf8(answer).expect("utf8");
    text.trim().strip_prefix("conn ").and_then(|n| n.parse().ok()).expect("conn N")
}

/// Retries a full session through `proxy` to `upstream` until one is admitted (a slot under
/// `max_connections` frees as soon as a handler finishes; retries for up to 20 s, no sleeping).
/// Returns whether one was served in that time.
pub async fn serve_once_admitted(proxy: SocketAddr, upstream: SocketAddr) -> bool {
    // Bounded by time, not tries: on a fast machine 10,000 refused tries took less than the
    // 1-s idle timeout a test waits out.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        let mut stream = TcpStream::connect(proxy).await.expect("connect");
        stream.write_all(&[5, 1, 0]).await.expect("greeting");
        let mut selection = [0u8; 2];
        if stream.read_exact(&mut selection).await.is_ok() {
            let reply = request(&mut stream, Command::Connect, upstream.into()).await;
            assert_eq!(reply.code, poolsocks::socks::ReplyCode::Succeeded);
            assert_eq!(round_trip(&mut stream, b"admitted").await, b"admitted");
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

/// A plain HTTP/1.1 GET (`Connection: close`); the whole response as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect stats");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("response");
    String::from_utf8_lossy(&response).into_owned()
}
