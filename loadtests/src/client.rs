//! Opening a stream to a destination, directly or through a SOCKS5 proxy, with the poolsocks
//! codec (so the harness speaks exactly what the daemon parses).

use std::net::{IpAddr, SocketAddr};

use poolsocks::secret::Secret;
use poolsocks::socks::{
    Command, Greeting, MethodSelection, Reply, ReplyCode, Request, TargetAddr, UserPassReply,
    UserPassRequest, METHOD_NO_AUTH, METHOD_USERPASS,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// How to reach destinations.
#[derive(Debug, Clone)]
pub enum Route {
    Direct,
    Socks { proxy: SocketAddr, auth: Option<(String, String)> },
}

/// Where a session failed; the names are the rows of the error tables.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("connect to {0}: {1}")]
    Connect(&'static str, std::io::Error),
    #[error("SOCKS greeting: {0}")]
    Greeting(String),
    #[error("proxy refused our authentication methods")]
    NoMethod,
    #[error("SOCKS authentication: {0}")]
    Auth(String),
    #[error("SOCKS request: {0}")]
    Request(String),
    #[error("proxy replied {0:?}")]
    Refused(ReplyCode),
}

impl OpenError {
    pub fn kind(&self) -> String {
        match self {
            OpenError::Connect(what, e) => format!("connect_{what}_{:?}", e.kind()),
            OpenError::Greeting(_) => "socks_greeting".into(),
            OpenError::NoMethod => "socks_no_method".into(),
            OpenError::Auth(_) => "socks_auth".into(),
            OpenError::Request(_) => "socks_reply_io".into(),
            OpenError::Refused(code) => format!("socks_reply_{code:?}"),
        }
    }
}

/// Opens a stream to `target` with TCP_NODELAY set (request/response traffic must not wait on
/// Nagle and delayed ACKs).
pub async fn open(route: &Route, target: SocketAddr) -> Result<TcpStream, OpenError> {
    open_from(route, target, None).await
}

/// Like [`open`], with the first connection (to the proxy, or to the target when direct) made
/// from `source` (a loopback address such as 127.0.0.12: many clients seen as many addresses).
pub async fn open_from(
    route: &Route,
    target: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, OpenError> {
    match route {
        Route::Direct => {
            let stream =
                connect(target, source).await.map_err(|e| OpenError::Connect("target", e))?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Route::Socks { proxy, auth } => {
            let mut stream =
                connect(*proxy, source).await.map_err(|e| OpenError::Connect("proxy", e))?;
            let _ = stream.set_nodelay(true);
            handshake(&mut stream, target, auth.as_ref()).await?;
            Ok(stream)
        }
    }
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else { return TcpStream::connect(addr).await };
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

async fn handshake(
    stream: &mut TcpStream,
    target: SocketAddr,
    auth: Option<&(String, String)>,
) -> Result<(), OpenError> {
    let method = if auth.is_some() { METHOD_USERPASS } else { METHOD_NO_AUTH };
    // Each message waits for the previous answer, as ordinary clients do: some proxies
    // (microsocks) parse one message per read and would drop a pipelined request.
    let mut out = Vec::with_capacity(64);
    Greeting { methods: vec![method] }.write_to(&mut out);
    stream.write_all(&out).await.map_err(|e| OpenError::Greeting(e.to_string()))?;
    let selection =
        MethodSelection::read_from(stream).await.map_err(|e| OpenError::Greeting(e.to_string()))?;
    if selection.method != method {
        return Err(OpenError::NoMethod);
    }
    if let Some((user, pass)) = auth {
        out.clear();
        UserPassRequest { username: user.clone(), password: Secret::new(pass.clone()) }
            .write_to(&mut out);
        stream.write_all(&out).await.map_err(|e| OpenError::Auth(e.to_string()))?;
        let reply =
            UserPassReply::read_from(stream).await.map_err(|e| OpenError::Auth(e.to_string()))?;
        if !reply.success {
            return Err(OpenError::Auth("credentials rejected".into()));
        }
    }
    out.clear();
    Request { command: Command::Connect, target: TargetAddr::Ip(target) }.write_to(&mut out);
    stream.write_all(&out).await.map_err(|e| OpenError::Request(e.to_string()))?;
    let reply = Reply::read_from(stream).await.map_err(|e| OpenError::Request(e.to_string()))?;
    if reply.code != ReplyCode::Succeeded {
        return Err(OpenError::Refused(reply.code));
    }
    Ok(())
}
