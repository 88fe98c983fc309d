//! The PROXY protocol header (HAProxy's, versions 1 and 2) a load balancer sends before the
//! client's own bytes: who the client really is, when `[server] proxy_protocol = true`.
//!
//! Parsing is `ppp`'s. What is ours is reading exactly the header's bytes off the socket and no
//! more (the SOCKS greeting follows in the same stream): version 2 states its length in bytes
//! 15-16, version 1 ends at the first CRLF within 107 bytes. The version is told by the first
//! bytes: `PROXY` for version 1, the 12-byte binary signature for version 2.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest version 1 header, CRLF included (the protocol's own limit).
pub const V1_MAX_LENGTH: usize = 107;
/// A version 2 header's fixed part: signature (12), version/command, family/protocol, length (2).
const V2_FIXED_LENGTH: usize = 16;
/// The most address and TLV bytes accepted after the fixed part. The protocol allows 65,535; real
/// balancers send well under this (HAProxy's SSL TLVs, AWS NLB's endpoint id), and a connection
/// that claims more is refused rather than buffered.
pub const V2_MAX_PAYLOAD: usize = 4096;
/// Enough of the start to tell the versions apart: `PROXY` or the first bytes of the signature.
const PROBE_LENGTH: usize = 5;

/// What a valid header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedSource {
    /// A connection relayed for this client.
    Client(SocketAddr),
    /// The balancer speaking for itself (a v2 `LOCAL` command, or an address family the header
    /// does not carry: v1 `UNKNOWN`, v2 `UNSPEC`): served as a client from the socket's peer.
    Local,
}

impl ProxiedSource {
    /// The client a session should be served as: the header's source, or the socket's peer.
    pub fn client(self, socket_peer: SocketAddr) -> SocketAddr {
        match self {
            ProxiedSource::Client(addr) => addr,
            ProxiedSource::Local => socket_peer,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("connection did not start with a PROXY protocol header")]
    Missing,
    #[error("PROXY protocol v1 header without CRLF within {V1_MAX_LENGTH} bytes")]
    V1TooLong,
    #[error("PROXY protocol v2 header announces {0} bytes after its fixed part (at most {V2_MAX_PAYLOAD} accepted)")]
    V2TooLong(usize),
    #[error("invalid PROXY protocol v1 header: {0}")]
    V1(String),
    #[error("invalid PROXY protocol v2 header: {0}")]
    V2(String),
    #[error("PROXY protocol header for an unsupported address family or protocol ({0})")]
    Unsupported(&'static str),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyHeaderError {
    /// The connection closed or reset before a whole header arrived.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ProxyHeaderError::Io(e) if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
        ))
    }
}

/// Whether `peer` may send a header at all (IPv4-mapped IPv6 peers are judged as IPv4).
pub fn is_trusted(trusted: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|net| net.contains(&peer))
}

/// Reads one PROXY protocol header, version 1 or 2, from the start of `stream`, consuming
/// exactly its bytes. The caller bounds the time (the handshake timeout).
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ProxiedSource, ProxyHeaderError> {
    let v1_prefix = v1::PROTOCOL_PREFIX.as_bytes();
    let v2_prefix = &v2::PROTOCOL_PREFIX[..PROBE_LENGTH];
    // A byte at a time, so a client that skipped the balancer (a 3-byte SOCKS greeting, then
    // silence) is refused at its first byte instead of waiting out the timeout.
    let mut buf = Vec::with_capacity(V2_FIXED_LENGTH);
    while buf.len() < PROBE_LENGTH {
        buf.push(stream.read_u8().await?);
        if !v1_prefix.starts_with(&buf) && !v2_prefix.starts_with(&buf) {
            return Err(ProxyHeaderError::Missing);
        }
    }
    if buf.as_slice() == v1_prefix {
        read_v1(stream, buf).await
    } else {
        read_v2(stream, buf).await
    }
}

/// Version 1: text up to CRLF. Read a byte at a time, since the SOCKS bytes that follow must
/// stay in the socket; at most 107 reads, and balancers that can send v2 should.
async fn read_v1<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut buf: Vec<u8>,
) -> Result<ProxiedSource, ProxyHeaderError> {
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX_LENGTH {
            return Err(ProxyHeaderError::V1TooLong);
        }
        buf.push(stream.read_u8().await?);
    }
    let header =
        v1::Header::try_from(buf.as_slice()).map_err(|e| ProxyHeaderError::V1(e.to_string()))?;
    Ok(match header.addresses {
        v1::Addresses::Tcp4(a) => {
            ProxiedSource::Client(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            ProxiedSource::Client(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        v1::Addresses::Unknown => ProxiedSource::Local,
    })
}

/// Version 2: the fixed 16 bytes, then as many as bytes 15-16 say.
async fn read_v2<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut buf: Vec<u8>,
) -> Result<ProxiedSource, ProxyHeaderError> {
    buf.resize(V2_FIXED_LENGTH, 0);
    stream.read_exact(&mut buf[PROBE_LENGTH..]).await?;
    if &buf[..v2::PROTOCOL_PREFIX.len()] != v2::PROTOCOL_PREFIX {
        return Err(ProxyHeaderError::Missing);
    }
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::V2TooLong(payload));
    }
    buf.resize(V2_FIXED_LENGTH + payload, 0);
    stream.read_exact(&mut buf[V2_FIXED_LENGTH..]).await?;
    let header =
        v2::Header::try_from(buf.as_slice()).map_err(|e| ProxyHeaderError::V2(e.to_string()))?;
    if header.command == v2::Command::Local {
        return Ok(ProxiedSource::Local);
    }
    match header.protocol {
        v2::Protocol::Stream | v2::Protocol::Unspecified => {}
        v2::Protocol::Datagram => return Err(ProxyHeaderError::Unsupported("datagram")),
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => {
            Ok(ProxiedSource::Client(SocketAddr::new(a.source_address.into(), a.source_port)))
        }
        v2::Addresses::IPv6(a) => {
            Ok(ProxiedSource::Client(SocketAddr::new(a.source_address.into(), a.source_port)))
        }
        // The protocol asks receivers to use the real connection's addresses for UNSPEC.
        v2::Addresses::Unspecified => Ok(ProxiedSource::Local),
        v2::Addresses::Unix(_) => Err(ProxyHeaderError::Unsupported("unix")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ppp::v2::{Builder, Command, IPv4, IPv6, Protocol, Type, Version};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::test_support::tcp_pair;

    /// Sends `bytes` then `after` over a real socket, reads a header, and returns it with what
    /// was left in the socket (which must be exactly `after`).
    async fn parse(
        bytes: &[u8],
        after: &[u8],
    ) -> (Result<ProxiedSource, ProxyHeaderError>, Vec<u8>) {
        let (mut near, mut far) = tcp_pair().await;
        near.write_all(bytes).await.unwrap();
        near.write_all(after).await.unwrap();
        near.shutdown().await.unwrap();
        let result = read_header(&mut far).await;
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        (result, rest)
    }

    fn v2_proxy(source: &str, destination: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let destination: SocketAddr = destination.parse().unwrap();
        Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap()
    }

    const GREETING: &[u8] = &[5, 1, 0];

    #[tokio::test]
    async fn v1_tcp4_gives_the_client_and_leaves_the_socks_bytes() {
        let (result, rest) =
            parse(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 1080\r\n", GREETING).await;
        assert_eq!(result.unwrap(), ProxiedSource::Client("192.0.2.9:40000".parse().unwrap()));
        assert_eq!(rest, GREETING);
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (result, rest) = parse(b"PROXY TCP6 2001:db8::9 ::1 40000 1080\r\n", GREETING).await;
        assert_eq!(result.unwrap(), ProxiedSource::Client("[2001:db8::9]:40000".parse().unwrap()));
        assert_eq!(rest, GREETING);
        let (result, rest) = parse(b"PROXY UNKNOWN\r\n", GREETING).await;
        assert_eq!(result.unwrap(), ProxiedSource::Local);
        assert_eq!(rest, GREETING);
    }

    #[tokio::test]
    async fn v2_proxy_ipv4_and_ipv6_with_tlvs() {
        let (result, rest) = parse(&v2_proxy("192.0.2.9:40000", "127.0.0.1:1080"), GREETING).await;
        assert_eq!(result.unwrap(), ProxiedSource::Client("192.0.2.9:40000".parse().unwrap()));
        assert_eq!(rest, GREETING);

        let addresses: v2::Addresses = IPv6::new(
            "2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap(),
            std::net::Ipv6Addr::LOCALHOST,
            5,
            1080,
        )
        .into();
        let header =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses)
                .write_tlv(Type::Authority, b"proxy.example".as_slice())
                .unwrap()
                .write_tlv(Type::NoOp, [0u8; 40].as_slice())
                .unwrap()
                .build()
                .unwrap();
        let (result, rest) = parse(&header, GREETING).await;
        assert_eq!(result.unwrap(), ProxiedSource::Client("[2001:db8::9]:5".parse().unwrap()));
        assert_eq!(rest, GREETING, "TLVs consumed, nothing more");
    }

    #[tokio::test]
    async fn v2_local_is_the_balancer_itself() {
        let local = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        let (result, rest) = parse(&local, GREETING).await;
        let source = result.unwrap();
        assert_eq!(source, ProxiedSource::Local);
        let balancer: SocketAddr = "127.0.0.5:7000".parse().unwrap();
        assert_eq!(source.client(balancer), balancer);
        assert_eq!(rest, GREETING);

        // LOCAL with addresses (HAProxy's health checks send them): still the balancer.
        let addresses: v2::Addresses = IPv4::new([10, 0, 0, 1], [10, 0, 0, 2], 1, 2).into();
        let local =
            Builder::with_addresses(Version::Two | Command::Local, Protocol::Stream, addresses)
                .build()
                .unwrap();
        assert_eq!(parse(&local, b"").await.0.unwrap(), ProxiedSource::Local);
    }

    #[tokio::test]
    async fn a_client_without_a_header_is_refused_at_its_first_byte() {
        let (mut near, mut far) = tcp_pair().await;
        near.write_all(&[5, 1, 0]).await.unwrap(); // a SOCKS greeting, then waiting for an answer
        let read = tokio::time::timeout(Duration::from_secs(10), read_header(&mut far)).await;
        assert!(matches!(read, Ok(Err(ProxyHeaderError::Missing))), "{read:?}");
        drop(near);
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        // A SOCKS greeting without a header: the client skipped the balancer.
        let (result, _) = parse(&[5, 1, 0, 0, 0, 0], b"").await;
        assert!(matches!(result, Err(ProxyHeaderError::Missing)), "{result:?}");
        // Text that starts right and goes on too long.
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        let (result, _) = parse(long.as_bytes(), b"").await;
        assert!(matches!(result, Err(ProxyHeaderError::V1TooLong)), "{result:?}");
        // Right length, wrong words.
        let (result, _) = parse(b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", b"").await;
        assert!(matches!(result, Err(ProxyHeaderError::V1(_))), "{result:?}");
        // The v2 signature's first bytes, then something else.
        let mut broken = v2::PROTOCOL_PREFIX.to_vec();
        broken[8] = b'X';
        broken.extend([0x21, 0x11, 0, 12]);
        let (result, _) = parse(&broken, &[0; 12]).await;
        assert!(matches!(result, Err(ProxyHeaderError::Missing)), "{result:?}");
        // A v2 header claiming a huge payload is refused before it is read.
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        let (result, _) = parse(&huge, b"").await;
        assert!(matches!(result, Err(ProxyHeaderError::V2TooLong(65535))), "{result:?}");
        // Version 1 of the binary form, a bad command, a short address block.
        let mut bad_version = v2_proxy("192.0.2.9:1", "127.0.0.1:2");
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version, b"").await.0, Err(ProxyHeaderError::V2(_))));
        let mut short = v2::PROTOCOL_PREFIX.to_vec();
        short.extend([0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(matches!(parse(&short, b"").await.0, Err(ProxyHeaderError::V2(_))));
        // UDP and UNIX sources are not clients of a TCP listener.
        let source: SocketAddr = "192.0.2.9:1".parse().unwrap();
        let udp = Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Datagram,
            (source, "127.0.0.1:2".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        assert!(matches!(parse(&udp, b"").await.0, Err(ProxyHeaderError::Unsupported(_))));
    }

    #[tokio::test]
    async fn a_connection_closed_midway_is_a_disconnect() {
        let header = v2_proxy("192.0.2.9:40000", "127.0.0.1:1080");
        let (result, _) = parse(&header[..20], b"").await;
        assert!(result.unwrap_err().is_disconnect());
        let (result, _) = parse(b"PROXY TCP4 192.0.2.9", b"").await;
        assert!(result.unwrap_err().is_disconnect());
    }

    /// A header dripped a byte at a time is read whole when it arrives in time, and abandoned by
    /// the caller's timeout when it does not (the handshake timeout bounds it in the server).
    #[tokio::test]
    async fn slow_drip_is_read_in_time_and_cut_by_the_timeout() {
        let header = v2_proxy("192.0.2.9:40000", "127.0.0.1:1080");
        let (mut near, mut far) = tcp_pair().await;
        let sender = {
            let header = header.clone();
            tokio::spawn(async move {
                for byte in header {
                    near.write_all(&[byte]).await.unwrap();
                    tokio::task::yield_now().await;
                }
                near
            })
        };
        let read = tokio::time::timeout(Duration::from_secs(10), read_header(&mut far)).await;
        assert_eq!(
            read.unwrap().unwrap(),
            ProxiedSource::Client("192.0.2.9:40000".parse().unwrap())
        );
        let _near = sender.await.unwrap();

        let (mut near, mut far) = tcp_pair().await;
        near.write_all(&header[..10]).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(100), read_header(&mut far)).await;
        assert!(read.is_err(), "half a header never completes: {read:?}");
        drop(near);
    }

    #[test]
    fn trust_is_by_network_and_mapped_addresses_count_as_ipv4() {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(is_trusted(&trusted, "127.0.0.5".parse().unwrap()));
        assert!(is_trusted(&trusted, "::1".parse().unwrap()));
        assert!(is_trusted(&trusted, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_trusted(&trusted, "192.0.2.1".parse().unwrap()));
        assert!(!is_trusted(&[], "127.0.0.1".parse().unwrap()));
    }
}
