//! File-descriptor exhaustion: with a low RLIMIT_NOFILE the accept loop backs off, logs once
//! per burst, burns no CPU while it waits, and serves again once descriptors free up.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::daemon::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FD_LIMIT: libc::rlim_t = 48;
const STATS_PORT: u16 = 19_193;
const STARVED_CONFIG: &str = "[server]\nbind_port = 0\nhandshake_timeout_ms = 60000\n\
    [sessions]\nstats_api_enabled = true\nstats_api_port = 19193\n";

/// User + system CPU time of `pid` in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_backs_off_on_emfile_logs_once_and_recovers() {
    let mut daemon = Daemon::start_with(STARVED_CONFIG, |command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child being spawned.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: FD_LIMIT, rlim_max: FD_LIMIT };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });

    // More clients than the daemon has descriptors. Each says hello; the admitted ones are
    // answered, the rest wait in the kernel's backlog.
    let mut clients = Vec::new();
    for _ in 0..FD_LIMIT + 16 {
        let mut client =
            TcpStream::connect(daemon.addr).await.expect("kernel accepts into backlog");
        client.write_all(&[5, 1, 0]).await.expect("greeting");
        clients.push(client);
    }
    daemon.await_log("accept failed; backing off");

    // The stats endpoint is starved too: clients of it must not turn into a log line each.
    let mut stats_clients = Vec::new();
    for _ in 0..8 {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", STATS_PORT)).await {
            stats_clients.push(stream);
        }
    }

    // While starved it must not spin: measure its CPU over a one-second window.
    let pid = daemon.child.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1)); // a measurement window, not synchronisation
    let burned = cpu_ticks(pid) - before;
    assert!(burned < 20, "accept loop burned {burned} ticks in 1 s while out of descriptors");
    let log = daemon.log_so_far();
    let repeats = log.iter().filter(|line| line.contains("accept failed")).count();
    // At most the stats endpoint's first line: both loops log once, not per error.
    assert!(repeats <= 1, "accept errors must be logged once per burst, not per error: {log:#?}");
    drop(stats_clients);

    // Free descriptors: the daemon picks up the waiting clients and serves them.
    let half = clients.len() / 2;
    clients.drain(..half); // the oldest ones hold the daemon's descriptors
    daemon.await_log("accepting again after a burst of accept errors");
    let mut fresh = TcpStream::connect(daemon.addr).await.expect("connect");
    fresh.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut selection = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(20), fresh.read_exact(&mut selection))
        .await
        .expect("served again after descriptors freed up")
        .expect("selection");
    assert_eq!(selection, [5, 0]);
}
