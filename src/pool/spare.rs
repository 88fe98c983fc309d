//! An idle spare: a never-used upstream connection, watched for a peer close while it waits.
//!
//! While idle, the stream is owned by a small watcher task that wakes only if the socket becomes
//! readable. EOF or an error means the peer closed it: the PoolManager is told at once and drops
//! it. Readable data is a server greeting (e.g. SMTP/FTP banners): it is left in the socket for
//! the client and watching stops (a close after a greeting is then caught at checkout, or not
//! at all if the greeting precedes it, in which case the client reads greeting then EOF, as it
//! would direct). The PoolManager takes the stream back by message before handing it out or
//! closing it, so a closed spare is really closed before its budget slot is released.

use std::io;
use std::mem::MaybeUninit;

use ractor::ActorRef;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::messages::{ManagerMsg, SlotId, SpareId};

pub(crate) struct Spare {
    pub id: SpareId,
    pub slot: SlotId,
    pub pooled_at: Instant,
    give_back: oneshot::Sender<()>,
    watcher: JoinHandle<Option<TcpStream>>,
}

impl Spare {
    pub fn watch(
        stream: TcpStream,
        id: SpareId,
        slot: SlotId,
        manager: ActorRef<ManagerMsg>,
    ) -> Self {
        let (give_back, give_back_rx) = oneshot::channel();
        let watcher = tokio::spawn(watch(stream, id, manager, give_back_rx));
        Spare { id, slot, pooled_at: Instant::now(), give_back, watcher }
    }

    /// Takes the stream back from the watcher. `None` if the watcher is gone (it cannot
    /// happen short of a panic in it; the stream is then already closed).
    pub async fn reclaim(self) -> Option<TcpStream> {
        let _ = self.give_back.send(());
        self.watcher.await.ok().flatten()
    }
}

async fn watch(
    stream: TcpStream,
    id: SpareId,
    manager: ActorRef<ManagerMsg>,
    mut give_back: oneshot::Receiver<()>,
) -> Option<TcpStream> {
    let mut byte = [0u8; 1];
    let mut watching = true;
    loop {
        let asked = tokio::select! {
            biased;
            asked = &mut give_back => asked,
            peeked = stream.peek(&mut byte), if watching => {
                watching = false;
                if !matches!(peeked, Ok(n) if n > 0) {
                    // EOF or reset while idle; if the manager is gone the stream goes with us.
                    let _ = manager.cast(ManagerMsg::PeerClosed { spare: id });
                }
                continue;
            }
        };
        // A dropped sender means the PoolManager died: the stream must not outlive it.
        return asked.ok().map(|()| stream);
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
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

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
