//! Parsing of addresses given on the command line, and the one safety rule of this harness:
//! traffic goes only to loopback and to the delay line's benchmarking range 198.18.0.0/15.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// True for addresses the harness may send traffic to.
pub fn is_allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || in_benchmark_range(v4),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// 198.18.0.0/15 (RFC 2544): never routed anywhere, so a mistake cannot reach a real host.
fn in_benchmark_range(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    a == 198 && (b == 18 || b == 19)
}

/// Parses one `IP:PORT` and refuses anything outside the allowed ranges.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.trim().parse().map_err(|e| format!("bad address {text:?}: {e}"))?;
    if !is_allowed(addr.ip()) {
        return Err(format!(
            "{addr} is not loopback or in 198.18.0.0/15; this harness only targets those"
        ));
    }
    Ok(addr)
}

/// Largest destination set one spec may expand to (a typo should not allocate gigabytes).
const MAX_SET: usize = 1 << 20;

/// Parses a destination set: a comma-separated list whose items are `IP:PORT`,
/// `IP:FIRST-LAST` (a port range, e.g. `127.0.0.1:20000-20999` for 1,000 destinations), or an
/// IPv4 address range with a port or port range, `FIRST_IP-LAST_IP:PORTS` (e.g.
/// `127.1.0.1-127.1.9.196:12000-12003`: 2,500 loopback addresses on 4 ports, 10,000
/// destinations, without running out of ports). Every address is checked by [`parse_addr`].
pub fn parse_set(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (host, ports) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("bad destination {item:?}: expected IP:PORT or IP:A-B"))?;
        let (first_port, last_port) = match ports.split_once('-') {
            Some((first, last)) => {
                let first: u16 =
                    first.parse().map_err(|e| format!("bad first port in {item:?}: {e}"))?;
                let last: u16 =
                    last.parse().map_err(|e| format!("bad last port in {item:?}: {e}"))?;
                (first, last)
            }
            None => {
                let port: u16 = ports.parse().map_err(|e| format!("bad port in {item:?}: {e}"))?;
                (port, port)
            }
        };
        if first_port > last_port {
            return Err(format!("empty port range in {item:?}"));
        }
        let hosts: Vec<String> = match host.split_once('-') {
            // An IPv6 literal is bracketed and has no '-', so this is an IPv4 range.
            Some((first, last)) if !host.starts_with('[') => {
                let first: Ipv4Addr =
                    first.parse().map_err(|e| format!("bad first address in {item:?}: {e}"))?;
                let last: Ipv4Addr =
                    last.parse().map_err(|e| format!("bad last address in {item:?}: {e}"))?;
                let (first, last) = (u32::from(first), u32::from(last));
                if first > last {
                    return Err(format!("empty address range in {item:?}"));
                }
                (first..=last).map(|ip| Ipv4Addr::from(ip).to_string()).collect()
            }
            _ => vec![host.to_string()],
        };
        let count = hosts.len() * (usize::from(last_port - first_port) + 1);
        if out.len() + count > MAX_SET {
            return Err(format!("{item:?} expands to more than {MAX_SET} destinations"));
        }
        for host in &hosts {
            for port in first_port..=last_port {
                out.push(parse_addr(&format!("{host}:{port}"))?);
            }
        }
    }
    if out.is_empty() {
        return Err("no destination given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_expand_and_foreign_addresses_are_refused() {
        let set = parse_set("127.0.0.1:10-12,198.18.1.1:80").expect("valid set");
        assert_eq!(set.len(), 4);
        assert!(parse_set("10.0.0.1:80").is_err());
        assert!(parse_set("198.20.0.1:80").is_err());
        assert!(parse_set("127.0.0.1:12-10").is_err());
        assert!(parse_set("[::1]:80").is_ok());
    }

    #[test]
    fn address_ranges_expand_and_stay_inside_the_allowed_ranges() {
        let set = parse_set("127.1.0.254-127.1.1.1:12000-12003").expect("valid set");
        assert_eq!(set.len(), 16);
        assert_eq!(set[0], "127.1.0.254:12000".parse().expect("addr"));
        assert_eq!(set[4], "127.1.0.255:12000".parse().expect("addr"));
        assert_eq!(set[15], "127.1.1.1:12003".parse().expect("addr"));
        assert_eq!(parse_set("127.1.0.1-127.1.9.196:12000-12003").expect("10k").len(), 10_000);
        // A range that leaves loopback is refused, not truncated.
        assert!(parse_set("127.255.255.255-128.0.0.1:80").is_err());
        assert!(parse_set("127.0.0.2-127.0.0.1:80").is_err());
        assert!(parse_set("127.0.0.0-127.255.255.255:1-65535").is_err());
    }
}
