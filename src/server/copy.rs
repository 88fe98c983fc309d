//! Byte copying for the relay: both directions at once, each through a small userspace buffer
//! that is allocated only when the direction first has bytes, and upgraded to `splice(2)` on
//! Linux once the direction shows bulk traffic (a read that fills the whole buffer).
//!
//! Why a hybrid: a session that carries a few small requests costs no extra syscalls (a pipe is
//! three more per direction), while a download moves through a kernel pipe without being copied
//! into and out of this process. Why not `copy_bidirectional`: it allocates both buffers up front
//! and cannot switch to splice.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Userspace buffer of one direction.
pub const COPY_BUFFER: usize = 16 * 1024;

/// Copies `a`→`b` and `b`→`a` until both have seen EOF (each EOF is passed on as a write
/// shutdown, so half-closed sessions finish their other direction). Returns the bytes moved
/// each way, or the first error.
pub async fn bidirectional(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    let one_done = AtomicBool::new(false);
    let (a_to_b, b_to_a) = tokio::try_join!(
        one_way(&mut a_read, &mut b_write, &one_done),
        one_way(&mut b_read, &mut a_write, &one_done)
    )?;
    Ok((a_to_b.bytes, b_to_a.bytes))
}

/// What one direction moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copied {
    bytes: u64,
    /// Whether it went on through `splice(2)` after the first full buffer.
    spliced: bool,
}

/// `other_done` is shared by the two directions of a session: the first to reach EOF passes it
/// on with a write shutdown (half-close); the second leaves that to the close that follows at
/// once, saving a syscall per session (after EOF both ways nothing is left unread, so the close
/// sends a FIN, not a reset).
///
/// Reads go through tokio's `poll_read`, which treats a short read as "drained" and skips the
/// read that would only return `EAGAIN` (`try_read` does not: one more syscall per direction).
async fn one_way(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    other_done: &AtomicBool,
) -> io::Result<Copied> {
    let mut copied = Copied { bytes: 0, spliced: false };
    // Allocated once the direction has bytes, so an idle session holds no buffer; read into
    // spare capacity, never zeroed (zeroing 16 KiB twice per session showed in perf).
    from.as_ref().readable().await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(COPY_BUFFER);
    loop {
        buffer.clear();
        let read = from.read_buf(&mut buffer).await?;
        if read == 0 {
            break;
        }
        to.write_all(&buffer).await?;
        copied.bytes += read as u64;
        if read == buffer.capacity() {
            #[cfg(target_os = "linux")]
            if let Ok(pipe) = splice::Pipe::new() {
                drop(buffer);
                copied.spliced = true;
                copied.bytes += splice::until_eof(from.as_ref(), to.as_ref(), &pipe).await?;
                break;
            }
        }
    }
    if !other_done.swap(true, Ordering::Relaxed) {
        socket2::SockRef::from(to.as_ref()).shutdown(Shutdown::Write)?;
    }
    Ok(copied)
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// The most one splice call moves; the pipe's capacity bounds it too. The default 64 KiB
    /// capacity is kept on purpose: a 1 MiB pipe measured 25% slower on loopback (cache misses).
    const SPLICE_CHUNK: usize = 1 << 20;

    pub struct Pipe {
        read_end: OwnedFd,
        write_end: OwnedFd,
    }

    impl Pipe {
        /// Fails when descriptors run out; the caller then keeps copying through its buffer.
        pub fn new() -> io::Result<Pipe> {
            let (read_end, write_end) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
            Ok(Pipe { read_end, write_end })
        }
    }

    /// Moves `from`→`to` through `pipe` until `from` reaches EOF. The pipe is emptied before the
    /// next fill, so a fill that would block means the socket has nothing to read (never that
    /// the pipe is full), and a drain that would block means `to` is full.
    pub async fn until_eof(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let mut copied = 0u64;
        loop {
            let filled = from
                .async_io(Interest::READABLE, || {
                    Ok(splice(from, None, &pipe.write_end, None, SPLICE_CHUNK, flags)?)
                })
                .await?;
            if filled == 0 {
                return Ok(copied);
            }
            let mut in_pipe = filled;
            while in_pipe > 0 {
                let drained = to
                    .async_io(Interest::WRITABLE, || {
                        Ok(splice(&pipe.read_end, None, to, None, in_pipe, flags)?)
                    })
                    .await?;
                if drained == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                in_pipe -= drained;
            }
            copied += filled as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair as pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A payload far larger than the buffer takes the splice path; small writes the buffer
    /// path; both must arrive intact and in order, and each EOF must be passed on.
    #[tokio::test]
    async fn copies_small_and_bulk_traffic_both_ways_with_half_close() {
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut upstream) = pair().await;
        let relay = tokio::spawn(async move {
            let (mut proxy_client_side, mut proxy_upstream_side) =
                (proxy_client_side, proxy_upstream_side);
            let (mut client_read, mut client_write) = proxy_client_side.split();
            let (mut upstream_read, mut upstream_write) = proxy_upstream_side.split();
            let one_done = AtomicBool::new(false);
            tokio::try_join!(
                one_way(&mut client_read, &mut upstream_write, &one_done),
                one_way(&mut upstream_read, &mut client_write, &one_done)
            )
        });

        let bulk: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = bulk.clone();
        let upstream_side = tokio::spawn(async move {
            let mut request = Vec::new();
            upstream.read_to_end(&mut request).await.unwrap();
            upstream.write_all(&sent).await.unwrap();
            upstream.shutdown().await.unwrap();
            request
        });

        client.write_all(b"GET /big\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();

        assert_eq!(upstream_side.await.unwrap(), b"GET /big\r\n");
        assert!(received == bulk, "bulk payload corrupted ({} bytes received)", received.len());
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!(up, Copied { bytes: 10, spliced: false });
        let expect_splice = cfg!(target_os = "linux");
        assert_eq!(down, Copied { bytes: bulk.len() as u64, spliced: expect_splice });
    }
}
