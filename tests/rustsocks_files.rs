//! RustSocks config files against the built binary: its minimal default config passes
//! `--check` and serves `curl --socks5-hostname`; its full example (features on) is refused
//! naming the first enabled section poolsocks does not provide.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(name)
}

fn check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_poolsocks"))
        .arg("--check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run poolsocks --check")
}

#[test]
fn the_minimal_rustsocks_config_passes_check_with_a_summary() {
    let out = check(&fixture("valid/rustsocks_minimal.toml"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        ": ok",
        "listener        127.0.0.1:1080",
        "pool            off",
        "stats endpoint  off",
        "0 rule(s)",
        "auth.client_method = \"none\", [acl], sessions.enabled, [metrics], [qos]",
        "accepted, not used",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
    assert!(stdout.lines().count() <= 24, "one screen:\n{stdout}");
}

#[test]
fn the_full_rustsocks_example_is_refused_naming_an_enabled_section() {
    let out = check(&fixture("invalid/rustsocks_full.toml"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`acl.enabled` is true: [acl] is on"), "{stderr}");
    assert!(stderr.contains("poolsocks does not provide") && stderr.contains("[access]"));
    assert!(stderr.contains("line 52"), "{stderr}");
    assert!(!stderr.contains("not-a-real-secret"), "no password in the message: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_minimal_rustsocks_config_serves_curl_with_remote_dns() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let origin = listener.local_addr().expect("addr");
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
                let body = "served on a RustSocks file";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    // The file as RustSocks ships it, but on an ephemeral port and at info level (the test
    // reads the "listening" line, which RustSocks' "warn" would hide).
    let text = std::fs::read_to_string(fixture("valid/rustsocks_minimal.toml")).expect("read");
    let text = text.replace("bind_port = 1080", "bind_port = 0").replace("\"warn\"", "\"info\"");
    let daemon = Daemon::start(&text);
    let said = daemon.startup_log.iter().find(|l| l.contains("accepted, not used"));
    let said = said.unwrap_or_else(|| panic!("no info line: {:?}", daemon.startup_log));
    assert!(said.contains("INFO") && said.contains("[acl], sessions.enabled, [metrics], [qos]"));
    let listed = daemon.startup_log.iter().filter(|l| l.contains("accepted, not used")).count();
    assert_eq!(listed, 1, "listed once");

    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--socks5-hostname"])
        .arg(daemon.addr.to_string())
        .arg(format!("http://localhost:{}/", origin.port()))
        .output()
        .await;
    let output = match output {
        Ok(output) => output,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: curl not runnable ({e})");
            return;
        }
        Err(e) => panic!("curl is required in CI: {e}"),
    };
    assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "served on a RustSocks file");
}
