//! An idle spare: a never-used upstream connection, watched for a peer close while it waits.
//!
//! The PoolManager owns the stream itself, so a checkout hands it out at once (no other task to
//! wait for). Watching costs no task either: the manager registers a waker with tokio's I/O
//! driver for the socket's readability (`Spare::watch`); the driver calls it if the socket
//! becomes readable, and the waker sends `SpareReadable` to the manager, which looks at the
//! socket ([`probe`]). EOF or an error means the peer closed it: the manager drops it at once.
//! Readable data is a server greeting (e.g. SMTP/FTP banners): it is left in the socket for the
//! client and watching stops (a close after a greeting is then caught at checkout, or not at all
//! if the greeting precedes it, in which case the client reads greeting then EOF, as it would
//! direct). A closed spare is dropped by the manager before its budget slot is released.
//!
//! Once the stream is handed out, the client's first read replaces the waker (tokio keeps one
//! reader waker per socket); until then a wake finds no spare with that id and is ignored.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
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
    pub pooled_at: Instant,
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
    pub fn new(stream: TcpStream, id: SpareId, slot: SlotId) -> Self {
        Spare { id, slot, pooled_at: Instant::now(), stream }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
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

    /// Looks at the socket after a wake-up. Only when nothing is there is tokio's cached
    /// readiness cleared (so the next [`Spare::watch`] waits for a new event), and only the
    /// readiness seen *before* looking: `try_io` keeps an event that arrives while the probe
    /// runs. Clearing after a separate probe could swallow a greeting or FIN that landed in
    /// between, and a greeting handed out with its readiness cleared would never wake the relay.
    pub fn probe_after_wake(&self) -> Probe {
        let looked = self.stream.try_io(Interest::READABLE, || match probe(&self.stream) {
            Probe::Quiet => Err(io::ErrorKind::WouldBlock.into()),
            seen => Ok(seen),
        });
        // WouldBlock: quiet (readiness cleared), or not marked ready at all (a stale wake).
        looked.unwrap_or(Probe::Quiet)
    }
}

/// What a non-blocking look at a spare found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Open, nothing to read.
    Quiet,
    /// Open with unread bytes: a greeting, left in place for the client.
    Greeting,
    /// The peer closed it (EOF) or it is broken.
    Closed,
}

/// Looks at the socket without blocking and without consuming anything (MSG_PEEK on the
/// non-blocking fd, asked of the kernel directly rather than tokio's readiness cache).
pub fn probe(stream: &TcpStream) -> Probe {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1];
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

    #[tokio::test]
    async fn probe_tells_quiet_greeting_and_closed_apart() {
        let (client, mut server) = pair().await;
        assert_eq!(probe(&client), Probe::Quiet);
        server.write_all(b"hello").await.unwrap();
        client.readable().await.unwrap();
        assert_eq!(probe(&client), Probe::Greeting);
        // Peeking twice still sees the bytes: nothing was consumed.
        assert_eq!(probe(&client), Probe::Greeting);

        let (client, server) = pair().await;
        drop(server);
        client.readable().await.unwrap();
        assert_eq!(probe(&client), Probe::Closed);
    }
}
