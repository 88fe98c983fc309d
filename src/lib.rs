//! poolsocks: a SOCKS5 proxy daemon whose upstream connection pool is a set of actors.

pub mod secret;
pub mod socks;
pub mod upstream;
pub mod config;
