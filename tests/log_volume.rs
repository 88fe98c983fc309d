//! Lines any client can cause are logged at most once per interval with a count held back:
//! a flood of untrusted PROXY-protocol connections, of clients outside `client_networks` or of
//! wrong passwords is a handful of lines, not one per connection. Against the built binary.

mod common;

use std::net::SocketAddr;

use common::daemon::Daemon;
use poolsocks::socks::METHOD_USERPASS;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const FLOOD: usize = 300;

/// Connects, optionally writes `bytes`, and waits for the daemon to close the connection.
async fn closed_by_daemon(proxy: SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    if !bytes.is_empty() {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, bytes).await;
    }
    let mut rest = Vec::new();
    let read = tokio::time::timeout(common::daemon::EVENT_DEADLINE, stream.read_to_end(&mut rest));
    assert!(read.await.is_ok(), "the daemon closes the connection");
}

/// Stops the daemon and counts its log lines containing `needle`.
fn lines_with(daemon: &mut Daemon, needle: &str) -> usize {
    daemon.signal(libc::SIGTERM);
    let lines = daemon.rest_of_log();
    lines.iter().filter(|line| line.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_proxy_protocol_sources_are_a_line_now_and_then() {
    let mut daemon = Daemon::start(
        "[server]\nbind_port = 0\nproxy_protocol = true\nproxy_protocol_trusted = [\"10.9.9.9/32\"]\n",
    );
    for _ in 0..FLOOD {
        closed_by_daemon(daemon.addr, b"").await;
    }
    let logged = lines_with(&mut daemon, "not in server.proxy_protocol_trusted");
    assert!((1..=2).contains(&logged), "{logged} lines for {FLOOD} connections");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_outside_client_networks_are_a_line_now_and_then() {
    let mut daemon =
        Daemon::start("[server]\nbind_port = 0\n[access]\nclient_networks = [\"10.0.0.0/8\"]\n");
    for _ in 0..FLOOD {
        closed_by_daemon(daemon.addr, b"").await;
    }
    let logged = lines_with(&mut daemon, "not allowed by access.client_networks");
    assert!((1..=2).contains(&logged), "{logged} lines for {FLOOD} connections");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_passwords_from_many_sources_are_a_line_now_and_then() {
    let mut daemon = Daemon::start(
        "[server]\nbind_port = 0\n[[auth.users]]\nusername = \"alice\"\npassword = \"right\"\n",
    );
    let mut login = vec![5, 1, METHOD_USERPASS, 1, 5];
    login.extend_from_slice(b"alice");
    login.push(5);
    login.extend_from_slice(b"wrong");
    for i in 0..FLOOD {
        // A source of its own each time, so the per-address limit never steps in.
        let source: std::net::IpAddr =
            format!("127.3.{}.{}", i / 200, 1 + i % 200).parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(source, 0)).expect("bind source");
        let mut stream = socket.connect(daemon.addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut stream, &login).await.expect("login");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(common::daemon::EVENT_DEADLINE, stream.read_to_end(&mut rest))
            .await;
        assert_eq!(rest, [5, METHOD_USERPASS, 1, 1], "method chosen, then the failure reply");
    }
    let logged = lines_with(&mut daemon, "authentication failed");
    assert!((1..=2).contains(&logged), "{logged} lines for {FLOOD} wrong passwords");
}
