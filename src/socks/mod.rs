//! SOCKS5 (RFC 1928) and username/password authentication (RFC 1929) as typed messages.
//!
//! Each message reads itself from an async reader (`read_from`) and encodes itself into a
//! buffer (`write_to`), so the server, test clients and the load generator share one codec.
//! UDP datagrams arrive whole, so their header codec ([`UdpDatagram`]) parses byte slices.

mod addr;
mod error;
mod messages;
mod udp;

pub use addr::TargetAddr;
pub use error::SocksError;
pub use messages::{
    Command, Greeting, MethodSelection, Reply, ReplyCode, Request, UserPassReply, UserPassRequest,
};
pub use udp::{
    ip_header_len, write_ip_header_before, UdpDatagram, UdpHeaderError, UDP_HEADER_MAX,
    UDP_IP_HEADER_MAX, UDP_PAYLOAD_MAX,
};

pub const SOCKS_VERSION: u8 = 0x05;
pub const USERPASS_VERSION: u8 = 0x01;

pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_USERPASS: u8 = 0x02;
pub const METHOD_NO_ACCEPTABLE: u8 = 0xff;

pub const ATYP_IPV4: u8 = 0x01;
pub const ATYP_DOMAIN: u8 = 0x03;
pub const ATYP_IPV6: u8 = 0x04;
