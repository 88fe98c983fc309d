//! The poolsocks load harness: a closed-loop SOCKS5 load generator, bulk and idle-session modes,
//! a counting keep-alive HTTP upstream, UDP round trips through associations, a TUN delay line
//! and a report writer.

pub mod bulk;
pub mod client;
pub mod hold;
pub mod http;
pub mod limits;
pub mod report;
pub mod run;
pub mod stats;
pub mod targets;
pub mod tun;
pub mod udp;
pub mod upstream;
