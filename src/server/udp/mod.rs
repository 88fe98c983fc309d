//! UDP ASSOCIATE (RFC 1928 sections 4, 6 and 7): one association per control connection.
//!
//! An association owns a relay socket, bound on the address the client reached the listener
//! on (or `udp_bind_address`) and named in the reply, and at most one outbound socket per
//! address family, bound to the unspecified address, through which it talks to every
//! destination. It runs inside the client's own task (so it holds the client's
//! `max_connections` slot) until the control connection closes, no datagram moved either way
//! for `udp_idle_timeout_secs`, or the server cuts it at shutdown.
//!
//! Rules, in the order they are applied:
//! - client side: datagrams are accepted only from the control connection's peer address (and
//!   from DST.PORT of the request when it is not 0); the first accepted datagram pins the
//!   client's port, and anything from elsewhere is dropped (`foreign_source`). A header that
//!   does not parse is `malformed`, FRAG other than 0 is `fragment`, a payload over 65,507
//!   bytes is `too_large`.
//! - destinations: names are resolved through the server's [`Resolver`] with a small cache per
//!   association; the first of a name's addresses that has a route leads while the answer is
//!   cached (`names::routed_first`: a datagram has no fallback, unlike a CONNECT's dial); the
//!   access rules judge the name before DNS and the address after, for every datagram, exactly
//!   as for CONNECT (`denied`, `unresolvable`).
//! - replies: a datagram at an outbound socket reaches the client wrapped in a header naming
//!   its sender, by default only when the association sent to that address and port before
//!   (`udp_reply_filter`), else it is `foreign_source`.
//! - nothing queues: a datagram is sent at once (a non-blocking `sendto`) and one that cannot be
//!   is dropped (`would_block`). The receive buffer is one per worker thread, not one per
//!   association, so an idle association holds no buffer.

mod names;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, MissedTickBehavior};

use tracing::{debug, info, warn};

use super::cut::SessionCut;
use super::handler::{HandlerContext, CATEGORY_ACCESS};
use super::metrics::DropReason;
use crate::address_selection;
use crate::config::UdpReplyFilter;
use crate::descriptors;
use crate::socks::{
    write_ip_header_before, Command, Reply, ReplyCode, TargetAddr, UdpDatagram, UDP_IP_HEADER_MAX,
    UDP_PAYLOAD_MAX,
};
use names::{Known, Lookups, NameCache, Resolved, Waiting};

/// What UDP ASSOCIATE needs from the config.
#[derive(Debug, Clone)]
pub struct UdpSettings {
    pub bind_address: Option<IpAddr>,
    pub idle_timeout: Duration,
    pub reply_filter: UdpReplyFilter,
}

/// Datagrams handled per socket readiness before the other sockets get a turn.
const BATCH: usize = 64;
/// Destinations remembered per association for the reply filter (oldest forgotten first): about
/// 25 KiB at most, whatever a client sprays.
const MAX_PEERS: usize = 256;
/// A denied datagram is logged at once, then at most once per this period per association,
/// with the count of those not logged.
const DENIED_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Receive buffer: room for a reply's header, then the largest UDP payload (IPv6: 65,527).
const BUFFER: usize = UDP_IP_HEADER_MAX + 65_536;

thread_local! {
    /// Every datagram is handled synchronously between one readiness and the next await, so
    /// a worker thread needs one buffer, whatever the number of associations.
    static BUFFER_OF_THREAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Serves a UDP ASSOCIATE whose request named `requested` (the client's own address, or zeros).
/// Sends the reply, then relays until the association ends.
pub(super) async fn associate(
    ctx: &HandlerContext,
    client: &mut TcpStream,
    peer: SocketAddr,
    requested: &TargetAddr,
    settings: &UdpSettings,
    cut: &mut SessionCut,
) {
    let local_ip = match client.local_addr() {
        Ok(local) => local.ip().to_canonical(),
        Err(e) => {
            debug!(error = %e, "client left before the association was set up");
            return;
        }
    };
    // The outbound sockets, one per family, come on top of the two every session has.
    let Some(_outbound_descriptors) = ctx.descriptors.try_take(descriptors::UDP_ASSOCIATION) else {
        ctx.metrics.udp.association_refused();
        let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
        return;
    };
    let bind_ip = settings.bind_address.unwrap_or(local_ip);
    let relay = match bind_udp(SocketAddr::new(bind_ip, 0)) {
        Ok(relay) => relay,
        Err(e) => {
            warn!(address = %bind_ip, error = %e, "cannot bind a UDP relay socket: reply 0x01");
            let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
            return;
        }
    };
    let bound = match relay.local_addr() {
        Ok(bound) => bound,
        Err(e) => {
            warn!(error = %e, "UDP relay socket has no address: reply 0x01");
            let _ = client.write_all(&Reply::failure(ReplyCode::GeneralFailure).to_bytes()).await;
            return;
        }
    };
    let reply = Reply { code: ReplyCode::Succeeded, bound: TargetAddr::Ip(bound) };
    if let Err(e) = client.write_all(&reply.to_bytes()).await {
        debug!(error = %e, "client left before the UDP ASSOCIATE reply");
        return;
    }

    let (expected_ip, expected_port) = expected_source(requested);
    let client_ip = peer.ip().to_canonical();
    if expected_ip.is_some_and(|ip| ip != client_ip) {
        // A client behind NAT names its private address; the control connection's address
        // is the stricter rule and holds either way.
        debug!(named = %requested, "UDP ASSOCIATE names another address than the client's: using the client's");
    }
    let metrics = &ctx.metrics;
    metrics.session_started(Command::UdpAssociate);
    metrics.udp.association_opened();
    debug!(relay = %bound, expect_port = ?expected_port, "UDP association open");

    let mut association = Association {
        ctx,
        settings,
        relay,
        client_ip,
        expected_port,
        client: None,
        outbound_v4: Outbound::default(),
        outbound_v6: Outbound::default(),
        peers: Peers::default(),
        names: NameCache::default(),
        lookups: Lookups::default(),
        denied_log: LogLimiter::default(),
        moved: 0,
        forwarded: 0,
        returned: 0,
    };
    let end = association.run(client, cut).await;
    let (forwarded, returned) = (association.forwarded, association.returned);
    // The sockets close here, before the control connection does: a client that sees the
    // control connection closed finds the relay port already free.
    drop(association);
    metrics.udp.association_closed();
    metrics.session_ended();
    match end {
        End::ControlClosed => debug!(forwarded, returned, "UDP association closed by the client"),
        End::ControlError(e) => {
            debug!(forwarded, returned, error = %e, "UDP association ended: control connection failed")
        }
        End::Idle => info!(
            forwarded,
            returned,
            timeout = ?settings.idle_timeout,
            "UDP association idle too long: closed"
        ),
        End::Cut => debug!(forwarded, returned, "UDP association cut at shutdown"),
        End::RelayError(e) => {
            warn!(forwarded, returned, error = %e, "UDP association ended: relay socket failed")
        }
    }
}

/// DST.ADDR and DST.PORT of the request, when not zeros: where the client will send from.
fn expected_source(requested: &TargetAddr) -> (Option<IpAddr>, Option<u16>) {
    let port = (requested.port() != 0).then_some(requested.port());
    let ip = match requested {
        TargetAddr::Ip(addr) if !addr.ip().is_unspecified() => Some(addr.ip().to_canonical()),
        // A name here (PySocks sends "0") says nothing about the address.
        _ => None,
    };
    (ip, port)
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        // One family per socket: IPv4 destinations get their own socket, so every sender is
        // seen (and named to the client) as what it is, never as a mapped address.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

enum End {
    ControlClosed,
    ControlError(io::Error),
    Idle,
    Cut,
    RelayError(io::Error),
}

/// An outbound socket of one family, created with the first datagram to that family.
#[derive(Default)]
struct Outbound {
    socket: Option<UdpSocket>,
    failed: bool,
}

impl Outbound {
    fn get(&mut self, unspecified: IpAddr) -> Option<&UdpSocket> {
        if self.socket.is_none() && !self.failed {
            match bind_udp(SocketAddr::new(unspecified, 0)) {
                Ok(socket) => self.socket = Some(socket),
                Err(e) => {
                    // Said once per association; its datagrams are counted as send errors.
                    warn!(family = %unspecified, error = %e, "cannot open an outbound UDP socket");
                    self.failed = true;
                }
            }
        }
        self.socket.as_ref()
    }
}

/// True when the outbound socket exists and has something (or an error) to read.
fn poll_outbound(outbound: &Outbound, cx: &mut Context<'_>) -> bool {
    outbound.socket.as_ref().is_some_and(|socket| socket.poll_recv_ready(cx).is_ready())
}

/// What one turn of the event loop found ready.
struct Ready {
    cut: bool,
    control: bool,
    relay: Option<io::Result<()>>,
    v4: bool,
    v6: bool,
    resolved: Option<Resolved>,
    tick: bool,
}

impl Ready {
    fn any(&self) -> bool {
        self.cut
            || self.control
            || self.relay.is_some()
            || self.v4
            || self.v6
            || self.resolved.is_some()
            || self.tick
    }
}

/// The destinations an association sent to, for the reply filter: bounded, oldest out first.
#[derive(Default)]
struct Peers {
    endpoints: HashSet<SocketAddr>,
    order: VecDeque<SocketAddr>,
    addresses: HashMap<IpAddr, usize>,
}

impl Peers {
    fn insert(&mut self, endpoint: SocketAddr) {
        if !self.endpoints.insert(endpoint) {
            return;
        }
        self.order.push_back(endpoint);
        *self.addresses.entry(endpoint.ip()).or_insert(0) += 1;
        if self.order.len() > MAX_PEERS {
            if let Some(oldest) = self.order.pop_front() {
                self.endpoints.remove(&oldest);
                if let Some(count) = self.addresses.get_mut(&oldest.ip()) {
                    *count -= 1;
                    if *count == 0 {
                        self.addresses.remove(&oldest.ip());
                    }
                }
            }
        }
    }

    fn admits(&self, sender: SocketAddr, filter: UdpReplyFilter) -> bool {
        match filter {
            UdpReplyFilter::AddressAndPort => self.endpoints.contains(&sender),
            UdpReplyFilter::Address => self.addresses.contains_key(&sender.ip()),
            UdpReplyFilter::Any => true,
        }
    }
}

/// Lets a message through at once, then once per period, counting what it held back.
#[derive(Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(held back since the last one)` when this occurrence may be reported.
    fn allow(&mut self, now: Instant, period: Duration) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct Association<'a> {
    ctx: &'a HandlerContext,
    settings: &'a UdpSettings,
    relay: UdpSocket,
    client_ip: IpAddr,
    expected_port: Option<u16>,
    /// The client's address once its first datagram came.
    client: Option<SocketAddr>,
    outbound_v4: Outbound,
    outbound_v6: Outbound,
    peers: Peers,
    names: NameCache,
    lookups: Lookups,
    denied_log: LogLimiter,
    /// Datagrams relayed either way, watched by the idle check.
    moved: u64,
    forwarded: u64,
    returned: u64,
}

/// Which outbound socket a datagram came in on.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Association<'_> {
    /// The event loop. Each turn polls every source once (readiness only: no future is built
    /// per turn, and each socket keeps one waker slot), then serves all that are ready, so a
    /// flood on one socket cannot starve the others.
    async fn run(&mut self, client: &mut TcpStream, cut: &mut SessionCut) -> End {
        let timeout = self.settings.idle_timeout;
        let step = (timeout / 4).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(Instant::now() + step, step);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_moved = self.moved;
        let mut quiet = Duration::ZERO;
        let mut control = [0u8; 512];
        loop {
            let ready = std::future::poll_fn(|cx| {
                let mut ready = Ready {
                    cut: cut.poll_cut(cx).is_ready(),
                    control: client.poll_read_ready(cx).is_ready(),
                    relay: match self.relay.poll_recv_ready(cx) {
                        Poll::Ready(Ok(())) => Some(Ok(())),
                        Poll::Ready(Err(e)) => Some(Err(e)),
                        Poll::Pending => None,
                    },
                    v4: poll_outbound(&self.outbound_v4, cx),
                    v6: poll_outbound(&self.outbound_v6, cx),
                    resolved: None,
                    tick: ticks.poll_tick(cx).is_ready(),
                };
                if !self.lookups.is_empty() {
                    if let Poll::Ready(resolved) = self.lookups.poll_next(cx) {
                        ready.resolved = Some(resolved);
                    }
                }
                if ready.any() {
                    Poll::Ready(ready)
                } else {
                    Poll::Pending
                }
            })
            .await;
            if ready.cut {
                return End::Cut;
            }
            if ready.control {
                match client.try_read(&mut control) {
                    Ok(0) => return End::ControlClosed,
                    // Nothing is due on the control connection; whatever comes is ignored.
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return End::ControlError(e),
                }
            }
            match ready.relay {
                Some(Ok(())) => self.take_client_datagrams(),
                Some(Err(e)) => return End::RelayError(e),
                None => {}
            }
            if ready.v4 {
                self.take_replies(Family::V4);
            }
            if ready.v6 {
                self.take_replies(Family::V6);
            }
            if let Some(resolved) = ready.resolved {
                self.resolved(resolved);
            }
            if ready.tick {
                if self.moved == last_moved {
                    quiet += step;
                    if quiet >= timeout {
                        return End::Idle;
                    }
                } else {
                    last_moved = self.moved;
                    quiet = Duration::ZERO;
                }
            }
        }
    }

    fn drop_datagram(&self, reason: DropReason) {
        self.ctx.metrics.udp.dropped(reason);
    }

    /// Handles what the relay socket has (at most a batch).
    fn take_client_datagrams(&mut self) {
        BUFFER_OF_THREAD.with(|cell| {
            let mut buffer = cell.borrow_mut();
            if buffer.len() < BUFFER {
                buffer.resize(BUFFER, 0);
            }
            for _ in 0..BATCH {
                match self.relay.try_recv_from(&mut buffer[..]) {
                    Ok((len, source)) => self.client_datagram(&buffer[..len], source),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(error = %e, "UDP relay socket receive error");
                        break;
                    }
                }
            }
        });
    }

    fn client_datagram(&mut self, datagram: &[u8], source: SocketAddr) {
        let source = canonical(source);
        if source.ip() != self.client_ip {
            return self.drop_datagram(DropReason::ForeignSource);
        }
        match self.client {
            Some(client) if client != source => {
                return self.drop_datagram(DropReason::ForeignSource)
            }
            Some(_) => {}
            None => {
                if self.expected_port.is_some_and(|port| port != source.port()) {
                    return self.drop_datagram(DropReason::ForeignSource);
                }
                debug!(client = %source, "UDP association pinned to the client's port");
                self.client = Some(source);
            }
        }
        // Counted, not logged: a flood of them must not become a flood of log lines.
        let Ok(parsed) = UdpDatagram::parse(datagram) else {
            return self.drop_datagram(DropReason::Malformed);
        };
        if parsed.frag != 0 {
            return self.drop_datagram(DropReason::Fragment);
        }
        if parsed.payload.len() > UDP_PAYLOAD_MAX {
            return self.drop_datagram(DropReason::TooLarge);
        }
        if !self.ctx.access.load().may_reach(&parsed.target) {
            return self.denied(&parsed.target);
        }
        match &parsed.target {
            TargetAddr::Ip(addr) => {
                let addr = canonical(*addr);
                self.send_to_destination(&parsed.target, &[addr.ip()], addr.port(), parsed.payload)
            }
            TargetAddr::Domain(name, port) => {
                let key = names::key(name);
                match self.names.get(&key, Instant::now()) {
                    Known::Addresses(addresses) => {
                        let addresses = addresses.to_vec();
                        self.send_to_destination(&parsed.target, &addresses, *port, parsed.payload)
                    }
                    Known::Unresolvable => self.drop_datagram(DropReason::Unresolvable),
                    Known::Unknown => {
                        let waiting = Waiting {
                            name: name.clone(),
                            port: *port,
                            payload: parsed.payload.to_vec(),
                        };
                        if !self.lookups.hold(self.ctx.resolver.as_ref(), key, waiting) {
                            self.drop_datagram(DropReason::WouldBlock);
                        }
                    }
                }
            }
        }
    }

    /// A lookup finished: remember the answer and send what waited for it.
    fn resolved(&mut self, resolved: Resolved) {
        let Resolved { key, result, waiting } = resolved;
        let addresses = match result {
            Ok(mut addresses) if !addresses.is_empty() => {
                // Every lookup has the datagram that started it waiting.
                let port = waiting.first().map_or(0, |datagram| datagram.port);
                names::routed_first(&mut addresses, port, address_selection::has_route);
                Some(addresses)
            }
            Ok(_) => None,
            Err(e) => {
                debug!(error = %e, "UDP destination name does not resolve");
                None
            }
        };
        self.names.insert(key, addresses.clone(), Instant::now());
        for datagram in waiting {
            let target = TargetAddr::Domain(datagram.name, datagram.port);
            match &addresses {
                Some(addresses) => {
                    self.send_to_destination(&target, addresses, datagram.port, &datagram.payload)
                }
                None => self.drop_datagram(DropReason::Unresolvable),
            }
        }
    }

    /// Sends `payload` to the first of `addresses` the access rules allow for `target`.
    fn send_to_destination(
        &mut self,
        target: &TargetAddr,
        addresses: &[IpAddr],
        port: u16,
        payload: &[u8],
    ) {
        let policy = self.ctx.access.load();
        let Some(ip) =
            addresses.iter().map(|ip| ip.to_canonical()).find(|ip| policy.may_connect(target, *ip))
        else {
            return self.denied(target);
        };
        let destination = SocketAddr::new(ip, port);
        let outbound = match ip {
            IpAddr::V4(_) => self.outbound_v4.get(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => self.outbound_v6.get(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        let Some(outbound) = outbound else {
            return self.drop_datagram(DropReason::SendError);
        };
        match send_now(outbound, payload, destination) {
            Ok(_) => {
                self.ctx.metrics.udp.sent_to_destination(payload.len());
                self.peers.insert(destination);
                self.moved += 1;
                self.forwarded += 1;
            }
            Err(e) => self.drop_datagram(send_failure(&e)),
        }
    }

    fn denied(&mut self, target: &TargetAddr) {
        self.drop_datagram(DropReason::Denied);
        if let Some(held_back) = self.denied_log.allow(Instant::now(), DENIED_LOG_PERIOD) {
            warn!(%target, held_back, "datagram denied by access rules");
            self.ctx.telemetry.warning(
                CATEGORY_ACCESS,
                "datagram denied by access rules",
                vec![
                    ("destination", json!(target.to_string())),
                    ("client", json!(self.client_ip.to_string())),
                    ("not_reported_since_last", json!(held_back)),
                ],
            );
        }
    }

    /// Handles what an outbound socket has (at most a batch): replies to the client.
    fn take_replies(&mut self, family: Family) {
        BUFFER_OF_THREAD.with(|cell| {
            let mut buffer = cell.borrow_mut();
            if buffer.len() < BUFFER {
                buffer.resize(BUFFER, 0);
            }
            for _ in 0..BATCH {
                let outbound = match family {
                    Family::V4 => &self.outbound_v4,
                    Family::V6 => &self.outbound_v6,
                };
                let Some(socket) = &outbound.socket else { return };
                match socket.try_recv_from(&mut buffer[UDP_IP_HEADER_MAX..]) {
                    Ok((len, sender)) => self.reply(&mut buffer[..], len, canonical(sender)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(error = %e, "outbound UDP socket receive error");
                        break;
                    }
                }
            }
        });
    }

    /// Sends the `len` payload bytes at `buffer[UDP_IP_HEADER_MAX..]` to the client, behind a
    /// header naming `sender` written into the room before them (no copy of the payload).
    fn reply(&mut self, buffer: &mut [u8], len: usize, sender: SocketAddr) {
        let Some(client) = self.client else {
            return self.drop_datagram(DropReason::ForeignSource);
        };
        let filter = self.settings.reply_filter;
        if !self.peers.admits(sender, filter) {
            return self.drop_datagram(DropReason::ForeignSource);
        }
        if filter != UdpReplyFilter::AddressAndPort
            && !self.ctx.access.load().may_connect(&TargetAddr::Ip(sender), sender.ip())
        {
            return self.denied(&TargetAddr::Ip(sender));
        }
        let Some(start) = write_ip_header_before(&mut buffer[..UDP_IP_HEADER_MAX], &sender) else {
            return self.drop_datagram(DropReason::Malformed);
        };
        match send_now(&self.relay, &buffer[start..UDP_IP_HEADER_MAX + len], client) {
            Ok(_) => {
                self.ctx.metrics.udp.sent_to_client(len);
                self.moved += 1;
                self.returned += 1;
            }
            Err(e) => self.drop_datagram(send_failure(&e)),
        }
    }
}

/// Sends at once or fails (`WouldBlock` when the socket buffer is full). This is the syscall
/// itself, not tokio's `try_send_to`: that one answers `WouldBlock` without trying until the
/// reactor has seen the socket writable, which a fresh outbound socket has not yet, and the
/// association never waits for writability anyway.
fn send_now(socket: &UdpSocket, datagram: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_to(datagram, &to.into())
}

/// IPv4-mapped IPv6 addresses as the IPv4 addresses they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn send_failure(error: &io::Error) -> DropReason {
    if error.kind() == io::ErrorKind::WouldBlock {
        return DropReason::WouldBlock;
    }
    #[cfg(unix)]
    if error.raw_os_error() == Some(rustix::io::Errno::MSGSIZE.raw_os_error()) {
        return DropReason::TooLarge;
    }
    DropReason::SendError
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_filter_remembers_the_latest_destinations_only() {
        let mut peers = Peers::default();
        let endpoint =
            |i: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 4) as u8)), 1000 + i);
        for i in 0..(MAX_PEERS as u16 + 10) {
            peers.insert(endpoint(i));
            peers.insert(endpoint(i)); // a repeat changes nothing
        }
        assert_eq!((peers.endpoints.len(), peers.order.len()), (MAX_PEERS, MAX_PEERS));
        let newest = endpoint(MAX_PEERS as u16 + 9);
        assert!(peers.admits(newest, UdpReplyFilter::AddressAndPort));
        assert!(!peers.admits(endpoint(0), UdpReplyFilter::AddressAndPort), "oldest forgotten");
        let other_port = SocketAddr::new(newest.ip(), 9);
        assert!(!peers.admits(other_port, UdpReplyFilter::AddressAndPort));
        assert!(peers.admits(other_port, UdpReplyFilter::Address));
        let stranger: SocketAddr = "198.51.100.1:53".parse().unwrap();
        assert!(!peers.admits(stranger, UdpReplyFilter::Address));
        assert!(peers.admits(stranger, UdpReplyFilter::Any));
    }

    #[tokio::test(start_paused = true)]
    async fn denials_are_reported_once_per_period_with_the_count_held_back() {
        let mut limiter = LogLimiter::default();
        let start = Instant::now();
        assert_eq!(limiter.allow(start, DENIED_LOG_PERIOD), Some(0));
        for _ in 0..99 {
            assert_eq!(limiter.allow(start, DENIED_LOG_PERIOD), None);
        }
        assert_eq!(limiter.allow(start + DENIED_LOG_PERIOD, DENIED_LOG_PERIOD), Some(99));
        assert_eq!(limiter.allow(start + DENIED_LOG_PERIOD, DENIED_LOG_PERIOD), None);
    }
}
