//! An idle spare: a never-used upstream connection, watched for its server's close while it
//! waits.
//!
//! The PoolManager owns the stream itself, so a checkout hands it out at once (no other task to
//! wait for). Watching costs no task either: the manager registers a waker with tokio's I/O
//! driver for the socket's readability (`Spare::watch`); the driver calls it when the socket
//! becomes readable, and the waker sends `SpareReadable` to the manager, which looks at the
//! socket ([`probe`]).
//!
//! # Telling a dead spare from a live one
//! [`probe`] asks the kernel with `poll(2)` for `POLLRDHUP`, `POLLHUP` and `POLLERR` as well as
//! `POLLIN`. `POLLRDHUP` is set once the server's FIN has arrived and `POLLHUP`/`POLLERR` once
//! it reset the connection, *whatever unread bytes sit before them*. A peek cannot tell: behind
//! a greeting it returns the greeting, so a spare whose server sent a banner and then closed
//! (sshd after `LoginGraceTime`, SMTP's `421`, MariaDB after `connect_timeout`) looked alive and
//! was handed out to a client that read the stale banner and then EOF or a reset.
//!
//! A spare that receives bytes while idle is a server that speaks first: its greeting stays in
//! the socket for the client. The manager then clears tokio's readable readiness (the closed
//! state it keeps) and watches again, so the server's later close still wakes it; because the
//! cleared readiness would leave the client's first read waiting for an edge that already
//! came, such a spare is re-registered with the I/O driver when it is handed out
//! (`Spare::into_stream`), which reports the waiting bytes afresh.
//!
//! Once the stream is handed out, the client's first read replaces the waker (tokio keeps one
//! reader waker per socket); until then a wake finds no spare with that id and is ignored.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use ractor::ActorRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::messages::{ManagerMsg, SlotId, SpareId};

pub(crate) struct Spare {
    pub id: SpareId,
    pub slot: SlotId,
    /// When its dial completed: its age, against `idle_timeout` and the server's idle limit.
    pub born: Instant,
    /// When it last entered the pool: the trim grace and the hand-out order count from here.
    pub pooled_at: Instant,
    /// Its server sent bytes unprompted (a greeting), still unread in the socket.
    pub greeted: bool,
    stream: TcpStream,
}

/// The waker the I/O driver calls when an idle spare's socket becomes readable.
struct ReadableAlarm {
    manager: ActorRef<ManagerMsg>,
    spare: SpareId,
}

impl Wake for ReadableAlarm {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // If the manager is gone its spares went with it: nothing to tell.
        let _ = self.manager.cast(ManagerMsg::SpareReadable { spare: self.spare });
    }
}

impl Spare {
    pub fn new(stream: TcpStream, id: SpareId, slot: SlotId, born: Instant) -> Self {
        Spare { id, slot, born, pooled_at: Instant::now(), greeted: false, stream }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The stream, ready for a client. A greeted spare is re-registered with the I/O driver so
    /// its unread greeting wakes the client's first read (see the module docs).
    pub fn into_stream(self) -> io::Result<TcpStream> {
        if !self.greeted {
            return Ok(self.stream);
        }
        TcpStream::from_std(self.stream.into_std()?)
    }

    /// Has `manager` told (`SpareReadable`) when the socket becomes readable: at once, by
    /// message, if it already is. After a wake-up, look with [`Spare::probe_after_wake`] before
    /// watching again: it clears the stale readiness that would otherwise wake it at once.
    pub fn watch(&self, manager: &ActorRef<ManagerMsg>) {
        let alarm = Arc::new(ReadableAlarm { manager: manager.clone(), spare: self.id });
        let waker = Waker::from(alarm);
        // Unconstrained: out of cooperative budget, tokio would answer Pending without
        // registering the waker (and wake it at once instead): a wasted round trip. The
        // wrapper completes on its first poll and never keeps the context it is polled with.
        let mut cx = Context::from_waker(&waker);
        let register = pin!(tokio::task::unconstrained(poll_fn(|cx: &mut Context<'_>| {
            Poll::Ready(self.stream.poll_read_ready(cx).is_ready())
        })));
        let ready = register.poll(&mut cx);
        if matches!(ready, Poll::Ready(true)) {
            waker.wake();
        }
    }

    /// Looks at the socket after a wake-up. Unless it is closed, tokio's readable readiness is
    /// cleared (so the next [`Spare::watch`] waits for a new event: more bytes, or the close),
    /// and only the readiness seen *before* looking: `try_io` keeps an event that arrives while
    /// the probe runs. A greeting marks the spare `greeted`.
    pub fn probe_after_wake(&mut self) -> Probe {
        let looked = self.stream.try_io(Interest::READABLE, || match probe(&self.stream) {
            Probe::Closed => Ok(Probe::Closed),
            seen => Err(io::Error::new(io::ErrorKind::WouldBlock, ProbeSeen(seen))),
        });
        let seen = match looked {
            Ok(seen) => seen,
            // Ours: the probe's finding, readiness cleared.
            Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<ProbeSeen>()) {
                Some(ProbeSeen(seen)) => *seen,
                // Not marked ready at all (a stale wake): look without touching readiness.
                None => probe(&self.stream),
            },
        };
        if seen == Probe::Greeting {
            self.greeted = true;
        }
        seen
    }
}

/// What the probe found, carried out of `try_io` inside its `WouldBlock` error.
#[derive(Debug)]
struct ProbeSeen(Probe);

impl std::fmt::Display for ProbeSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spare probe: {:?}", self.0)
    }
}

impl std::error::Error for ProbeSeen {}

/// What a non-blocking look at a spare found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Open, nothing to read.
    Quiet,
    /// Open with unread bytes: a greeting, left in place for the client.
    Greeting,
    /// The peer closed it (FIN) or reset it, or it is broken, with or without unread bytes.
    Closed,
}

/// Looks at the socket without blocking and without consuming anything: `poll(2)` with a zero
/// timeout, asked of the kernel directly rather than tokio's readiness cache.
#[cfg(target_os = "linux")]
pub fn probe(stream: &TcpStream) -> Probe {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let now = Timespec { tv_sec: 0, tv_nsec: 0 };
    match poll(&mut fds, Some(&now)) {
        Ok(0) => Probe::Quiet,
        Ok(_) => {
            let seen = fds[0].revents();
            let dead = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
            if seen.intersects(dead) {
                Probe::Closed
            } else if seen.contains(PollFlags::IN) {
                Probe::Greeting
            } else {
                Probe::Quiet
            }
        }
        Err(rustix::io::Errno::INTR) => Probe::Quiet,
        Err(_) => Probe::Closed,
    }
}

/// Elsewhere a peek is all there is: EOF or an error is a close, bytes a greeting (a close
/// behind a greeting goes unseen there).
#[cfg(not(target_os = "linux"))]
pub fn probe(stream: &TcpStream) -> Probe {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(stream).peek(&mut buf) {
        Ok(0) => Probe::Closed,
        Ok(_) => Probe::Greeting,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Probe::Quiet,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Probe::Quiet,
        Err(_) => Probe::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tcp_pair as pair;
    use tokio::io::AsyncWriteExt;

    /// Waits until the kernel has the server's close (or bytes) for `client`.
    async fn settle(client: &TcpStream) {
        client.readable().await.unwrap();
    }

    #[tokio::test]
    async fn probe_tells_quiet_greeting_and_closed_apart() {
        let (client, mut server) = pair().await;
        assert_eq!(probe(&client), Probe::Quiet);
        server.write_all(b"hello").await.unwrap();
        settle(&client).await;
        assert_eq!(probe(&client), Probe::Greeting);
        // Probing twice still sees the bytes: nothing was consumed.
        assert_eq!(probe(&client), Probe::Greeting);
    }

    #[tokio::test]
    async fn a_fin_is_seen_with_and_without_a_greeting_before_it() {
        let (client, server) = pair().await;
        drop(server);
        settle(&client).await;
        assert_eq!(probe(&client), Probe::Closed, "FIN, nothing unread");

        let (client, mut server) = pair().await;
        server.write_all(b"220 ready\r\n421 idle timeout\r\n").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        // Wait for the FIN itself, not only the bytes before it.
        let mut deadline = 0;
        while probe(&client) != Probe::Closed && deadline < 1_000 {
            tokio::task::yield_now().await;
            client.readable().await.unwrap();
            deadline += 1;
        }
        assert_eq!(probe(&client), Probe::Closed, "FIN behind a greeting");
        // The bytes are still there: the probe consumed nothing.
        let mut peeked = [0u8; 3];
        assert_eq!(client.peek(&mut peeked).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_reset_is_seen_with_and_without_a_greeting_before_it() {
        for greeting in [&b""[..], b"5.5.5-10.11.6-MariaDB\0"] {
            let (client, mut server) = pair().await;
            if !greeting.is_empty() {
                server.write_all(greeting).await.unwrap();
            }
            // Linger 0: the close sends RST, as a server's connect_timeout does.
            socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(server);
            let mut spins = 0;
            while probe(&client) != Probe::Closed && spins < 1_000 {
                client.readable().await.unwrap();
                tokio::task::yield_now().await;
                spins += 1;
            }
            assert_eq!(
                probe(&client),
                Probe::Closed,
                "RST after {} greeting bytes",
                greeting.len()
            );
        }
    }
}
