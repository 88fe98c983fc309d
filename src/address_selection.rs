//! Which of a name's addresses comes first: destination address selection as the system's
//! resolver does it (RFC 6724), kept to the rules that matter for a proxy.
//!
//! Each destination is paired with the source address the kernel would use for it, which a
//! UDP `connect(2)` on a throwaway socket tells without sending anything (it only consults
//! the routing table). Then, most important first:
//! 1. a destination with no route comes last (rule 1);
//! 2. one whose source has the same scope comes first (rule 2);
//! 3. one whose source has the same label in the default policy table comes first (rule 5):
//!    a global IPv6 destination reached from a unique-local or link-local source (a host
//!    without global IPv6) goes behind IPv4;
//! 4. higher precedence in the default policy table comes first (rule 6): `::1`, then
//!    native IPv6, then IPv4, then 6to4, Teredo and unique-local IPv6;
//! 5. smaller scope comes first (rule 8);
//!
//! otherwise the answer's order stays (rule 10). Left out: deprecated and home addresses
//! and native transport (rules 3, 4, 7: the kernel does not say), and longest matching
//! prefix (rule 9, which glibc also restricts). So IPv6 leads only where this host has a
//! global IPv6 source and a route for it.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Addresses probed and sorted per answer; any beyond keep their order after them, so an
/// answer with thousands of records costs no more than this many probes.
pub const MAX_SORTED: usize = 16;

/// The source address the kernel would send from to `destination`, or `None` when it has
/// no route there (or no socket could be had to ask).
pub fn source_for(destination: SocketAddr) -> Option<IpAddr> {
    use socket2::{Domain, Protocol, Socket, Type};
    let ip = destination.ip().to_canonical();
    // Port 0 is not a destination connect(2) accepts everywhere; any other port routes alike.
    let port = if destination.port() == 0 { 9 } else { destination.port() };
    let destination = SocketAddr::new(ip, port);
    let socket =
        Socket::new(Domain::for_address(destination), Type::DGRAM, Some(Protocol::UDP)).ok()?;
    socket.connect(&destination.into()).ok()?;
    socket.local_addr().ok()?.as_socket().map(|local| local.ip())
}

/// Whether the kernel has a route to `destination`.
pub fn has_route(destination: SocketAddr) -> bool {
    source_for(destination).is_some()
}

/// Sorts `addresses` as described above, asking the kernel for each one's source.
pub fn sort(addresses: &mut [SocketAddr]) {
    sort_with(addresses, source_for);
}

/// [`sort`] with the sources from `source` (tests give a fake routing table).
pub fn sort_with(
    addresses: &mut [SocketAddr],
    mut source: impl FnMut(SocketAddr) -> Option<IpAddr>,
) {
    if addresses.len() < 2 {
        return;
    }
    let sorted = addresses.len().min(MAX_SORTED);
    let mut keyed: Vec<(Key, SocketAddr)> =
        addresses[..sorted].iter().map(|&addr| (key(addr.ip(), source(addr)), addr)).collect();
    // Stable: equal keys keep the answer's order (rule 10).
    keyed.sort_by_key(|(key, _)| *key);
    for (slot, (_, addr)) in addresses.iter_mut().zip(keyed) {
        *slot = addr;
    }
}

/// What the rules compare, in their order; smaller sorts first.
type Key = (bool, bool, bool, Reverse<u8>, u8);

fn key(destination: IpAddr, source: Option<IpAddr>) -> Key {
    let destination = destination.to_canonical();
    let (precedence, label) = policy(destination);
    let scope = scope(destination);
    match source {
        None => (true, true, true, Reverse(precedence), scope),
        Some(source) => {
            let source = source.to_canonical();
            (
                false,
                self::scope(source) != scope,
                policy(source).1 != label,
                Reverse(precedence),
                scope,
            )
        }
    }
}

/// Precedence and label from RFC 6724's default policy table (section 2.1).
fn policy(ip: IpAddr) -> (u8, u8) {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let segments = v6.segments();
    let bits = u128::from(v6);
    if v6 == Ipv6Addr::LOCALHOST {
        (50, 0)
    } else if bits >> 32 == 0xffff {
        (35, 4) // ::ffff:0:0/96, IPv4
    } else if bits >> 32 == 0 {
        (1, 3) // ::/96, IPv4-compatible
    } else if segments[0] == 0x2001 && segments[1] == 0 {
        (5, 5) // 2001::/32, Teredo
    } else if segments[0] == 0x2002 {
        (30, 2) // 2002::/16, 6to4
    } else if segments[0] == 0x3ffe {
        (1, 12) // 3ffe::/16, 6bone
    } else if segments[0] & 0xffc0 == 0xfec0 {
        (1, 11) // fec0::/10, site-local
    } else if segments[0] & 0xfe00 == 0xfc00 {
        (3, 13) // fc00::/7, unique-local
    } else {
        (40, 1)
    }
}

/// Scope (RFC 6724 section 3.1, RFC 4007): 2 link-local, 5 site-local, 14 global. IPv4
/// loopback and link-local addresses are link-local; private IPv4 addresses are global.
fn scope(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() || v4.is_link_local() => 2,
        IpAddr::V4(_) => 14,
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_multicast() {
                (first & 0x000f) as u8
            } else if v6.is_loopback() || first & 0xffc0 == 0xfe80 {
                2
            } else if first & 0xffc0 == 0xfec0 {
                5
            } else {
                14
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|ip| SocketAddr::new(ip.parse().expect("ip"), 80)).collect()
    }

    /// A fake routing table: IPv4 from 192.0.2.2, loopback from loopback, IPv6 from `v6`
    /// (none when `None`).
    fn host(v6: Option<&'static str>) -> impl FnMut(SocketAddr) -> Option<IpAddr> {
        move |addr: SocketAddr| match addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() => Some(addr.ip()),
            IpAddr::V4(_) => Some("192.0.2.2".parse().expect("ip")),
            IpAddr::V6(v6addr) if v6addr.is_loopback() => Some(addr.ip()),
            IpAddr::V6(_) => v6.map(|ip| ip.parse().expect("ip")),
        }
    }

    fn sorted(list: &[&str], v6: Option<&'static str>) -> Vec<SocketAddr> {
        let mut addresses = addrs(list);
        sort_with(&mut addresses, host(v6));
        addresses
    }

    #[test]
    fn ipv6_leads_only_with_a_global_ipv6_source() {
        let answer = ["2001:db8::1", "192.0.2.10", "2001:db8::2", "198.51.100.1"];
        assert_eq!(
            sorted(&answer, Some("2001:db8:ffff::2")),
            addrs(&["2001:db8::1", "2001:db8::2", "192.0.2.10", "198.51.100.1"])
        );
        // A unique-local source (this host's kind: fd00::2 and a default route) does not
        // carry global IPv6: IPv4 first, as glibc orders it.
        assert_eq!(
            sorted(&answer, Some("fd00::2")),
            addrs(&["192.0.2.10", "198.51.100.1", "2001:db8::1", "2001:db8::2"])
        );
        // No IPv6 route at all: IPv6 last.
        assert_eq!(
            sorted(&answer, None),
            addrs(&["192.0.2.10", "198.51.100.1", "2001:db8::1", "2001:db8::2"])
        );
    }

    #[test]
    fn loopback_orders_as_the_policy_table_says_and_equal_keys_keep_their_order() {
        assert_eq!(sorted(&["127.0.0.1", "::1"], None), addrs(&["::1", "127.0.0.1"]));
        assert_eq!(
            sorted(&["198.51.100.2", "192.0.2.1"], None),
            addrs(&["198.51.100.2", "192.0.2.1"])
        );
        // A unique-local destination ranks below IPv4 even from a unique-local source.
        assert_eq!(
            sorted(&["fd00::5", "192.0.2.1"], Some("fd00::2")),
            addrs(&["192.0.2.1", "fd00::5"])
        );
    }

    #[test]
    fn only_the_first_addresses_are_probed() {
        let mut addresses: Vec<SocketAddr> =
            (0..40u8).map(|i| SocketAddr::new(IpAddr::from([192, 0, 2, i]), 80)).collect();
        let mut probes = 0;
        sort_with(&mut addresses, |_| {
            probes += 1;
            None
        });
        assert_eq!(probes, MAX_SORTED);
    }

    #[test]
    fn the_kernel_knows_a_route_to_loopback() {
        let source = source_for("127.0.0.1:0".parse().expect("addr"));
        assert_eq!(source, Some("127.0.0.1".parse().expect("ip")));
        assert!(has_route("127.0.0.1:53".parse().expect("addr")));
    }
}
