//! The built `poolsocks` binary as a separate process: real clients (curl), CLI flags and
//! graceful shutdown on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::daemon::{Daemon, EVENT_DEADLINE};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A minimal HTTP/1.1 origin on 127.0.0.1 that answers every request with `body` and closes.
async fn http_origin(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// Runs curl; `None` when curl is not installed and this is not CI (CI installs it, so there
/// a missing curl fails the test instead of skipping it).
async fn curl(args: &[String]) -> Option<(bool, String)> {
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .await;
    match output {
        Ok(output) => {
            Some((output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned()))
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "SKIPPED: curl not runnable ({e}); install it with `apt-get install -y curl`"
            );
            None
        }
        Err(e) => panic!("curl is required in CI: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_fetches_through_the_daemon_with_remote_dns() {
    let origin = http_origin("hello from origin").await;
    let daemon = Daemon::start("[server]\nbind_port = 0\n");
    let Some((ok, body)) = curl(&[
        "--socks5-hostname".into(),
        daemon.addr.to_string(),
        format!("http://localhost:{}/index.txt", origin.port()),
    ])
    .await
    else {
        return;
    };
    assert!(ok, "curl failed");
    assert_eq!(body, "hello from origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_with_username_and_password() {
    let origin = http_origin("secret page").await;
    let daemon = Daemon::start(
        "[server]\nbind_port = 0\n[[auth.users]]\nusername = \"alice\"\npassword = \"pa:ss word\"\n",
    );
    let url = format!("http://127.0.0.1:{}/", origin.port());
    let proxy = daemon.addr.to_string();
    let Some((ok, body)) = curl(&[
        "--socks5".into(),
        proxy.clone(),
        "--proxy-user".into(),
        "alice:pa:ss word".into(),
        url.clone(),
    ])
    .await
    else {
        return;
    };
    assert!(ok, "curl with the right password failed");
    assert_eq!(body, "secret page");

    let (ok, body) = curl(&[
        "--socks5".into(),
        proxy.clone(),
        "--proxy-user".into(),
        "alice:wrong".into(),
        url.clone(),
    ])
    .await
    .unwrap_or_default();
    assert!(!ok && body.is_empty(), "wrong password must not get through");
    let (ok, _) = curl(&["--socks5".into(), proxy, url]).await.unwrap_or_default();
    assert!(!ok, "no credentials must not get through");
}

#[test]
fn check_flag_validates_and_exits() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let run = |file: &str| {
        Command::new(env!("CARGO_BIN_EXE_poolsocks"))
            .arg("--check")
            .arg("--config")
            .arg(fixtures.join(file))
            .output()
            .expect("run poolsocks --check")
    };
    let ok = run("valid/rustsocks_pool.toml");
    assert!(ok.status.success());
    let bad = run("invalid/per_dest_over_total.toml");
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("server.pool.max_idle_per_dest") && stderr.contains("line 5"),
        "{stderr}"
    );
}

#[test]
fn print_default_config_prints_the_embedded_file_which_checks_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_poolsocks"))
        .arg("--print-default-config")
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(text, poolsocks::config::DEFAULT_CONFIG_TOML);
    let parsed =
        poolsocks::config::Config::from_toml(&text, None).expect("default config is valid");
    assert_eq!(parsed, poolsocks::config::Config::default());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_transfer_lets_the_transfer_finish_then_exits_0() {
    // The origin sends half, waits for the test's go-ahead (given after SIGTERM was logged),
    // then sends the rest and closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = listener.local_addr().expect("addr");
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let expected = payload.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(&payload[..500_000]).await.expect("first half");
        let _ = go_rx.await;
        stream.write_all(&payload[500_000..]).await.expect("second half");
    });

    let mut daemon = Daemon::start("[server]\nbind_port = 0\nshutdown_grace_secs = 30\n");
    let mut client = TcpStream::connect(daemon.addr).await.expect("connect");
    client.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut wire = Vec::new();
    poolsocks::socks::Request {
        command: poolsocks::socks::Command::Connect,
        target: origin.into(),
    }
    .write_to(&mut wire);
    client.write_all(&wire).await.expect("request");
    let mut head = [0u8; 2 + 10];
    client.read_exact(&mut head).await.expect("selection + reply");
    assert_eq!(head[3], 0, "CONNECT succeeded");
    let mut received = vec![0u8; 500_000];
    client.read_exact(&mut received).await.expect("first half");

    daemon.signal(libc::SIGTERM);
    daemon.await_log("draining sessions");
    // The listener is closed: new clients are refused while the old session drains.
    assert!(TcpStream::connect(daemon.addr).await.is_err(), "listener still open during drain");
    let _ = go_tx.send(());
    client.read_to_end(&mut received).await.expect("rest of the transfer");
    assert!(received == expected, "transfer corrupted or cut ({} bytes)", received.len());
    drop(client);
    let status = tokio::task::spawn_blocking(move || daemon.wait()).await.expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_still_open_after_the_grace_period_are_cut_and_the_daemon_exits_0() {
    let echo_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = echo_listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Accept and hold the connection open without ever closing it.
        let held = echo_listener.accept().await;
        std::future::pending::<()>().await;
        drop(held);
    });
    let mut daemon = Daemon::start("[server]\nbind_port = 0\nshutdown_grace_secs = 1\n");
    let mut client = TcpStream::connect(daemon.addr).await.expect("connect");
    client.write_all(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1]).await.expect("greeting + request head");
    client.write_all(&origin.port().to_be_bytes()).await.expect("port");
    let mut head = [0u8; 12];
    client.read_exact(&mut head).await.expect("reply");
    assert_eq!(head[3], 0);

    daemon.signal(libc::SIGINT);
    daemon.await_log("grace period over");
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(EVENT_DEADLINE, client.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "session was not cut");
    let status = tokio::task::spawn_blocking(move || daemon.wait()).await.expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_reach_the_log_even_at_trace_level() {
    let mut echo = common::EchoServer::start().await;
    let mut daemon = Daemon::start(
        "[server]\nbind_port = 0\n[[auth.users]]\nusername = \"alice\"\npassword = \"Tr0ub4dor&3\"\n\
         [logging]\nlevel = \"trace\"\n",
    );
    let (mut stream, reply) =
        common::connect_with_password(daemon.addr, echo.addr.into(), "alice", "Tr0ub4dor&3").await;
    assert_eq!(reply.code, poolsocks::socks::ReplyCode::Succeeded);
    assert_eq!(common::round_trip(&mut stream, b"payload").await, b"payload");
    assert!(echo.accepted.recv().await.is_some());
    drop(stream);
    for (user, password) in [("alice", "Wr0ngGuess!"), ("mallory", "Tr0ub4dor&3")] {
        let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
        common::greet(&mut stream, &[poolsocks::socks::METHOD_USERPASS]).await;
        assert!(!common::authenticate(&mut stream, user, password).await.success);
    }
    daemon.signal(libc::SIGTERM);
    let log = tokio::task::spawn_blocking(move || {
        let log = daemon.rest_of_log();
        assert!(daemon.wait().success());
        log
    })
    .await
    .expect("log");
    assert!(log.iter().any(|line| line.contains("authentication failed")), "failures are logged");
    for line in &log {
        assert!(
            !line.contains("Tr0ub4dor") && !line.contains("Wr0ngGuess"),
            "secret in log: {line}"
        );
    }
}

/// Starts the daemon with `soft`/`hard` open-file limits set in the child before exec.
fn daemon_with_nofile(config: &str, soft: u64, hard: u64) -> Daemon {
    use std::os::unix::process::CommandExt;
    Daemon::start_with(config, move |command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child being spawned.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

/// The soft open-file limit of a running process, from /proc.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("nofile line");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).expect("soft limit value")
}

#[test]
fn raises_its_open_file_limit_to_what_max_connections_needs() {
    // 3 descriptors per session (two, and one kept for lookups, UDP and BIND) + 50 spares +
    // 128 reserved.
    let config = "[server]\nbind_port = 0\nmax_connections = 1000\n\
                  [server.pool]\nenabled = true\nmax_total_idle = 50\n";
    let daemon = daemon_with_nofile(config, 256, 8192);
    let said = daemon.startup_log.iter().any(|l| l.contains("raised the open-file limit"));
    assert!(said, "the raise is logged: {:?}", daemon.startup_log);
    assert_eq!(soft_nofile(daemon.child.id()), 3178);
}

#[test]
fn warns_with_the_figures_when_the_hard_limit_is_too_low() {
    let config = "[server]\nbind_port = 0\nmax_connections = 1000\n";
    let daemon = daemon_with_nofile(config, 256, 600);
    let warning = "open-file hard limit is below what max_connections needs";
    let line = daemon.startup_log.iter().find(|l| l.contains(warning));
    let line = line.unwrap_or_else(|| panic!("no warning in {:?}", daemon.startup_log));
    assert!(line.contains("3128"), "the warning names what is needed: {line}");
    assert!(line.contains("157"), "and how many sessions fit: {line}");
    assert!(line.contains("server.max_connections = 157"), "and the simpler fix: {line}");
    // It still raised the soft limit as far as the hard limit allows.
    assert_eq!(soft_nofile(daemon.child.id()), 600);
}

/// A stop the moment the daemon says it is listening (as a supervisor may send one) is a
/// graceful one: the signal handlers are in place before that line, so the daemon drains and
/// exits 0 instead of being killed by SIGTERM's default action.
#[test]
fn sigterm_as_soon_as_listening_is_logged_is_a_graceful_stop() {
    for _ in 0..20 {
        let mut daemon = Daemon::start("[server]\nbind_port = 0\n");
        daemon.signal(libc::SIGTERM);
        let status = daemon.wait();
        assert!(status.success(), "stopped by {status:?}");
    }
}

/// `--check` and `--print-default-config` into a pipe whose reader is gone (`| head -1` that
/// already has its line): exit 0, no panic.
#[test]
fn output_into_a_closed_pipe_is_not_a_crash() {
    for args in [&["--check"][..], &["--print-default-config"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_poolsocks"))
            .args(args)
            .stdout(writer)
            .output()
            .expect("run poolsocks");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {:?} {stderr}", output.status);
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `poolsocks hash-password` turns `echo pw |` into a PHC string (the line ending is not part
/// of the password) that logs in with that password and no other.
#[tokio::test(flavor = "multi_thread")]
async fn hash_password_prints_a_string_the_daemon_accepts() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_poolsocks"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run hash-password");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"alice pw\n")
        .expect("write password");
    let output = child.wait_with_output().expect("hash-password output");
    assert!(output.status.success());
    let phc = String::from_utf8(output.stdout).expect("utf-8");
    let phc = phc.trim_end();
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");

    let echo = common::EchoServer::start().await;
    let daemon = Daemon::start(&format!(
        "[server]\nbind_port = 0\n[[auth.users]]\nusername = \"alice\"\npassword = \"{phc}\"\n"
    ));
    let (mut stream, reply) =
        common::connect_with_password(daemon.addr, echo.addr.into(), "alice", "alice pw").await;
    assert_eq!(reply.code, poolsocks::socks::ReplyCode::Succeeded);
    assert_eq!(common::round_trip(&mut stream, b"in").await, b"in");
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    common::greet(&mut stream, &[poolsocks::socks::METHOD_USERPASS]).await;
    let refused = common::authenticate(&mut stream, "alice", "alice pw\n").await;
    assert!(!refused.success, "the newline is not part of the password");
}
