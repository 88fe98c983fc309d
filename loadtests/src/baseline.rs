//! The two baseline proxies' common part (bins `minirelay` and `fixedpool`): a small SOCKS5
//! server, no authentication, CONNECT only, IPv4, IPv6 and domain names, written the plain way
//! one would write it with tokio. Deliberately independent of the poolsocks codec, so the
//! baseline is not poolsocks with parts removed.
//!
//! Per session: read the greeting (usually one read), answer, read the request, get an upstream
//! connection from the [`Connector`], answer with BND = the upstream socket's local address (RFC
//! 1928 §6), forward any bytes the client sent early, then `tokio::io::copy_bidirectional`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client has this long for its greeting and request (keeps a silent client from holding a
/// task forever; an ordinary client needs one round trip).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit on one dial (all addresses of a name together).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a client asked to go, as it asked (a name stays a name: it is the pool's key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dest {
    Ip(SocketAddr),
    Name(String, u16),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Ip(addr) => write!(f, "{addr}"),
            Dest::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Why a handshake ended without a CONNECT to carry out. The SOCKS reply, if any, was sent.
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// Not SOCKS5, or a malformed message.
    Protocol(&'static str),
    /// The client offered no method we accept (answered 0xFF).
    NoMethod,
    /// A command other than CONNECT (answered 0x07).
    Command(u8),
    /// An address type we do not know (answered 0x08).
    AddressType(u8),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// Bytes read from the client: the handshake may arrive in pieces or all at once (a client may
/// send greeting and request together, and even its first payload bytes).
struct Input {
    buf: [u8; 600],
    len: usize,
    pos: usize,
}

impl Input {
    fn new() -> Self {
        Input { buf: [0; 600], len: 0, pos: 0 }
    }

    /// The next `n` bytes, reading more as needed. The largest message (a request with a
    /// 255-byte name) is 262 bytes, well inside the buffer.
    async fn take(&mut self, stream: &mut TcpStream, n: usize) -> Result<&[u8], HandshakeError> {
        while self.len - self.pos < n {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            }
            let read = stream.read(&mut self.buf[self.len..]).await?;
            if read == 0 {
                return Err(HandshakeError::Protocol("client closed during the handshake"));
            }
            self.len += read;
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.buf[start..start + n])
    }

    /// What the client sent after its request (payload it did not wait to send).
    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }
}

/// Reads greeting and request, answering the greeting. Returns the destination and any early
/// payload bytes. Errors that have a SOCKS reply get it here.
pub async fn handshake(client: &mut TcpStream) -> Result<(Dest, Vec<u8>), HandshakeError> {
    let mut input = Input::new();
    let head = input.take(client, 2).await?;
    if head[0] != 5 {
        return Err(HandshakeError::Protocol("not SOCKS5"));
    }
    let methods = usize::from(head[1]);
    let offered = input.take(client, methods).await?;
    if !offered.contains(&0) {
        let _ = client.write_all(&[5, 0xFF]).await;
        return Err(HandshakeError::NoMethod);
    }
    client.write_all(&[5, 0]).await?;
    let head = input.take(client, 4).await?;
    let (version, command, atyp) = (head[0], head[1], head[3]);
    if version != 5 {
        return Err(HandshakeError::Protocol("request is not SOCKS5"));
    }
    let dest = match atyp {
        1 => {
            let b = input.take(client, 6).await?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Dest::Ip(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([b[4], b[5]])))
        }
        4 => {
            let b = input.take(client, 18).await?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let ip = Ipv6Addr::from(octets);
            Dest::Ip(SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([b[16], b[17]])))
        }
        3 => {
            let len = usize::from(input.take(client, 1).await?[0]);
            let b = input.take(client, len + 2).await?;
            let name = std::str::from_utf8(&b[..len])
                .map_err(|_| HandshakeError::Protocol("name is not UTF-8"))?
                .to_string();
            Dest::Name(name, u16::from_be_bytes([b[len], b[len + 1]]))
        }
        other => {
            let _ = client.write_all(&failure(8)).await;
            return Err(HandshakeError::AddressType(other));
        }
    };
    if command != 1 {
        let _ = client.write_all(&failure(7)).await;
        return Err(HandshakeError::Command(command));
    }
    Ok((dest, input.rest().to_vec()))
}

/// A failure reply (BND 0.0.0.0:0).
pub fn failure(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// The success reply, BND = the address the proxy uses towards the destination.
pub fn success(bound: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(22);
    out.extend_from_slice(&[5, 0, 0]);
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// RFC 1928 reply code for a failed dial.
pub fn reply_code(e: &io::Error) -> u8 {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => 5,
        io::ErrorKind::NetworkUnreachable => 3,
        io::ErrorKind::HostUnreachable | io::ErrorKind::TimedOut => 4,
        _ => match e.raw_os_error() {
            Some(libc::ENETUNREACH) => 3,
            Some(libc::EHOSTUNREACH) => 4,
            _ => 1,
        },
    }
}

/// Dials a destination, a name through `tokio::net::lookup_host` (each address in turn), with
/// TCP_NODELAY set.
pub async fn dial(dest: &Dest) -> io::Result<TcpStream> {
    let attempt = async {
        let stream = match dest {
            Dest::Ip(addr) => TcpStream::connect(*addr).await?,
            Dest::Name(name, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "name has no address");
                let mut found = None;
                for addr in tokio::net::lookup_host((name.as_str(), *port)).await? {
                    match TcpStream::connect(addr).await {
                        Ok(stream) => {
                            found = Some(stream);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                found.ok_or(last)?
            }
        };
        // Request/response traffic: without TCP_NODELAY a small write waits for the ACK of the
        // previous small segment (Nagle), and the peer delays that ACK up to 40 ms (microsocks,
        // which does not set it, measured ~44 ms p50 against Dante's 3 ms). poolsocks sets it on
        // both sockets too, so the comparison is like for like.
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
}

/// Where a session's upstream connection comes from: a fresh dial, or a pool.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, dest: Dest) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

/// The relay without a pool: every session dials.
pub struct Dialer;

impl Connector for Dialer {
    async fn connect(&self, dest: Dest) -> io::Result<TcpStream> {
        dial(&dest).await
    }
}

/// Accepts until the process ends, one task per client.
pub async fn serve<C: Connector>(listener: TcpListener, connector: Arc<C>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let connector = connector.clone();
                tokio::spawn(async move {
                    let _ = session(client, connector.as_ref()).await;
                });
            }
            // Out of descriptors or similar: wait a little instead of spinning on the error.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One client: handshake, upstream, reply, copy until both directions are done.
pub async fn session<C: Connector>(mut client: TcpStream, connector: &C) -> io::Result<()> {
    // See `dial` for why: the SOCKS replies and each response are small writes.
    client.set_nodelay(true)?;
    let (dest, early) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut client)).await
    {
        Ok(Ok(negotiated)) => negotiated,
        Ok(Err(HandshakeError::Io(e))) => return Err(e),
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    let mut upstream = match connector.connect(dest).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let _ = client.write_all(&failure(reply_code(&e))).await;
            return Ok(());
        }
    };
    let bound = upstream.local_addr()?;
    client.write_all(&success(bound)).await?;
    if !early.is_empty() {
        upstream.write_all(&early).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// What every baseline proxy is told: where to listen and when to stop.
#[derive(clap::Args)]
pub struct Common {
    /// Address to listen on (loopback only).
    #[arg(long, value_parser = crate::targets::parse_addr)]
    pub listen: SocketAddr,
    /// Exit after this many seconds (everything the harness starts stops by itself).
    #[arg(long, default_value_t = 3600.0)]
    pub duration: f64,
}

/// `listen`, or the baseline `name` says why not and exits: without its listener it is no use.
pub fn listen_or_exit(name: &str, addr: SocketAddr) -> TcpListener {
    listen(addr).unwrap_or_else(|e| {
        eprintln!("{name}: listen on {addr}: {e}");
        std::process::exit(1);
    })
}

/// Binds a listener with a deep backlog (runs open many connections in bursts).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Waits for `duration` seconds, SIGTERM or Ctrl-C: every process the harness starts ends by
/// itself.
pub async fn run_until_stopped(duration: f64) -> io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(duration.max(0.0))) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn parses_greeting_and_request_sent_together_and_keeps_early_bytes() {
        let (mut client, mut server) = pair().await;
        let mut hello = vec![5, 2, 2, 0, 5, 1, 0, 3, 9];
        hello.extend_from_slice(b"localhost");
        hello.extend_from_slice(&8080u16.to_be_bytes());
        hello.extend_from_slice(b"GET /");
        client.write_all(&hello).await.expect("write");
        let (dest, early) = handshake(&mut server).await.expect("handshake");
        assert_eq!(dest, Dest::Name("localhost".into(), 8080));
        assert_eq!(early, b"GET /");
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.expect("selection");
        assert_eq!(answer, [5, 0]);
    }

    #[tokio::test]
    async fn parses_a_request_that_arrives_in_pieces() {
        let (mut client, mut server) = pair().await;
        let task = tokio::spawn(async move { handshake(&mut server).await.map(|(d, _)| d) });
        for piece in [&[5u8][..], &[1, 0], &[5, 1, 0, 4], &[0; 15], &[1, 0, 80]] {
            client.write_all(piece).await.expect("write");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dest = task.await.expect("join").expect("handshake");
        assert_eq!(dest, Dest::Ip("[::1]:80".parse().expect("addr")));
    }

    #[tokio::test]
    async fn refuses_other_methods_and_commands() {
        let (mut client, mut server) = pair().await;
        client.write_all(&[5, 1, 2]).await.expect("write");
        assert!(matches!(handshake(&mut server).await, Err(HandshakeError::NoMethod)));
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(answer, [5, 0xFF]);

        let (mut client, mut server) = pair().await;
        client.write_all(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await.expect("write");
        assert!(matches!(handshake(&mut server).await, Err(HandshakeError::Command(2))));
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(answer[2..4], [5, 7]);
    }

    #[test]
    fn success_reply_carries_the_bound_address() {
        let reply = success("127.0.0.1:4660".parse().expect("addr"));
        assert_eq!(reply, [5, 0, 0, 1, 127, 0, 0, 1, 0x12, 0x34]);
        assert_eq!(success("[::1]:1".parse().expect("addr")).len(), 22);
    }
}
