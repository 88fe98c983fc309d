//! The destination of a CONNECT request, as the client named it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::SocksError;
use super::{ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6};
use crate::logsafe::Escaped;

/// A destination exactly as the client asked for it. It doubles as the pool key, so a pool hit
/// for a domain skips DNS resolution too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetAddr {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl TargetAddr {
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(addr) => addr.port(),
            TargetAddr::Domain(_, port) => *port,
        }
    }

    /// Reads ATYP, the address and the port (the tail shared by requests and replies).
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let atyp = reader.read_u8().await?;
        match atyp {
            ATYP_IPV4 => {
                let mut octets = [0u8; 4];
                reader.read_exact(&mut octets).await?;
                let port = reader.read_u16().await?;
                Ok(TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(octets).into(), port)))
            }
            ATYP_IPV6 => {
                let mut octets = [0u8; 16];
                reader.read_exact(&mut octets).await?;
                let port = reader.read_u16().await?;
                Ok(TargetAddr::Ip(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
            }
            ATYP_DOMAIN => {
                let len = reader.read_u8().await? as usize;
                if len == 0 {
                    return Err(SocksError::EmptyDomain);
                }
                let mut name = vec![0u8; len];
                reader.read_exact(&mut name).await?;
                let port = reader.read_u16().await?;
                let name = String::from_utf8(name).map_err(|_| SocksError::DomainNotUtf8)?;
                Ok(TargetAddr::Domain(name, port))
            }
            other => Err(SocksError::AddressTypeNotSupported(other)),
        }
    }

    /// Appends ATYP, address and port in wire form.
    pub fn write_to(&self, buf: &mut Vec<u8>) {
        match self {
            TargetAddr::Ip(SocketAddr::V4(addr)) => {
                buf.push(ATYP_IPV4);
                buf.extend_from_slice(&addr.ip().octets());
                buf.extend_from_slice(&addr.port().to_be_bytes());
            }
            TargetAddr::Ip(SocketAddr::V6(addr)) => {
                buf.push(ATYP_IPV6);
                buf.extend_from_slice(&addr.ip().octets());
                buf.extend_from_slice(&addr.port().to_be_bytes());
            }
            TargetAddr::Domain(name, port) => {
                // A name longer than 255 bytes cannot be encoded; it never comes off the wire.
                let bytes = &name.as_bytes()[..name.len().min(255)];
                buf.push(ATYP_DOMAIN);
                buf.push(bytes.len() as u8);
                buf.extend_from_slice(bytes);
                buf.extend_from_slice(&port.to_be_bytes());
            }
        }
    }

    /// The unspecified IPv4 address, for replies that carry no meaningful bound address.
    pub fn unspecified() -> Self {
        TargetAddr::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
    }
}

impl From<SocketAddr> for TargetAddr {
    fn from(addr: SocketAddr) -> Self {
        TargetAddr::Ip(addr)
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(addr) => write!(f, "{addr}"),
            // A name is whatever a client sent: escaped, so it cannot forge a log line.
            TargetAddr::Domain(name, port) => write!(f, "{}:{port}", Escaped(name)),
        }
    }
}
