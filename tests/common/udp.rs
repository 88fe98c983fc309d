//! UDP fixtures: an RFC 1928 UDP ASSOCIATE client of the tests' own (every reply field read
//! raw), a UDP echo server that reports who sent what, and a resolver that counts lookups.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poolsocks::resolve::{ResolveError, Resolver, StaticResolver};
use poolsocks::socks::{Command, Request, TargetAddr, UdpDatagram, METHOD_NO_AUTH};
use poolsocks::upstream::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::greet;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The reply to a request, as raw bytes and decoded: `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    pub code: u8,
    pub bound: SocketAddr,
}

/// Reads one reply naming an IP address, byte by byte, checking VER and RSV.
pub async fn read_raw_reply(stream: &mut TcpStream) -> RawReply {
    let mut head = [0u8; 4];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
        .await
        .expect("reply in time")
        .expect("reply head");
    assert_eq!(head[0], 5, "VER");
    assert_eq!(head[2], 0, "RSV");
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        other => panic!("reply ATYP {other}: expected an IP address"),
    };
    let mut rest = vec![0u8; addr_len + 2];
    stream.read_exact(&mut rest).await.expect("reply address");
    let ip: IpAddr = if addr_len == 4 {
        <[u8; 4]>::try_from(&rest[..4]).map(IpAddr::from).expect("v4")
    } else {
        <[u8; 16]>::try_from(&rest[..16]).map(IpAddr::from).expect("v6")
    };
    let port = u16::from_be_bytes([rest[addr_len], rest[addr_len + 1]]);
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(&rest);
    RawReply { bytes, code: head[1], bound: SocketAddr::new(ip, port) }
}

/// Greets `proxy` (no auth) and sends `command` for `target`; returns the control connection
/// and the first reply.
pub async fn raw_request(
    proxy: SocketAddr,
    command: Command,
    target: TargetAddr,
) -> (TcpStream, RawReply) {
    let mut control = TcpStream::connect(proxy).await.expect("connect to proxy");
    assert_eq!(greet(&mut control, &[METHOD_NO_AUTH]).await.method, METHOD_NO_AUTH);
    let mut buf = Vec::new();
    Request { command, target }.write_to(&mut buf);
    control.write_all(&buf).await.expect("send request");
    let reply = read_raw_reply(&mut control).await;
    (control, reply)
}

/// An open association: its control connection, the relay the reply named, and the client's
/// UDP socket (on the same family as the relay, loopback).
pub struct Association {
    pub control: TcpStream,
    pub relay: SocketAddr,
    pub socket: UdpSocket,
    pub reply: RawReply,
}

impl Association {
    /// UDP ASSOCIATE with DST zeros; panics unless the proxy says yes.
    pub async fn open(proxy: SocketAddr) -> Association {
        Self::open_requesting(proxy, TargetAddr::unspecified(), None).await
    }

    /// UDP ASSOCIATE naming `requested`; the client socket is `socket` or a fresh one on the
    /// proxy's loopback family.
    pub async fn open_requesting(
        proxy: SocketAddr,
        requested: TargetAddr,
        socket: Option<UdpSocket>,
    ) -> Association {
        let (control, reply) = raw_request(proxy, Command::UdpAssociate, requested).await;
        assert_eq!(reply.code, 0, "UDP ASSOCIATE refused: {:?}", reply.bytes);
        // The client sends from the address its control connection comes from (on loopback
        // that is 127.0.0.1 whichever 127/8 address it reached).
        let local = control.local_addr().expect("control address").ip();
        let socket = match socket {
            Some(socket) => socket,
            None => UdpSocket::bind(SocketAddr::new(local, 0)).await.expect("client socket"),
        };
        Association { control, relay: reply.bound, socket, reply }
    }

    pub async fn send(&self, target: TargetAddr, payload: &[u8]) {
        self.send_raw(&datagram(target, payload)).await;
    }

    pub async fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.relay).await.expect("send to relay");
    }

    /// The next datagram from the relay: (the whole datagram, its source as named in the
    /// header, its payload).
    pub async fn recv(&self) -> (Vec<u8>, TargetAddr, Vec<u8>) {
        let mut buf = vec![0u8; 70_000];
        let (len, from) = tokio::time::timeout(DEADLINE, self.socket.recv_from(&mut buf))
            .await
            .expect("a datagram from the relay in time")
            .expect("recv");
        assert_eq!(from, self.relay, "datagrams to the client come from the relay socket");
        buf.truncate(len);
        let parsed = UdpDatagram::parse(&buf).expect("a reply header that parses");
        assert_eq!(parsed.frag, 0);
        let (target, payload) = (parsed.target.clone(), parsed.payload.to_vec());
        (buf, target, payload)
    }

    /// Sends `payload` to `target` and returns the reply's payload, checking the header names
    /// `expect_from`.
    pub async fn round_trip(
        &self,
        target: TargetAddr,
        payload: &[u8],
        expect_from: SocketAddr,
    ) -> Vec<u8> {
        self.send(target, payload).await;
        let (_, from, back) = self.recv().await;
        assert_eq!(from, TargetAddr::Ip(expect_from), "the reply header names its sender");
        back
    }

    /// Half-closes the control connection and waits for the proxy to close it in turn, which
    /// it does after closing the association's sockets.
    pub async fn close(mut self) {
        self.control.shutdown().await.expect("half-close control");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, self.control.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(_))), "the proxy closes the control connection: {read:?}");
    }
}

/// One whole client datagram: header (FRAG 0) and payload.
pub fn datagram(target: TargetAddr, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    UdpDatagram { frag: 0, target, payload }.write_to(&mut buf);
    buf
}

/// A UDP server that echoes every datagram back to its sender and reports (sender, payload).
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub seen: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
}

impl UdpEcho {
    pub async fn start() -> UdpEcho {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(addr: SocketAddr) -> UdpEcho {
        let socket = UdpSocket::bind(addr).await.expect("bind UDP echo");
        let addr = socket.local_addr().expect("echo addr");
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = tx.send((from, buf[..len].to_vec()));
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        UdpEcho { addr, seen }
    }

    pub async fn next(&mut self) -> (SocketAddr, Vec<u8>) {
        tokio::time::timeout(DEADLINE, self.seen.recv())
            .await
            .expect("the echo server saw a datagram in time")
            .expect("echo running")
    }
}

/// A [`StaticResolver`] that counts its lookups.
pub struct CountingResolver {
    inner: StaticResolver,
    pub lookups: Arc<AtomicUsize>,
}

impl CountingResolver {
    pub fn new(inner: StaticResolver) -> (Arc<CountingResolver>, Arc<AtomicUsize>) {
        let lookups = Arc::new(AtomicUsize::new(0));
        (Arc::new(CountingResolver { inner, lookups: lookups.clone() }), lookups)
    }
}

impl Resolver for CountingResolver {
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(host, port)
    }
}

/// Waits until `condition` holds (checked every millisecond), up to [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub fn localhost_v4(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}
