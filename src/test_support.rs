//! Helpers shared by the crate's unit tests.

use tokio::net::{TcpListener, TcpStream};

/// A connected loopback TCP pair: (the connecting side, the accepted side).
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("its address");
    let (near, far) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (near.expect("connect"), far.expect("accept").0)
}
