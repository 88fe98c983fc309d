//! Destination names of one UDP association: a small cache of answers, and the lookups in
//! flight with the few datagrams that wait for them. Both are bounded, whatever the client
//! sends.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::address_selection::MAX_SORTED;
use crate::resolve::{ResolveError, Resolver};
use crate::upstream::BoxFuture;

/// Names remembered per association.
pub const CACHE_ENTRIES: usize = 64;
/// How long an answer is used before the resolver is asked again (the resolver has its own
/// TTL-honouring cache behind this one; this one only spares a stream of datagrams the call).
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// How long a name that did not resolve is not asked again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Lookups in flight per association.
pub const MAX_LOOKUPS: usize = 4;
/// Payload bytes held for names being resolved, per association (one largest datagram).
pub const MAX_WAITING_BYTES: usize = 64 * 1024;

/// Puts the first of `addresses` that has a route (`has_route`, asked at `port`) first, and
/// those before it, which have none, last: an association sends to a name's first address
/// the access rules allow, and a resolver's order (a hosts file's, or an injected one's) may
/// lead with a family this host cannot reach, where datagrams would vanish. The order holds
/// while the answer is cached, so a name's datagrams keep one destination. Only the first
/// `MAX_SORTED` addresses are probed; with no route to any the order stays (the sends fail
/// and are counted).
pub fn routed_first(
    addresses: &mut [IpAddr],
    port: u16,
    mut has_route: impl FnMut(SocketAddr) -> bool,
) {
    let probed = addresses.len().min(MAX_SORTED);
    if let Some(first) = (0..probed).find(|&i| has_route(SocketAddr::new(addresses[i], port))) {
        addresses.rotate_left(first);
    }
}

/// The cache key of a name: lower case, without a trailing dot.
pub fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

struct Cached {
    /// The addresses, or `None` when the name did not resolve.
    addresses: Option<Vec<IpAddr>>,
    expires: Instant,
}

#[derive(Default)]
pub struct NameCache {
    entries: HashMap<String, Cached>,
}

/// What the cache knows of a name.
pub enum Known<'a> {
    Addresses(&'a [IpAddr]),
    Unresolvable,
    Unknown,
}

impl NameCache {
    pub fn get(&self, key: &str, now: Instant) -> Known<'_> {
        match self.entries.get(key) {
            Some(cached) if cached.expires > now => match &cached.addresses {
                Some(addresses) => Known::Addresses(addresses),
                None => Known::Unresolvable,
            },
            _ => Known::Unknown,
        }
    }

    pub fn insert(&mut self, key: String, addresses: Option<Vec<IpAddr>>, now: Instant) {
        if self.entries.len() >= CACHE_ENTRIES && !self.entries.contains_key(&key) {
            self.entries.retain(|_, cached| cached.expires > now);
            if self.entries.len() >= CACHE_ENTRIES {
                // Still full of live answers: forget the one closest to expiry.
                if let Some(oldest) =
                    self.entries.iter().min_by_key(|(_, c)| c.expires).map(|(k, _)| k.clone())
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        let ttl = if addresses.is_some() { CACHE_TTL } else { NEGATIVE_TTL };
        self.entries.insert(key, Cached { addresses, expires: now + ttl });
    }
}

/// A datagram held until its destination name resolves.
pub struct Waiting {
    pub name: String,
    pub port: u16,
    pub payload: Vec<u8>,
}

struct Lookup {
    key: String,
    future: BoxFuture<'static, Result<Vec<SocketAddr>, ResolveError>>,
    waiting: Vec<Waiting>,
}

/// Lookups in flight, each with the datagrams waiting for it.
#[derive(Default)]
pub struct Lookups {
    pending: Vec<Lookup>,
    waiting_bytes: usize,
}

/// A finished lookup: the key, the addresses (or the error) and the datagrams that waited.
pub struct Resolved {
    pub key: String,
    pub result: Result<Vec<IpAddr>, ResolveError>,
    pub waiting: Vec<Waiting>,
}

impl Lookups {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Holds `waiting` for `key`, starting a lookup unless one is in flight. `false` when the
    /// bounds are reached: the caller drops the datagram.
    pub fn hold(&mut self, resolver: &dyn Resolver, key: String, waiting: Waiting) -> bool {
        if self.waiting_bytes + waiting.payload.len() > MAX_WAITING_BYTES {
            return false;
        }
        let size = waiting.payload.len();
        if let Some(lookup) = self.pending.iter_mut().find(|l| l.key == key) {
            lookup.waiting.push(waiting);
        } else {
            if self.pending.len() >= MAX_LOOKUPS {
                return false;
            }
            // The port does not matter to the addresses; each datagram keeps its own.
            let future = resolver.lookup(&waiting.name, waiting.port);
            self.pending.push(Lookup { key, future, waiting: vec![waiting] });
        }
        self.waiting_bytes += size;
        true
    }

    /// Completes when a lookup finishes. Pending forever when none is in flight.
    #[cfg(test)]
    pub async fn next(&mut self) -> Resolved {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Ready with the first lookup that has finished.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Resolved> {
        let finished = self.pending.iter_mut().enumerate().find_map(|(index, lookup)| {
            match std::future::Future::poll(lookup.future.as_mut(), cx) {
                Poll::Ready(result) => Some((index, result)),
                Poll::Pending => None,
            }
        });
        let Some((index, result)) = finished else { return Poll::Pending };
        let lookup = self.pending.swap_remove(index);
        let held: usize = lookup.waiting.iter().map(|w| w.payload.len()).sum();
        self.waiting_bytes -= held;
        Poll::Ready(Resolved {
            key: lookup.key,
            result: result.map(|addrs| addrs.into_iter().map(|a| a.ip()).collect()),
            waiting: lookup.waiting,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::StaticResolver;

    #[tokio::test(start_paused = true)]
    async fn the_cache_answers_until_expiry_and_stays_bounded() {
        let mut cache = NameCache::default();
        let now = Instant::now();
        cache.insert("a.example".into(), Some(vec!["192.0.2.1".parse().unwrap()]), now);
        cache.insert("gone.example".into(), None, now);
        assert!(matches!(cache.get("a.example", now), Known::Addresses([_])));
        assert!(matches!(cache.get("gone.example", now), Known::Unresolvable));
        assert!(matches!(cache.get("gone.example", now + NEGATIVE_TTL), Known::Unknown));
        assert!(matches!(cache.get("a.example", now + CACHE_TTL), Known::Unknown));
        for i in 0..CACHE_ENTRIES * 3 {
            cache.insert(format!("n{i}.example"), None, now);
        }
        assert_eq!(cache.entries.len(), CACHE_ENTRIES);
    }

    #[test]
    fn the_first_routed_address_leads_and_the_unrouted_go_last() {
        let ips = |list: &[&str]| -> Vec<IpAddr> {
            list.iter().map(|ip| ip.parse().expect("ip")).collect()
        };
        let routed_v4 = |addr: SocketAddr| addr.is_ipv4();
        let mut answer = ips(&["2001:db8::1", "2001:db8::2", "192.0.2.1", "2001:db8::3"]);
        let mut asked = Vec::new();
        routed_first(&mut answer, 53, |addr| {
            asked.push(addr);
            routed_v4(addr)
        });
        assert_eq!(answer, ips(&["192.0.2.1", "2001:db8::3", "2001:db8::1", "2001:db8::2"]));
        assert_eq!(asked.len(), 3, "probes stop at the first routed address");
        assert_eq!(asked[0].port(), 53);
        let mut nowhere = ips(&["2001:db8::1", "2001:db8::2"]);
        routed_first(&mut nowhere, 53, routed_v4);
        assert_eq!(nowhere, ips(&["2001:db8::1", "2001:db8::2"]), "no route: the order stays");
    }

    #[tokio::test]
    async fn lookups_share_a_name_and_refuse_beyond_their_bounds() {
        let resolver = StaticResolver::new().with("a.example", ["192.0.2.1".parse().unwrap()]);
        let mut lookups = Lookups::default();
        let datagram =
            |name: &str, size| Waiting { name: name.into(), port: 53, payload: vec![0; size] };
        assert!(lookups.hold(&resolver, key("a.example"), datagram("a.example", 10)));
        assert!(lookups.hold(&resolver, key("A.example."), datagram("A.example.", 10)));
        assert_eq!(lookups.pending.len(), 1, "one lookup per name");
        assert!(!lookups.hold(
            &resolver,
            key("b.example"),
            datagram("b.example", MAX_WAITING_BYTES)
        ));
        for name in ["c.example", "d.example", "e.example"] {
            assert!(lookups.hold(&resolver, key(name), datagram(name, 1)));
        }
        assert!(!lookups.hold(&resolver, key("f.example"), datagram("f.example", 1)), "4 lookups");
        let mut done = Vec::new();
        while !lookups.is_empty() {
            done.push(lookups.next().await);
        }
        let a = done.iter().find(|r| r.key == "a.example").expect("a resolved");
        assert_eq!(a.waiting.len(), 2);
        assert_eq!(a.result.as_deref(), Ok(&["192.0.2.1".parse::<IpAddr>().unwrap()][..]));
        assert!(done.iter().filter(|r| r.key != "a.example").all(|r| r.result.is_err()));
        assert_eq!(lookups.waiting_bytes, 0);
    }
}
