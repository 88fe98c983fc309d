//! The UDP request header of RFC 1928 section 7, which prefixes every datagram between a client
//! and its UDP relay: `RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA`.
//!
//! Datagrams arrive whole, so this codec works on byte slices rather than async readers:
//! [`UdpDatagram::parse`] borrows the payload from the received buffer, and the `write_*`
//! functions encode a header without allocating.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{TargetAddr, ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6};

/// The longest header: RSV, FRAG, ATYP, a 255-byte name with its length byte, and the port.
pub const UDP_HEADER_MAX: usize = 4 + 1 + 255 + 2;
/// The longest header naming an IP address (IPv6): what a reply to a client needs.
pub const UDP_IP_HEADER_MAX: usize = 4 + 16 + 2;
/// The largest UDP payload IPv4 can carry (65,535 - 20 - 8).
pub const UDP_PAYLOAD_MAX: usize = 65_507;

/// Why bytes are not a UDP request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UdpHeaderError {
    #[error("datagram too short for its header ({0} bytes)")]
    Truncated(usize),
    #[error("address type {0:#04x} not supported")]
    AddressTypeNotSupported(u8),
    #[error("domain name is empty")]
    EmptyDomain,
    #[error("domain name is not valid UTF-8")]
    DomainNotUtf8,
    #[error("reserved field is {0:#06x}, not 0")]
    ReservedNotZero(u16),
}

/// One datagram from a client: where it goes, its fragment number and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// 0 for a standalone datagram; anything else is a fragment (poolsocks drops those).
    pub frag: u8,
    pub target: TargetAddr,
    pub payload: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    /// Parses a whole datagram. RSV must be zero (RFC 1928 section 7).
    pub fn parse(datagram: &'a [u8]) -> Result<Self, UdpHeaderError> {
        let truncated = || UdpHeaderError::Truncated(datagram.len());
        let (&[rsv_high, rsv_low, frag, atyp], rest) = split(datagram, 4).ok_or_else(truncated)?
        else {
            return Err(truncated());
        };
        let reserved = u16::from_be_bytes([rsv_high, rsv_low]);
        if reserved != 0 {
            return Err(UdpHeaderError::ReservedNotZero(reserved));
        }
        let (target, payload) = match atyp {
            ATYP_IPV4 => {
                let (addr, rest) = split(rest, 4).ok_or_else(truncated)?;
                let (port, rest) = port(rest).ok_or_else(truncated)?;
                let mut octets = [0u8; 4];
                octets.copy_from_slice(addr);
                (TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(octets).into(), port)), rest)
            }
            ATYP_IPV6 => {
                let (addr, rest) = split(rest, 16).ok_or_else(truncated)?;
                let (port, rest) = port(rest).ok_or_else(truncated)?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(addr);
                (TargetAddr::Ip(SocketAddr::new(Ipv6Addr::from(octets).into(), port)), rest)
            }
            ATYP_DOMAIN => {
                let (&[len], rest) = split(rest, 1).ok_or_else(truncated)? else {
                    return Err(truncated());
                };
                if len == 0 {
                    return Err(UdpHeaderError::EmptyDomain);
                }
                let (name, rest) = split(rest, usize::from(len)).ok_or_else(truncated)?;
                let (port, rest) = port(rest).ok_or_else(truncated)?;
                let name = std::str::from_utf8(name).map_err(|_| UdpHeaderError::DomainNotUtf8)?;
                (TargetAddr::Domain(name.to_string(), port), rest)
            }
            other => return Err(UdpHeaderError::AddressTypeNotSupported(other)),
        };
        Ok(UdpDatagram { frag, target, payload })
    }

    /// Appends the whole datagram (header with RSV zero, then the payload) to `buf`.
    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&[0, 0, self.frag]);
        self.target.write_to(buf);
        buf.extend_from_slice(self.payload);
    }
}

fn split(bytes: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= at).then(|| bytes.split_at(at))
}

fn port(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let (port, rest) = split(bytes, 2)?;
    Some((u16::from_be_bytes([port[0], port[1]]), rest))
}

/// The length of the header naming `source` (10 for IPv4, 22 for IPv6).
pub fn ip_header_len(source: &SocketAddr) -> usize {
    match source {
        SocketAddr::V4(_) => 4 + 4 + 2,
        SocketAddr::V6(_) => 4 + 16 + 2,
    }
}

/// Writes the header naming `source` (FRAG 0) into the last [`ip_header_len`] bytes of
/// `room`, so a payload received right behind `room` becomes a whole datagram without a copy.
/// Returns the index in `room` where the header starts; `None` when `room` is too short.
pub fn write_ip_header_before(room: &mut [u8], source: &SocketAddr) -> Option<usize> {
    let len = ip_header_len(source);
    let start = room.len().checked_sub(len)?;
    let header = &mut room[start..];
    header[..3].copy_from_slice(&[0, 0, 0]);
    match source.ip() {
        IpAddr::V4(ip) => {
            header[3] = ATYP_IPV4;
            header[4..8].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            header[3] = ATYP_IPV6;
            header[4..20].copy_from_slice(&ip.octets());
        }
    }
    header[len - 2..].copy_from_slice(&source.port().to_be_bytes());
    Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_address_type_and_borrows_the_payload() {
        let v4 = [0, 0, 0, 1, 192, 0, 2, 1, 0x1f, 0x90, b'h', b'i'];
        let parsed = UdpDatagram::parse(&v4).unwrap();
        assert_eq!(parsed.target, TargetAddr::Ip("192.0.2.1:8080".parse().unwrap()));
        assert_eq!((parsed.frag, parsed.payload), (0, &b"hi"[..]));

        let mut named = vec![0, 0, 3, 3, 4];
        named.extend_from_slice(b"a.bc");
        named.extend_from_slice(&[0, 53]);
        let parsed = UdpDatagram::parse(&named).unwrap();
        assert_eq!(parsed.target, TargetAddr::Domain("a.bc".into(), 53));
        assert_eq!((parsed.frag, parsed.payload), (3, &b""[..]));

        let mut wire = Vec::new();
        UdpDatagram {
            frag: 0,
            target: "[::1]:7".parse::<SocketAddr>().unwrap().into(),
            payload: b"x",
        }
        .write_to(&mut wire);
        assert_eq!(wire.len(), 22 + 1);
        assert_eq!(UdpDatagram::parse(&wire).unwrap().payload, b"x");
    }

    #[test]
    fn bad_headers_get_typed_errors() {
        assert_eq!(UdpDatagram::parse(&[0, 0, 0]), Err(UdpHeaderError::Truncated(3)));
        assert_eq!(
            UdpDatagram::parse(&[0, 1, 0, 1, 127, 0, 0, 1, 0, 53]),
            Err(UdpHeaderError::ReservedNotZero(1))
        );
        assert_eq!(UdpDatagram::parse(&[0, 0, 0, 1, 1, 2]), Err(UdpHeaderError::Truncated(6)));
        assert_eq!(
            UdpDatagram::parse(&[0, 0, 0, 9, 1, 2, 3, 4, 0, 1]),
            Err(UdpHeaderError::AddressTypeNotSupported(9))
        );
        assert_eq!(UdpDatagram::parse(&[0, 0, 0, 3, 0, 0, 1]), Err(UdpHeaderError::EmptyDomain));
        assert_eq!(
            UdpDatagram::parse(&[0, 0, 0, 3, 1, 0xff, 0, 1]),
            Err(UdpHeaderError::DomainNotUtf8)
        );
    }

    #[test]
    fn a_reply_header_lands_right_before_the_payload() {
        let source: SocketAddr = "198.51.100.7:4242".parse().unwrap();
        let mut buf = [0xaau8; UDP_IP_HEADER_MAX + 3];
        buf[UDP_IP_HEADER_MAX..].copy_from_slice(b"abc");
        let start = write_ip_header_before(&mut buf[..UDP_IP_HEADER_MAX], &source).unwrap();
        let parsed = UdpDatagram::parse(&buf[start..]).unwrap();
        assert_eq!(parsed.target, TargetAddr::Ip(source));
        assert_eq!((parsed.frag, parsed.payload), (0, &b"abc"[..]));
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(write_ip_header_before(&mut buf[..UDP_IP_HEADER_MAX], &v6), Some(0));
        assert_eq!(write_ip_header_before(&mut buf[..5], &source), None);
    }
}
