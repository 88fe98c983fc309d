//! A minimal HTTP/1.1 codec: just enough for keep-alive GETs with a Content-Length body.
//! Requests and responses alternate strictly (no pipelining), which keeps the parser small.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest header block accepted from a peer; more is a protocol error, not unbounded memory.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("peer closed the connection")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("status {0}")]
    Status(u16),
}

impl HttpError {
    /// A short, stable name for error tables.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => "http_reset",
            HttpError::Io(_) => "http_io",
            HttpError::Closed => "http_eof",
            HttpError::Malformed(_) => "http_malformed",
            HttpError::Status(_) => "http_status",
        }
    }
}

/// Bytes read from a connection but not yet consumed; reused across messages to avoid
/// allocating per request.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        ReadBuf { buf: Vec::with_capacity(4096), start: 0 }
    }
}

impl ReadBuf {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more bytes; `Ok(0)` means EOF.
    async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 4096, 0);
        let n = reader.read(&mut self.buf[old..]).await;
        let got = *n.as_ref().unwrap_or(&0);
        self.buf.truncate(old + got);
        n
    }

    /// Reads until a full header block (ending in CRLFCRLF) is buffered and returns its length
    /// including the terminator. `Ok(None)` means a clean EOF before any byte of a new message.
    async fn read_head<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<usize>, HttpError> {
        loop {
            if let Some(pos) = find(self.pending(), b"\r\n\r\n") {
                return Ok(Some(pos + 4));
            }
            if self.pending().len() > MAX_HEAD {
                return Err(HttpError::Malformed("header block too large"));
            }
            if self.fill(reader).await? == 0 {
                return if self.pending().is_empty() { Ok(None) } else { Err(HttpError::Closed) };
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Result<u64, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("header not UTF-8"))?;
    for line in text.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value
                    .trim()
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad Content-Length"));
            }
        }
    }
    Err(HttpError::Malformed("no Content-Length"))
}

/// Sends `GET path` with keep-alive.
pub async fn write_get<W: AsyncWrite + Unpin>(writer: &mut W, path: &str) -> io::Result<()> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: loadgen\r\nUser-Agent: loadgen\r\n\r\n");
    writer.write_all(request.as_bytes()).await
}

/// Reads one whole response, discarding the body, and returns the body length. A status other
/// than 200 is an error after the body has been read, so the connection stays usable.
pub async fn read_response<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut ReadBuf,
) -> Result<u64, HttpError> {
    let head_len = buf.read_head(reader).await?.ok_or(HttpError::Closed)?;
    let head = &buf.pending()[..head_len];
    let status: u16 = head
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("bad status line"))?;
    if !head.starts_with(b"HTTP/1.") {
        return Err(HttpError::Malformed("not an HTTP/1.x response"));
    }
    let body_len = content_length(head)?;
    buf.consume(head_len);
    let mut remaining = body_len;
    // Body bytes that arrived together with the head.
    let already = (buf.pending().len() as u64).min(remaining);
    buf.consume(already as usize);
    remaining -= already;
    if remaining > 0 {
        // Large bodies (bulk mode) are drained with a big buffer, straight from the socket.
        let mut sink = vec![0u8; remaining.min(256 * 1024) as usize];
        while remaining > 0 {
            let want = remaining.min(sink.len() as u64) as usize;
            let n = reader.read(&mut sink[..want]).await?;
            if n == 0 {
                return Err(HttpError::Closed);
            }
            remaining -= n as u64;
        }
    }
    if status != 200 {
        return Err(HttpError::Status(status));
    }
    Ok(body_len)
}

/// Reads one request head and returns its path; `Ok(None)` on a clean EOF between requests.
/// Request bodies are not supported (GET only), which is all the load generator sends.
pub async fn read_request_path<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut ReadBuf,
) -> Result<Option<String>, HttpError> {
    let Some(head_len) = buf.read_head(reader).await? else {
        return Ok(None);
    };
    let head = &buf.pending()[..head_len];
    let line_end = find(head, b"\r\n").unwrap_or(head_len);
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| HttpError::Malformed("request line not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(_method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("bad request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let path = path.to_string();
    buf.consume(head_len);
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn response_then_request_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_get(&mut a, "/x").await.expect("write");
        let mut rb = ReadBuf::default();
        let path = read_request_path(&mut b, &mut rb).await.expect("parse");
        assert_eq!(path.as_deref(), Some("/x"));
        b.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await.expect("write");
        b.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await.expect("write");
        let mut ra = ReadBuf::default();
        assert_eq!(read_response(&mut a, &mut ra).await.expect("first"), 5);
        assert!(matches!(read_response(&mut a, &mut ra).await, Err(HttpError::Status(404))));
        drop(b);
        assert!(matches!(read_response(&mut a, &mut ra).await, Err(HttpError::Closed)));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"HTTP/1.1 2x0 OK\r\n\r\n").await.expect("write");
        let mut ra = ReadBuf::default();
        assert!(read_response(&mut a, &mut ra).await.is_err());
        b.write_all(b"\r\n\r\n").await.expect("write");
        let mut rb = ReadBuf::default();
        assert!(read_request_path(&mut a, &mut rb).await.is_err());
    }
}
