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

/// Parses a destination set: a comma-separated list whose items are `IP:PORT` or
/// `IP:FIRST-LAST` (a port range, e.g. `127.0.0.1:20000-20999` for 1,000 destinations).
pub fn parse_set(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (host, ports) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("bad destination {item:?}: expected IP:PORT or IP:A-B"))?;
        if let Some((first, last)) = ports.split_once('-') {
            let first: u16 =
                first.parse().map_err(|e| format!("bad first port in {item:?}: {e}"))?;
            let last: u16 = last.parse().map_err(|e| format!("bad last port in {item:?}: {e}"))?;
            if first > last {
                return Err(format!("empty port range in {item:?}"));
            }
            for port in first..=last {
                out.push(parse_addr(&format!("{host}:{port}"))?);
            }
        } else {
            out.push(parse_addr(item)?);
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
}
