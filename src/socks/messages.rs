//! The messages of a SOCKS5 session, in the order they cross the wire.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{SocksError, TargetAddr, METHOD_NO_ACCEPTABLE, SOCKS_VERSION, USERPASS_VERSION};
use crate::secret::Secret;

/// The client's greeting: `VER NMETHODS METHODS...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub methods: Vec<u8>,
}

impl Greeting {
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let version = reader.read_u8().await?;
        if version != SOCKS_VERSION {
            return Err(SocksError::UnsupportedVersion(version));
        }
        let count = reader.read_u8().await? as usize;
        if count == 0 {
            return Err(SocksError::NoMethods);
        }
        let mut methods = vec![0u8; count];
        reader.read_exact(&mut methods).await?;
        Ok(Greeting { methods })
    }

    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.push(SOCKS_VERSION);
        buf.push(self.methods.len() as u8);
        buf.extend_from_slice(&self.methods);
    }
}

/// The server's choice of method: `VER METHOD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSelection {
    pub method: u8,
}

impl MethodSelection {
    pub const NO_ACCEPTABLE: MethodSelection = MethodSelection { method: METHOD_NO_ACCEPTABLE };

    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let version = reader.read_u8().await?;
        if version != SOCKS_VERSION {
            return Err(SocksError::UnsupportedVersion(version));
        }
        Ok(MethodSelection { method: reader.read_u8().await? })
    }

    pub fn to_bytes(self) -> [u8; 2] {
        [SOCKS_VERSION, self.method]
    }
}

/// RFC 1929 request: `VER ULEN UNAME PLEN PASSWD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPassRequest {
    pub username: String,
    pub password: Secret,
}

impl UserPassRequest {
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let version = reader.read_u8().await?;
        if version != USERPASS_VERSION {
            return Err(SocksError::AuthVersion(version));
        }
        let username = read_short_string(reader).await?;
        let password = read_short_string(reader).await?;
        // Credentials that are not UTF-8 can match no configured user, so they simply fail.
        let username = String::from_utf8(username).map_err(|_| SocksError::AuthFailed)?;
        let password = String::from_utf8(password).map_err(|_| SocksError::AuthFailed)?;
        Ok(UserPassRequest { username, password: Secret::new(password) })
    }

    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.push(USERPASS_VERSION);
        for field in [self.username.as_bytes(), self.password.expose().as_bytes()] {
            let field = &field[..field.len().min(255)];
            buf.push(field.len() as u8);
            buf.extend_from_slice(field);
        }
    }
}

async fn read_short_string<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, SocksError> {
    let len = reader.read_u8().await? as usize;
    let mut bytes = vec![0u8; len];
    reader.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// RFC 1929 reply: `VER STATUS`, status 0 meaning success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPassReply {
    pub success: bool,
}

impl UserPassReply {
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let version = reader.read_u8().await?;
        if version != USERPASS_VERSION {
            return Err(SocksError::AuthVersion(version));
        }
        Ok(UserPassReply { success: reader.read_u8().await? == 0 })
    }

    pub fn to_bytes(self) -> [u8; 2] {
        [USERPASS_VERSION, if self.success { 0x00 } else { 0x01 }]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
}

impl Command {
    fn from_byte(byte: u8) -> Result<Self, SocksError> {
        match byte {
            0x01 => Ok(Command::Connect),
            0x02 => Ok(Command::Bind),
            0x03 => Ok(Command::UdpAssociate),
            other => Err(SocksError::CommandNotSupported(other)),
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
        }
    }
}

/// The client's request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub target: TargetAddr,
}

impl Request {
    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let mut head = [0u8; 3];
        reader.read_exact(&mut head).await?;
        let [version, command, _reserved] = head;
        if version != SOCKS_VERSION {
            return Err(SocksError::UnsupportedVersion(version));
        }
        // Read the address before judging the command so the error reply follows a whole request.
        let target = TargetAddr::read_from(reader).await;
        let command = Command::from_byte(command)?;
        Ok(Request { command, target: target? })
    }

    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&[SOCKS_VERSION, self.command.as_byte(), 0x00]);
        self.target.write_to(buf);
    }
}

/// The reply codes of RFC 1928 section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCode {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    NetworkUnreachable = 0x03,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    TtlExpired = 0x06,
    CommandNotSupported = 0x07,
    AddressTypeNotSupported = 0x08,
}

impl ReplyCode {
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0x00 => ReplyCode::Succeeded,
            0x01 => ReplyCode::GeneralFailure,
            0x02 => ReplyCode::NotAllowed,
            0x03 => ReplyCode::NetworkUnreachable,
            0x04 => ReplyCode::HostUnreachable,
            0x05 => ReplyCode::ConnectionRefused,
            0x06 => ReplyCode::TtlExpired,
            0x07 => ReplyCode::CommandNotSupported,
            0x08 => ReplyCode::AddressTypeNotSupported,
            _ => return None,
        })
    }
}

/// The server's reply: `VER REP RSV ATYP BND.ADDR BND.PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: ReplyCode,
    pub bound: TargetAddr,
}

impl Reply {
    pub fn failure(code: ReplyCode) -> Self {
        Reply { code, bound: TargetAddr::unspecified() }
    }

    pub async fn read_from<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, SocksError> {
        let mut head = [0u8; 3];
        reader.read_exact(&mut head).await?;
        let [version, code, _reserved] = head;
        if version != SOCKS_VERSION {
            return Err(SocksError::UnsupportedVersion(version));
        }
        let bound = TargetAddr::read_from(reader).await?;
        // An unknown code from a peer is reported as a general failure rather than dropped.
        let code = ReplyCode::from_byte(code).unwrap_or(ReplyCode::GeneralFailure);
        Ok(Reply { code, bound })
    }

    pub fn write_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&[SOCKS_VERSION, self.code as u8, 0x00]);
        self.bound.write_to(buf);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(22);
        self.write_to(&mut buf);
        buf
    }
}
