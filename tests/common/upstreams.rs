//! Upstream echo servers that count the connections open at them (all of them together), so a
//! test counts spares where they are really held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Upstreams {
    pub addrs: Vec<SocketAddr>,
    pub open: watch::Receiver<usize>,
}

impl Upstreams {
    /// `count` echo servers on 127.0.0.1, each on its own port.
    pub async fn start(count: usize) -> Upstreams {
        let (tx, open) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let mut addrs = Vec::new();
        for _ in 0..count {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
            addrs.push(listener.local_addr().expect("addr"));
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    tx.send_modify(|n| *n += 1);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let (mut reader, mut writer) = stream.split();
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                        tx.send_modify(|n| *n -= 1);
                    });
                }
            });
        }
        Upstreams { addrs, open }
    }

    /// Awaits exactly `count` connections open at the upstreams together.
    pub async fn await_open(&mut self, count: usize) {
        let waited =
            tokio::time::timeout(Duration::from_secs(20), self.open.wait_for(|n| *n == count));
        let reached = matches!(waited.await, Ok(Ok(_)));
        assert!(reached, "{} open at the upstreams, not {count}", *self.open.borrow());
    }
}
