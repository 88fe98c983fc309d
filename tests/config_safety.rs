//! Config files the daemon cannot trust: what a refused file shows (never a value it holds),
//! what sits at the path (a FIFO, a device, a huge file), a file cut short that still parses,
//! and signals that have no meaning. Against the built binary, as an operator would meet them.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::daemon::Daemon;
use common::http_get;
use poolsocks::socks::{ReplyCode, METHOD_NO_ACCEPTABLE, METHOD_NO_AUTH};
use tokio::net::TcpStream;

const STATS: &str = "[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n";

async fn serves(proxy: SocketAddr, echo: SocketAddr) -> bool {
    let (mut stream, reply) = common::connect(proxy, echo.into()).await;
    reply.code == ReplyCode::Succeeded && common::round_trip(&mut stream, b"ok").await == b"ok"
}

/// Files that do not parse, each hiding a secret where toml's own message would quote it.
const LEAKY: [(&str, &str); 5] = [
    ("[[auth.users]]\nusername = \"alice\"\npassword = Alice-PW-s3cr3t-XYZ\n", "s3cr3t"),
    ("[sessions]\nstats_api_token = Tok3n-Secret-Q9\n", "Secret-Q9"),
    (
        "[[auth.users]]\nusername = \"bob\"\npassword = $argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g\n",
        "aGFzaGhhc2g",
    ),
    ("[[auth.users]]\nusername = \"carol\"\npassword = \"Carol-PW-cut-mid\n", "cut-mid"),
    ("[sessions]\nstats_api_token = 73915824\n", "73915824"),
];

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_file_names_the_key_and_line_but_never_a_value_it_holds() {
    let base = format!("[server]\nbind_port = 0\n{STATS}");
    let mut daemon = Daemon::start(&base);
    let stats = daemon.await_stats_addr();
    for (bad, secret) in LEAKY {
        // Keys of [sessions] go into the daemon's own [sessions] table.
        let file = match bad.strip_prefix("[sessions]\n") {
            Some(keys) => format!("{base}{keys}"),
            None => format!("{base}{bad}"),
        };
        daemon.write_config(&file);
        daemon.signal(libc::SIGHUP);
        let line = daemon.await_log("config reload refused");
        assert!(line.contains("line ") && line.contains("TOML parse error"), "{line}");
        assert!(!line.contains("duplicate"), "the file is the one meant: {line}");
        assert!(!line.contains(secret), "log: {line}");
        let status = http_get(stats, "/api/pool/stats").await;
        assert!(status.contains("last_reload_error"), "{status}");
        assert!(!status.contains(secret), "stats: {status}");
        let events = http_get(stats, "/api/telemetry/events?category=config").await;
        assert!(events.contains("config reload refused"), "{events}");
        assert!(!events.contains(secret), "telemetry: {events}");

        // The same file at start (the journal gets stderr), and under --check.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, bad).expect("write");
        for check in [false, true] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_poolsocks"));
            command.arg("--config").arg(&path);
            if check {
                command.arg("--check");
            }
            let output = command.output().expect("run poolsocks");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("invalid config") && stderr.contains("line "), "{stderr}");
            assert!(!stderr.contains(secret), "stderr: {stderr}");
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_a_device_or_a_huge_file_at_the_path_is_refused_while_everyone_is_served() {
    let echo = common::EchoServer::start().await;
    let mut daemon = Daemon::start(&format!("[server]\nbind_port = 0\n{STATS}"));
    let stats = daemon.await_stats_addr();
    let path = daemon.config_path();
    let pid = daemon.child.id();

    // A FIFO no one writes to: reading it would wait forever.
    std::fs::remove_file(&path).expect("remove");
    let made = Command::new("mkfifo").arg(&path).status().expect("mkfifo");
    assert!(made.success());
    daemon.signal(libc::SIGHUP);
    let line = daemon.await_log("config reload refused");
    assert!(line.contains("a FIFO, not a regular file"), "{line}");
    assert!(serves(daemon.addr, echo.addr).await, "sessions served after a FIFO");
    assert!(http_get(stats, "/health").await.starts_with("HTTP/1.1 200"));

    // A link to /dev/zero: endless bytes.
    std::fs::remove_file(&path).expect("remove");
    std::os::unix::fs::symlink("/dev/zero", &path).expect("symlink");
    daemon.signal(libc::SIGHUP);
    let line = daemon.await_log("config reload refused");
    assert!(line.contains("a character device"), "{line}");

    // A file of 64 MiB: refused by its size, not read.
    std::fs::remove_file(&path).expect("remove");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(64 << 20).expect("grow");
    daemon.signal(libc::SIGHUP);
    let line = daemon.await_log("config reload refused");
    assert!(line.contains("more than the 1048576"), "{line}");
    assert!(serves(daemon.addr, echo.addr).await, "still serving");
    let peak = rss_kib(pid);
    assert!(peak < 48 * 1024, "peak RSS {peak} KiB: nothing large was read");
}

const GUARDED: &str = "[server]\nbind_port = 0\n\n[auth]\nlogin_failure_limit = 5\n\
    [[auth.users]]\nusername = \"alice\"\npassword = \"alice-pw\"\n\n[access]\n\
    default_action = \"allow\"\n[[access.rules]]\naction = \"deny\"\nnetworks = [\"127.0.0.0/8\"]\n\
    ports = [1]\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_file_cut_short_cannot_turn_off_authentication_or_every_rule_unless_it_says_so() {
    let echo = common::EchoServer::start().await;
    let mut daemon = Daemon::start(GUARDED);
    let no_auth_is_refused = |proxy| async move {
        let mut stream = TcpStream::connect(proxy).await.expect("connect");
        common::greet(&mut stream, &[METHOD_NO_AUTH]).await.method == METHOD_NO_ACCEPTABLE
    };

    // Cut before [auth], as a non-atomic write racing SIGHUP leaves it: refused, loudly.
    let cut = GUARDED.split("[auth]").next().expect("head");
    daemon.write_config(cut);
    daemon.signal(libc::SIGHUP);
    let line = daemon.await_log("config reload refused");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("`auth.socks_method`") && line.contains("`access.rules`"), "{line}");
    assert!(no_auth_is_refused(daemon.addr).await, "authentication still on");
    let (mut stream, reply) =
        common::connect_with_password(daemon.addr, echo.addr.into(), "alice", "alice-pw").await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(common::round_trip(&mut stream, b"a").await, b"a");

    // The same opening written out: applied, with a warning for each part.
    let open = format!("{cut}[auth]\nsocks_method = \"none\"\n[access]\nrules = []\n");
    daemon.write_config(&open);
    daemon.signal(libc::SIGHUP);
    let warned = daemon.await_log("opens the proxy up");
    assert!(warned.contains("WARN") && warned.contains("authentication off"), "{warned}");
    daemon.await_log("config reloaded");
    assert!(serves(daemon.addr, echo.addr).await, "no-auth CONNECT now allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigusr1_and_sigusr2_are_logged_and_ignored() {
    let echo = common::EchoServer::start().await;
    let mut daemon = Daemon::start("[server]\nbind_port = 0\n");
    for (signal, name) in [(libc::SIGUSR1, "SIGUSR1"), (libc::SIGUSR2, "SIGUSR2")] {
        daemon.signal(signal);
        let line = daemon.await_log(&format!("{name} received: ignored"));
        assert!(line.contains("WARN"), "{line}");
    }
    assert!(serves(daemon.addr, echo.addr).await, "still serving");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait().success(), "a normal stop afterwards");
}
