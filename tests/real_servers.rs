//! Issue 15 with the real servers that broke the pool: OpenSSH's sshd (drops unauthenticated
//! connections after `LoginGraceTime`) and MariaDB (after `connect_timeout`, 10 s by default),
//! each reached by its own client through the proxy with the pool on, logins spaced so that
//! every spare made meanwhile has died. Every login must succeed.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::real::{available, free_port, path, run, Running};
use common::*;
use poolsocks::pool::{DestStats, Pool};
use poolsocks::socks::TargetAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

async fn start_pool_proxy() -> (TestProxy, Pool) {
    let mut config = test_config();
    config.server.pool.enabled = true;
    let server = build_server(config).await.expect("build");
    let pool = server.pool().expect("pool on");
    (TestProxy::start_server(server).await, pool)
}

/// Waits until the destination holds no live spare: every spare made meanwhile was dropped by
/// the server (or retired), or none was made.
async fn await_no_live_spare(view: &mut watch::Receiver<DestStats>, within: Duration) -> DestStats {
    let waited = tokio::time::timeout(within, view.wait_for(|s| s.idle == 0 && s.is_quiet()))
        .await
        .map(|seen| seen.map(|stats| stats.clone()));
    match waited {
        Ok(Ok(stats)) => stats,
        _ => panic!("a spare stayed alive: {:?}", *view.borrow()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_ssh_logins_through_the_pool_with_gaps_longer_than_login_grace_time() {
    if !available("/usr/sbin/sshd", "openssh-server")
        || !available("ssh", "openssh-client")
        || !available("nc.openbsd", "netcat-openbsd")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let keygen = |name: &str| {
        run(
            "ssh-keygen",
            Command::new("ssh-keygen")
                .args(["-q", "-N", "", "-t", "ed25519", "-f"])
                .arg(dir.path().join(name)),
        )
    };
    keygen("host");
    keygen("client");
    std::fs::copy(dir.path().join("client.pub"), dir.path().join("keys")).expect("authorized keys");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let port = free_port();
    let sshd = Running::start(
        "sshd",
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f", "/dev/null", "-p", &port.to_string()])
            .args(["-o", "ListenAddress=127.0.0.1", "-h", &path(dir.path(), "host")])
            .args(["-o", &format!("AuthorizedKeysFile={}", path(dir.path(), "keys"))])
            .args(["-o", "StrictModes=no", "-o", "PidFile=none", "-o", "LoginGraceTime=2"])
            .args(["-o", "PermitRootLogin=prohibit-password"]),
    );
    sshd.await_line("Server listening", Duration::from_secs(10));

    let (proxy, pool) = start_pool_proxy().await;
    let target = TargetAddr::Ip(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut view = pool.watch_destination(&target).await.expect("watch");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    for login in 1..=10 {
        let mut ssh = Command::new("ssh");
        ssh.args(["-F", "/dev/null", "-i", &path(dir.path(), "client"), "-p", &port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20"])
            .arg("-o")
            .arg(format!("ProxyCommand=nc.openbsd -X 5 -x {} %h %p", proxy.addr))
            .arg(format!("{user}@127.0.0.1"))
            .arg(format!("echo login-{login}"));
        let out = tokio::task::spawn_blocking(move || run("ssh through the proxy", &mut ssh))
            .await
            .expect("ssh");
        assert_eq!(out.trim(), format!("login-{login}"));
        let rest = await_no_live_spare(&mut view, Duration::from_secs(20)).await;
        println!("after login {login}: {rest:?}");
    }
    let stats = view.borrow().clone();
    assert!(stats.policy.speaks_first, "sshd sends its banner first: {stats:?}");
    assert!(
        stats.counters.peer_closed + stats.counters.validation_drops >= 1,
        "spares were made and sshd dropped them: {stats:?}"
    );
    assert_eq!(stats.in_use, 0);
    proxy.stop().await;
    drop(sshd);
}

/// Forwards each connection accepted on a local port through the SOCKS proxy with OpenBSD
/// `nc.openbsd -X 5` (a SOCKS client nobody here wrote; ncat and traditional netcat take other
/// flags, so the OpenBSD one is named), for clients that cannot speak SOCKS.
async fn socks_forwarder(proxy: SocketAddr, target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind forwarder");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let child = tokio::process::Command::new("nc.openbsd")
                    .args(["-N", "-X", "5", "-x", &proxy.to_string()])
                    .arg(target.ip().to_string())
                    .arg(target.port().to_string())
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn();
                let Ok(mut child) = child else { return };
                let (Some(mut to_nc), Some(mut from_nc)) =
                    (child.stdin.take(), child.stdout.take())
                else {
                    return;
                };
                let (mut read, mut write) = client.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut read, &mut to_nc).await;
                    // Closing the pipe is nc's EOF (a child's stdin has no shutdown).
                    drop(to_nc);
                };
                let down = async {
                    let _ = tokio::io::copy(&mut from_nc, &mut write).await;
                    let _ = write.shutdown().await;
                };
                tokio::join!(up, down);
                let _ = child.wait().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_on_its_default_settings_stays_reachable_through_the_pool() {
    if !available("mariadbd", "mariadb-server")
        || !available("mariadb", "mariadb-client")
        || !available("nc.openbsd", "netcat-openbsd")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let datadir = path(dir.path(), "db");
    run(
        "mariadb-install-db",
        Command::new("mariadb-install-db").arg(format!("--datadir={datadir}")).args([
            "--auth-root-authentication-method=normal",
            "--user=root",
            "--skip-test-db",
        ]),
    );
    let port = free_port();
    let server = Running::start(
        "mariadbd",
        Command::new("mariadbd")
            .args(["--no-defaults", "--user=root", &format!("--datadir={datadir}")])
            .arg(format!("--socket={}", path(dir.path(), "sock")))
            .args([&format!("--port={port}"), "--bind-address=127.0.0.1"])
            .arg(format!("--pid-file={}", path(dir.path(), "pid"))),
    );
    server.await_line("ready for connections", Duration::from_secs(60));

    let (proxy, pool) = start_pool_proxy().await;
    let db = SocketAddr::from(([127, 0, 0, 1], port));
    let forwarder = socks_forwarder(proxy.addr, db).await;
    let target = TargetAddr::Ip(db);
    let mut view = pool.watch_destination(&target).await.expect("watch");
    for login in 1..=6 {
        let mut client = Command::new("mariadb");
        client
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &forwarder.port().to_string()])
            .args(["-u", "root", "--connect-timeout=20", "-N", "-e"])
            .arg(format!("SELECT {login} * 7"));
        let out =
            tokio::task::spawn_blocking(move || run("mariadb through the proxy", &mut client))
                .await
                .expect("mariadb");
        assert_eq!(out.trim(), (login * 7).to_string());
        // The next client comes after MariaDB's connect_timeout (10 s) killed any spare.
        let rest = await_no_live_spare(&mut view, Duration::from_secs(40)).await;
        println!("after login {login}: {rest:?}");
    }
    let stats = view.borrow().clone();
    assert!(stats.policy.speaks_first, "MariaDB sends its handshake first: {stats:?}");
    assert_eq!(stats.in_use, 0);
    proxy.stop().await;
    drop(server);
}
