//! poolsocks: a SOCKS5 proxy daemon whose upstream connection pool is a set of actors.

pub mod access;
pub mod address_selection;
pub mod config;
pub mod descriptors;
pub mod eyeballs;
pub mod hosts;
pub mod logsafe;
pub mod memory;
pub mod pool;
pub mod resolve;
pub mod secret;
pub mod server;
pub mod socks;
pub mod stats;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod throttle;
pub mod upstream;
