//! The seam where a connection handler gets its upstream stream.
//!
//! The handler asks a [`Connector`] for an [`Upstream`] and hands it back through
//! [`Upstream::finish`] when the session ends. [`DirectConnector`] dials every time; the pool
//! (`crate::pool`) implements the same trait with warm spares. Both dial through a [`Dialer`],
//! which tests and harnesses can replace to make dials fail, hang or count.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access::{AccessPolicy, SharedPolicy};
use crate::descriptors::DescriptorBudget;
use crate::eyeballs;
use crate::resolve::{ResolveError, Resolver, StaticResolver};
use crate::socks::{ReplyCode, TargetAddr};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an upstream connection could not be had; each cause maps to a SOCKS reply code.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("{} resolved to no address", crate::logsafe::Escaped(host))]
    NoAddress { host: String },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {target} took longer than the connect phase allows ({timeout:?})")]
    PhaseTimeout { target: TargetAddr, timeout: Duration },
    #[error("connect to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("destination {0} is not allowed")]
    NotAllowed(TargetAddr),
}

impl ConnectError {
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            ConnectError::Resolve(_) | ConnectError::NoAddress { .. } => ReplyCode::HostUnreachable,
            ConnectError::Timeout { .. } | ConnectError::PhaseTimeout { .. } => {
                ReplyCode::TtlExpired
            }
            ConnectError::NotAllowed(_) => ReplyCode::NotAllowed,
            ConnectError::Io { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionRefused => ReplyCode::ConnectionRefused,
                io::ErrorKind::NetworkUnreachable => ReplyCode::NetworkUnreachable,
                io::ErrorKind::HostUnreachable => ReplyCode::HostUnreachable,
                io::ErrorKind::TimedOut => ReplyCode::TtlExpired,
                io::ErrorKind::PermissionDenied => ReplyCode::NotAllowed,
                _ => ReplyCode::GeneralFailure,
            },
        }
    }
}

/// How long a dial may take: each address, and all of them together (resolution included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialLimits {
    pub per_address: Duration,
    pub overall: Duration,
}

impl DialLimits {
    /// One bound for both (harnesses, single-address destinations).
    pub fn uniform(timeout: Duration) -> Self {
        DialLimits { per_address: timeout, overall: timeout }
    }
}

/// Resolves `target` (if it is a name) and connects to an address `access` allows, each
/// attempt under `limits.per_address` and all within `limits.overall` (then `PhaseTimeout`).
/// One address is one attempt. Several are raced, Happy Eyeballs style (see `eyeballs`): the
/// next starts when the last has not connected within `eyeballs::ATTEMPT_DELAY` or has
/// failed, the first to connect wins, the others are closed; a second attempt in flight takes
/// a descriptor from `descriptors`, and without one the attempts go one after another. When
/// all fail the last failure is reported; when the rules allow none, `NotAllowed`.
///
/// Rules judge where a connection really goes: on each resolved address, with the addresses the
/// kernel would reroute (`0.0.0.0` and `::`, delivered to loopback) refused outright, so the
/// address connected to is the peer. Pooled spares are checked again on their live peer at
/// hand-out. The stream has `TCP_NODELAY` set.
pub async fn dial(
    target: &TargetAddr,
    limits: DialLimits,
    resolver: &dyn Resolver,
    access: &AccessPolicy,
    descriptors: &DescriptorBudget,
) -> Result<TcpStream, ConnectError> {
    let deadline = Instant::now() + limits.overall;
    let phase_timeout =
        || ConnectError::PhaseTimeout { target: target.clone(), timeout: limits.overall };
    let looked_up: Vec<SocketAddr>;
    // An address literal is dialed without building a list (no allocation on the fast path).
    let resolved: &[SocketAddr] = match target {
        TargetAddr::Ip(addr) => std::slice::from_ref(addr),
        TargetAddr::Domain(host, port) => {
            looked_up = match tokio::time::timeout_at(deadline, resolver.lookup(host, *port)).await
            {
                Ok(found) => found?,
                Err(_) => return Err(phase_timeout()),
            };
            &looked_up
        }
    };
    // The peer of a connection made to an address is that address: the kernel reroutes only
    // the unspecified addresses, which the rules refuse before any connect. So the rules
    // judge each connection's real peer here. (One policy snapshot serves the whole dial, so
    // judging all addresses up front is judging each just before its attempt.)
    let mut allowed = resolved.iter().copied().filter(|addr| access.may_connect(target, addr.ip()));
    let Some(first) = allowed.next() else {
        return Err(if resolved.is_empty() {
            ConnectError::NoAddress { host: target.to_string() }
        } else {
            ConnectError::NotAllowed(target.clone())
        });
    };
    let Some(second) = allowed.next() else {
        // One address (every literal): one attempt, no list, no timer.
        let now = Instant::now();
        if now >= deadline {
            return Err(phase_timeout());
        }
        let timeout = limits.per_address.min(deadline - now);
        return match tokio::time::timeout(timeout, connect(first)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(ConnectError::Io { addr: first, source }),
            Err(_) if timeout < limits.per_address => Err(phase_timeout()),
            Err(_) => Err(ConnectError::Timeout { addr: first, timeout }),
        };
    };
    let candidates: Vec<SocketAddr> = [first, second].into_iter().chain(allowed).collect();
    let ordered = eyeballs::interleave(&candidates);
    let racing = eyeballs::race(&ordered, limits.per_address, descriptors, connect);
    match tokio::time::timeout_at(deadline, racing).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(last)) => {
            Err(last.unwrap_or_else(|| ConnectError::NoAddress { host: target.to_string() }))
        }
        Err(_) => Err(phase_timeout()),
    }
}

/// Connects to `addr` with `TCP_NODELAY` set (request/response traffic must not wait on Nagle
/// and delayed ACKs).
///
/// A loopback or same-host connect is usually complete when connect(2) returns `EINPROGRESS`:
/// the kernel has run the handshake before the call returns. One getpeername(2) sees that, and
/// the stream is used at once; `TcpStream::connect` would first wait for the reactor's
/// writable event, a scheduler turn on the session's critical path. Otherwise (a real network
/// between) it waits for writability and reads the outcome from `SO_ERROR`, as tokio does.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    // Created non-blocking (and close-on-exec): no fcntl(2) calls after.
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    // Only a speed-up: a socket that refuses it still carries the session, as before.
    let _ = socket.set_nodelay(true);
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let done = socket.peer_addr().is_ok();
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if !done {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// Opens a new TCP connection to a destination. Replaceable so that harnesses can inject faults.
pub trait Dialer: Send + Sync + 'static {
    fn dial(
        &self,
        target: TargetAddr,
        limits: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>>;

    /// Whether a connection this dialer made earlier, now connected to `peer`, may still be
    /// handed to a client for `target` (the rules may have changed since it was dialed).
    fn still_allowed(&self, _target: &TargetAddr, _peer: SocketAddr) -> bool {
        true
    }
}

/// The real dialer with no access rules, for harnesses. Names go to its resolver, which by
/// default knows only `localhost` (a harness never asks the machine's DNS server by accident).
#[derive(Clone)]
pub struct TcpDialer {
    resolver: Arc<dyn Resolver>,
    /// Never runs out: a harness's second attempts are not budgeted.
    descriptors: Arc<DescriptorBudget>,
}

impl TcpDialer {
    pub fn new() -> Self {
        Self::with_resolver(Arc::new(StaticResolver::new()))
    }

    pub fn with_resolver(resolver: Arc<dyn Resolver>) -> Self {
        TcpDialer { resolver, descriptors: DescriptorBudget::unlimited() }
    }
}

impl Default for TcpDialer {
    fn default() -> Self {
        Self::new()
    }
}

impl Dialer for TcpDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        let resolver = self.resolver.clone();
        let descriptors = self.descriptors.clone();
        Box::pin(async move {
            dial(&target, limits, resolver.as_ref(), &AccessPolicy::ALLOW_ALL, &descriptors).await
        })
    }
}

/// The daemon's dialer: resolution through its resolver, every address and every connected
/// peer checked against the access rules in force at that moment.
#[derive(Clone)]
pub struct PolicyDialer {
    access: SharedPolicy,
    resolver: Arc<dyn Resolver>,
    /// Where a name's second attempt in flight takes its descriptor (see `eyeballs`).
    descriptors: Arc<DescriptorBudget>,
}

impl PolicyDialer {
    pub fn new(access: SharedPolicy, resolver: Arc<dyn Resolver>) -> Self {
        PolicyDialer { access, resolver, descriptors: DescriptorBudget::unlimited() }
    }

    /// A second connect attempt in flight takes its descriptor from `descriptors`.
    pub fn with_descriptors(mut self, descriptors: Arc<DescriptorBudget>) -> Self {
        self.descriptors = descriptors;
        self
    }
}

impl Dialer for PolicyDialer {
    fn dial(
        &self,
        target: TargetAddr,
        limits: DialLimits,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        let access = self.access.clone();
        let resolver = self.resolver.clone();
        let descriptors = self.descriptors.clone();
        Box::pin(async move {
            let policy = access.load_full();
            dial(&target, limits, resolver.as_ref(), &policy, &descriptors).await
        })
    }

    fn still_allowed(&self, target: &TargetAddr, peer: SocketAddr) -> bool {
        self.access.load().may_connect(target, peer.ip())
    }
}

/// Where an upstream stream came from, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Dialed for this client.
    Dialed,
    /// A pooled spare: opened earlier and never used by anyone.
    Pooled,
}

/// How a lent stream comes back when its session ends.
pub struct LeaseEnd {
    /// The stream, when not a byte moved either way and the client is gone (so it is still a
    /// spare); `None` means it carried traffic or failed, and has been closed.
    pub untouched: Option<TcpStream>,
    /// Whether the client got a success reply on it: a pool counts a hit only then.
    pub served: bool,
}

/// Told when a session ends. Implementations must also account for being dropped without
/// `finish` (a panicking handler).
pub trait Lease: Send {
    fn finish(self: Box<Self>, end: LeaseEnd);
}

/// An upstream stream lent to one client session.
pub struct Upstream {
    pub stream: TcpStream,
    pub origin: Origin,
    lease: Option<Box<dyn Lease>>,
}

impl Upstream {
    pub fn dialed(stream: TcpStream) -> Self {
        Upstream { stream, origin: Origin::Dialed, lease: None }
    }

    pub fn leased(stream: TcpStream, origin: Origin, lease: Box<dyn Lease>) -> Self {
        Upstream { stream, origin, lease: Some(lease) }
    }

    /// Whether a pool lent it, so that an untouched stream can go back.
    pub fn is_leased(&self) -> bool {
        self.lease.is_some()
    }

    /// Ends a session that was served on it (the client got its success reply). `untouched`
    /// says whether the stream is still unused and intact, and its client gone, so it may be
    /// a spare again.
    pub fn finish(self, untouched: bool) {
        self.end(untouched, true);
    }

    /// Ends it without the session having been served (the client left before its reply).
    pub fn finish_unserved(self, untouched: bool) {
        self.end(untouched, false);
    }

    fn end(self, untouched: bool, served: bool) {
        let Upstream { stream, lease, .. } = self;
        match lease {
            Some(lease) => {
                lease.finish(LeaseEnd { untouched: untouched.then_some(stream), served })
            }
            None => drop(stream),
        }
    }
}

/// Gives a connection handler its upstream stream.
pub trait Connector: Send + Sync + 'static {
    fn acquire<'a>(
        &'a self,
        target: &'a TargetAddr,
    ) -> BoxFuture<'a, Result<Upstream, ConnectError>>;
}

/// Dials every request: what the daemon does with the pool off.
#[derive(Clone)]
pub struct DirectConnector {
    dialer: Arc<dyn Dialer>,
    limits: DialLimits,
}

impl DirectConnector {
    pub fn new(limits: DialLimits) -> Self {
        Self::with_dialer(Arc::new(TcpDialer::new()), limits)
    }

    pub fn with_dialer(dialer: Arc<dyn Dialer>, limits: DialLimits) -> Self {
        DirectConnector { dialer, limits }
    }
}

impl Connector for DirectConnector {
    fn acquire<'a>(
        &'a self,
        target: &'a TargetAddr,
    ) -> BoxFuture<'a, Result<Upstream, ConnectError>> {
        Box::pin(async move {
            let stream = self.dialer.dial(target.clone(), self.limits).await?;
            Ok(Upstream::dialed(stream))
        })
    }
}
