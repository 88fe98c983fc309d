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

use crate::access::AccessPolicy;
use crate::socks::{ReplyCode, TargetAddr};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an upstream connection could not be had; each cause maps to a SOCKS reply code.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr} failed: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("destination {0} is not allowed")]
    NotAllowed(TargetAddr),
}

impl ConnectError {
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            ConnectError::Resolve { .. } | ConnectError::NoAddress { .. } => {
                ReplyCode::HostUnreachable
            }
            ConnectError::Timeout { .. } => ReplyCode::TtlExpired,
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

/// Resolves `target` (if it is a name) and tries each address `access` allows in turn, each
/// under `timeout`. The last failure is reported. The stream has `TCP_NODELAY` set.
pub async fn dial(
    target: &TargetAddr,
    timeout: Duration,
    access: &AccessPolicy,
) -> Result<TcpStream, ConnectError> {
    let resolved: Vec<SocketAddr> = match target {
        TargetAddr::Ip(addr) => vec![*addr],
        TargetAddr::Domain(host, port) => {
            let resolved = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|source| ConnectError::Resolve { host: host.clone(), source })?;
            resolved.collect()
        }
    };
    let allowed: Vec<SocketAddr> =
        resolved.iter().copied().filter(|addr| access.may_connect(target, addr.ip())).collect();
    if allowed.is_empty() && !resolved.is_empty() {
        return Err(ConnectError::NotAllowed(target.clone()));
    }
    let mut last_error = None;
    for addr in allowed {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Request/response traffic must not wait on Nagle + delayed ACK.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(source)) => last_error = Some(ConnectError::Io { addr, source }),
            Err(_) => last_error = Some(ConnectError::Timeout { addr, timeout }),
        }
    }
    Err(last_error.unwrap_or_else(|| ConnectError::NoAddress { host: target.to_string() }))
}

/// Opens a new TCP connection to a destination. Replaceable so that harnesses can inject faults.
pub trait Dialer: Send + Sync + 'static {
    fn dial(
        &self,
        target: TargetAddr,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>>;
}

/// The real dialer: DNS resolution and `connect(2)`, with no access rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial(
        &self,
        target: TargetAddr,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        Box::pin(async move { dial(&target, timeout, &AccessPolicy::ALLOW_ALL).await })
    }
}

/// The real dialer, refusing any resolved address the access rules deny.
#[derive(Debug, Clone)]
pub struct PolicyDialer {
    access: Arc<AccessPolicy>,
}

impl PolicyDialer {
    pub fn new(access: Arc<AccessPolicy>) -> Self {
        PolicyDialer { access }
    }
}

impl Dialer for PolicyDialer {
    fn dial(
        &self,
        target: TargetAddr,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<TcpStream, ConnectError>> {
        let access = self.access.clone();
        Box::pin(async move { dial(&target, timeout, &access).await })
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

/// Told when a session ends. `untouched` is the stream back when not a byte moved either way
/// (so it is still a spare); `None` means it carried traffic and has been closed.
/// Implementations must also account for being dropped without `finish` (a panicking handler).
pub trait Lease: Send {
    fn finish(self: Box<Self>, untouched: Option<TcpStream>);
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

    /// Ends the session. `untouched` says whether the stream is still unused and intact.
    pub fn finish(self, untouched: bool) {
        let Upstream { stream, lease, .. } = self;
        match lease {
            Some(lease) => lease.finish(untouched.then_some(stream)),
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
    connect_timeout: Duration,
}

impl DirectConnector {
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_dialer(Arc::new(TcpDialer), connect_timeout)
    }

    pub fn with_dialer(dialer: Arc<dyn Dialer>, connect_timeout: Duration) -> Self {
        DirectConnector { dialer, connect_timeout }
    }
}

impl Connector for DirectConnector {
    fn acquire<'a>(
        &'a self,
        target: &'a TargetAddr,
    ) -> BoxFuture<'a, Result<Upstream, ConnectError>> {
        Box::pin(async move {
            let stream = self.dialer.dial(target.clone(), self.connect_timeout).await?;
            Ok(Upstream::dialed(stream))
        })
    }
}
