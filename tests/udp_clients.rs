//! UDP ASSOCIATE with SOCKS clients nobody here wrote: PySocks' UDP socket, and Dante's
//! `socksify` running an ordinary (unsocksified) UDP program.
//!
//! Without python3 + PySocks, or socksify, root and iproute2, a test skips with a message,
//! except in CI (`CI` set), where it fails: `.ci/run` installs them.

mod common;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::netns::NetNs;
use common::udp::{eventually, UdpEcho};
use common::{test_config, TestProxy};
use poolsocks::resolve::StaticResolver;
use poolsocks::server::metrics::ServerMetrics;
use poolsocks::server::Server;
use tokio::process::Command;

const PROGRAM_DEADLINE: Duration = Duration::from_secs(60);

/// Skips outside CI, fails in CI.
fn missing(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI (.ci/run installs it)");
    }
    eprintln!("SKIPPED: {what}");
}

/// The real python3 binary (not a pyenv shim script, which socksify's LD_PRELOAD would
/// wrap instead of python), if it can import `socks` when `need_pysocks`.
async fn python(need_pysocks: bool) -> Option<String> {
    let check = if need_pysocks {
        "import socks, sys; print(sys.executable)"
    } else {
        "import sys; print(sys.executable)"
    };
    let out = Command::new("python3").args(["-c", check]).output().await.ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn proxy(resolver: StaticResolver) -> (TestProxy, Arc<ServerMetrics>) {
    let server =
        Server::build_with_resolver(test_config(), resolver.into_arc()).await.expect("builds");
    let metrics = server.metrics();
    (TestProxy::start_server(server).await, metrics)
}

const PYSOCKS_CLIENT: &str = r#"
import socket, sys
import socks
proxy_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)  # rdns: names go to the proxy
s.settimeout(10)
for host in ["127.0.0.1", "echo.test"]:
    payload = ("hello via " + host).encode()
    s.sendto(payload, (host, echo_port))
    data, source = s.recvfrom(65535)
    print(host, data.decode(), source[0], source[1], flush=True)
big = bytes(range(256)) * 200
s.sendto(big, ("127.0.0.1", echo_port))
data, _ = s.recvfrom(65535)
print("big", len(data), data == big, flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_goes_through_the_proxy_to_an_address_and_to_a_name() {
    let Some(python) = python(true).await else {
        return missing(
            "python3 with PySocks (`pip install pysocks` or `apt-get install python3-socks`)",
        );
    };
    let (proxy, metrics) =
        proxy(StaticResolver::new().with("echo.test", ["127.0.0.1".parse().expect("ip")])).await;
    let mut echo = UdpEcho::start().await;
    let out = tokio::time::timeout(
        PROGRAM_DEADLINE,
        Command::new(&python)
            .args([
                "-c",
                PYSOCKS_CLIENT,
                &proxy.addr.port().to_string(),
                &echo.addr.port().to_string(),
            ])
            .output(),
    )
    .await
    .expect("PySocks client finished in time")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PySocks client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = echo.addr.port();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("127.0.0.1 hello via 127.0.0.1 127.0.0.1 {port}"),
            // A name was resolved by the proxy; the reply header names the address it went to.
            format!("echo.test hello via echo.test 127.0.0.1 {port}"),
            "big 51200 True".to_string(),
        ]
    );
    // The echo saw the proxy's outbound socket each time, and the proxy counted it all.
    let (first, _) = echo.next().await;
    for _ in 0..2 {
        assert_eq!(echo.next().await.0, first, "one outbound socket per association");
    }
    let udp = metrics.snapshot().udp;
    assert_eq!((udp.datagrams_client_to_destination, udp.datagrams_destination_to_client), (3, 3));
    assert_eq!(udp.associations_total, 1);
    let metrics_after = metrics.clone();
    eventually("the association closed with PySocks' socket", || {
        metrics_after.snapshot().udp.associations_active == 0
    })
    .await;
    proxy.stop().await;
}

const ECHO_IN_NAMESPACE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7777))
print("ready", flush=True)
while True:
    data, source = s.recvfrom(65535)
    print("from", source[0], source[1], len(data), flush=True)
    s.sendto(data, source)
"#;

const PLAIN_UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(b"hello from an ordinary program", (sys.argv[1], 7777))
data, source = s.recvfrom(65535)
print(data.decode(), source[0], source[1], flush=True)
"#;

/// Dante's client library (`socksify`) turns an ordinary UDP program's sendto/recvfrom into a
/// UDP association. The destination is in a network namespace of the test's own, on a routed
/// address, so Dante cannot send it direct: the bytes must cross poolsocks (its counters say
/// so, and the program fails without UDP ASSOCIATE: Dante has no direct fallback here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socksify_runs_an_ordinary_udp_program_through_the_proxy() {
    if Command::new("socksify").arg("true").output().await.is_err() {
        return missing("socksify (`apt-get install dante-client`)");
    }
    let Some(python) = python(false).await else { return missing("python3") };
    let mut ns = match NetNs::create("sx") {
        Ok(ns) => ns,
        Err(e) => return missing(&format!("a network namespace ({e})")),
    };
    let service = ns.service.to_string();
    let echo = ns.spawn(&python, &["-c", ECHO_IN_NAMESPACE, &service]);
    let mut echo_out = BufReader::new(echo.stdout.take().expect("echo stdout"));
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let seen = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        echo_out.read_line(&mut line).expect("echo says ready");
        let _ = ready_tx.send(line.trim() == "ready");
        line.clear();
        echo_out.read_line(&mut line).expect("echo saw a datagram");
        line
    });
    let ready = tokio::time::timeout(PROGRAM_DEADLINE, ready).await;
    assert!(matches!(ready, Ok(Ok(true))), "the echo server in the namespace did not start");
    let (proxy, metrics) = proxy(StaticResolver::new()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("socks.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: stderr\n\
             route {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {}\n  \
             proxyprotocol: socks_v5\n  method: none\n  command: udpassociate\n}}\n",
            proxy.addr.port()
        ),
    )
    .expect("write socks.conf");
    let out = tokio::time::timeout(
        PROGRAM_DEADLINE,
        Command::new("socksify")
            .args([&python, "-c", PLAIN_UDP_CLIENT, &service])
            .env("SOCKS_CONF", &conf)
            .output(),
    )
    .await
    .expect("socksified program finished in time")
    .expect("socksify runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "socksified program failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), format!("hello from an ordinary program {service} 7777"));
    let seen =
        tokio::time::timeout(PROGRAM_DEADLINE, seen).await.expect("echo line").expect("reader");
    let fields: Vec<&str> = seen.split_whitespace().collect();
    assert_eq!(fields[0], "from");
    assert_eq!(fields[1].parse::<IpAddr>().expect("ip"), IpAddr::V4(ns.near), "via the veth pair");
    let udp = metrics.snapshot().udp;
    assert_eq!(udp.associations_total, 1, "Dante asked poolsocks for an association");
    assert_eq!((udp.datagrams_client_to_destination, udp.datagrams_destination_to_client), (1, 1));
    assert_eq!(udp.bytes_client_to_destination, 30);
    proxy.stop().await;
    drop(ns);
}
