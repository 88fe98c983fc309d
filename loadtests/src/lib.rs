//! The poolsocks load harness: a closed-loop SOCKS5 load generator, bulk and idle-session modes,
//! a counting keep-alive HTTP upstream, UDP round trips through associations, a TUN delay line,
//! a report writer, and two baseline proxies (`minirelay`, `fixedpool`).

pub mod baseline;
pub mod bulk;
pub mod client;
pub mod cpu;
pub mod fixedpool;
pub mod hold;
pub mod http;
pub mod limits;
pub mod report;
pub mod run;
pub mod stats;
pub mod strace;
pub mod targets;
pub mod timeline;
pub mod tun;
pub mod udp;
pub mod upstream;
