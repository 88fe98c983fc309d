//! How many BINDs may wait for their peer: each holds a listening port from the ephemeral
//! range, the same range every outgoing connection needs a port from. Without a bound, one
//! client's BINDs took every port of a 500-port range and every CONNECT then failed. So a
//! client (an address; an IPv6 /64) may hold [`PER_CLIENT`] waits, and all clients together a
//! quarter of the ephemeral range, at most [`TOTAL_MAX`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// BIND waits one client may hold at once (an FTP client needs one per transfer).
pub const PER_CLIENT: usize = 16;
/// BIND waits in all, whatever the ephemeral range.
pub const TOTAL_MAX: usize = 1024;
/// Linux's default ephemeral range (32768-60999), when it cannot be read.
const DEFAULT_EPHEMERAL_PORTS: usize = 28_232;

#[derive(Debug)]
pub struct BindWaits {
    per_client: usize,
    total: usize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    by_client: HashMap<IpAddr, usize>,
    total: usize,
}

/// One BIND's place, given back on drop.
#[derive(Debug)]
pub struct BindWait {
    waits: Arc<BindWaits>,
    client: IpAddr,
}

/// Why a BIND may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Client(usize),
    Total(usize),
}

impl BindWaits {
    /// Bounds from the ephemeral range this host uses.
    pub fn for_this_host() -> Arc<Self> {
        let total = (ephemeral_ports() / 4).clamp(1, TOTAL_MAX);
        Self::new(PER_CLIENT.min(total), total)
    }

    pub fn new(per_client: usize, total: usize) -> Arc<Self> {
        Arc::new(BindWaits { per_client, total, held: Mutex::default() })
    }

    /// A place for a BIND from `client`, or why there is none.
    pub fn try_begin(self: &Arc<Self>, client: IpAddr) -> Result<BindWait, Full> {
        let client = source_of(client);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.total >= self.total {
            return Err(Full::Total(self.total));
        }
        let mine = held.by_client.entry(client).or_default();
        if *mine >= self.per_client {
            return Err(Full::Client(self.per_client));
        }
        *mine += 1;
        held.total += 1;
        Ok(BindWait { waits: self.clone(), client })
    }
}

impl Drop for BindWait {
    fn drop(&mut self) {
        let mut held = self.waits.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(1);
        if let Some(mine) = held.by_client.get_mut(&self.client) {
            *mine -= 1;
            if *mine == 0 {
                held.by_client.remove(&self.client);
            }
        }
    }
}

/// A client is its address, or its /64 for IPv6 (what one host or small site is given).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Ports in `net.ipv4.ip_local_port_range`.
fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<usize>().ok());
            let (low, high) = (bounds.next()??, bounds.next()??);
            Some(high.saturating_sub(low) + 1)
        })
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_per_client_and_in_all_and_given_back_on_drop() {
        let waits = BindWaits::new(2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = waits.try_begin(a).expect("first");
        let _second = waits.try_begin(a).expect("second");
        assert_eq!(waits.try_begin(a).unwrap_err(), Full::Client(2));
        let _third = waits.try_begin(b).expect("another client");
        assert_eq!(waits.try_begin(b).unwrap_err(), Full::Total(3));
        drop(first);
        assert!(waits.try_begin(b).is_ok(), "a place came back");
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let waits = BindWaits::new(1, 10);
        let _held = waits.try_begin(v6("2001:db8::1")).expect("first of the /64");
        assert!(waits.try_begin(v6("2001:db8::2")).is_err(), "the same /64");
        assert!(waits.try_begin(v6("2001:db8:0:1::1")).is_ok(), "another /64");
        assert!(BindWaits::for_this_host().total >= 1);
    }
}
