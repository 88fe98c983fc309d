//! Everything that can go wrong while speaking SOCKS5 to a client, each mapped to the reply
//! the client is owed (if the protocol lets us send one at that point).

use std::io;

use super::ReplyCode;

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("unsupported SOCKS version {0:#04x}")]
    UnsupportedVersion(u8),
    #[error("greeting offers no authentication methods")]
    NoMethods,
    #[error("client offers no acceptable authentication method")]
    NoAcceptableMethod,
    #[error("unsupported username/password sub-negotiation version {0:#04x}")]
    AuthVersion(u8),
    #[error("username/password authentication failed")]
    AuthFailed,
    #[error("command {0:#04x} not supported")]
    CommandNotSupported(u8),
    #[error("address type {0:#04x} not supported")]
    AddressTypeNotSupported(u8),
    #[error("domain name is empty")]
    EmptyDomain,
    #[error("domain name is not valid UTF-8")]
    DomainNotUtf8,
}

impl SocksError {
    /// The reply code a client gets for a bad request. Errors before the request phase
    /// (greeting, authentication) have their own replies and return `None` here.
    pub fn reply_code(&self) -> Option<ReplyCode> {
        match self {
            SocksError::CommandNotSupported(_) => Some(ReplyCode::CommandNotSupported),
            SocksError::AddressTypeNotSupported(_) => Some(ReplyCode::AddressTypeNotSupported),
            SocksError::EmptyDomain | SocksError::DomainNotUtf8 => Some(ReplyCode::GeneralFailure),
            _ => None,
        }
    }

    /// True when the client just went away (EOF or reset), which is ordinary, not an error.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, SocksError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ))
    }
}
