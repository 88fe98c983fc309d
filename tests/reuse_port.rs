//! `[server] reuse_port`: two daemons share one port (SO_REUSEPORT); one is stopped with
//! SIGTERM while clients loop on new sessions, and no connection is refused or cut.
//!
//! Closing one of several SO_REUSEPORT listeners resets the connections waiting in its accept
//! queue unless `net.ipv4.tcp_migrate_req = 1` (Linux 5.14+) moves them to a sibling: the test
//! sets it (root) for its run and restores the old value, as an operator would set it for good.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::daemon::Daemon;
use common::fleet::{free_port, is_root, SuccessCount};
use common::EchoServer;
use poolsocks::socks::{Command, Reply, ReplyCode, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIGRATE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `tcp_migrate_req` to 1 and puts the old value back on drop.
struct MigrateReq {
    old: String,
}

impl MigrateReq {
    fn enable() -> Option<MigrateReq> {
        let old = std::fs::read_to_string(MIGRATE).ok()?;
        if old.trim() == "1" {
            return Some(MigrateReq { old });
        }
        if !is_root() {
            return None;
        }
        std::fs::write(MIGRATE, "1").ok()?;
        Some(MigrateReq { old })
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE, self.old.trim());
    }
}

async fn session(proxy: SocketAddr, target: SocketAddr, body: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.write_all(&[5, 1, 0]).await?;
    let mut selection = [0u8; 2];
    stream.read_exact(&mut selection).await?;
    let mut buf = Vec::new();
    Request { command: Command::Connect, target: target.into() }.write_to(&mut buf);
    stream.write_all(&buf).await?;
    let reply =
        Reply::read_from(&mut stream).await.map_err(|e| std::io::Error::other(e.to_string()))?;
    if reply.code != ReplyCode::Succeeded {
        return Err(std::io::Error::other(format!("reply {:?}", reply.code)));
    }
    stream.write_all(body).await?;
    let mut back = vec![0u8; body.len()];
    stream.read_exact(&mut back).await?;
    if back != body {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

fn daemon_on(port: u16) -> Daemon {
    Daemon::start(&format!(
        "[server]\nbind_port = {port}\nreuse_port = true\nshutdown_grace_secs = 10\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_replaced_on_a_shared_port_refuses_no_connection() {
    let Some(_migrate) = MigrateReq::enable() else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root and can set {MIGRATE}");
        eprintln!("SKIPPED: {MIGRATE} is 0 and this is not root");
        return;
    };
    let echo = EchoServer::start().await;
    let port = free_port();
    let mut old = daemon_on(port);
    let new = daemon_on(port);
    assert_eq!(old.addr, new.addr, "both listen on one port");
    let proxy = old.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let succeeded = SuccessCount::new();
    let failed = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8u8)
        .map(|c| {
            let (stop, succeeded, failed) = (stop.clone(), succeeded.clone(), failed.clone());
            tokio::spawn(async move {
                let body = [c; 512];
                while !stop.load(Ordering::Relaxed) {
                    match session(proxy, echo.addr, &body).await {
                        Ok(()) => succeeded.add_one(),
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    succeeded.await_more(500).await;
    old.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| old.wait());
    assert!(status.success(), "the old instance exited {status:?}");
    // Everything from here on can only be served by the new instance.
    succeeded.await_more(500).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    let total = succeeded.get();
    eprintln!("{total} sessions, {} failed", failed.len());
    assert!(failed.is_empty(), "{} of {total} failed: {failed:?}", failed.len());
    let rest = old.rest_of_log();
    assert!(!rest.iter().any(|l| l.contains("cutting remaining sessions")), "{rest:#?}");
    drop(new);
}
