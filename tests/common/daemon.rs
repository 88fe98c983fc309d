//! The built `poolsocks` binary as a child process, with its log forwarded line by line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const EVENT_DEADLINE: Duration = Duration::from_secs(20);

/// A daemon started from the built binary with a config written to a temp dir. Its stderr
/// (the log) is forwarded line by line so tests can await log events.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    log: mpsc::Receiver<String>,
    /// The lines logged before "listening" (start-up: limits, config warnings).
    pub startup_log: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon on `config` (info-level logs unless it has a `[logging]` section).
    pub fn start(config: &str) -> Daemon {
        Self::start_with(config, |_| {})
    }

    /// Like [`Daemon::start`], letting the test adjust the command first (limits, env).
    pub fn start_with(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("poolsocks.toml");
        let logging =
            if config.contains("[logging]") { "" } else { "\n[logging]\nlevel = \"info\"\n" };
        std::fs::write(&path, format!("{config}{logging}")).expect("write config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_poolsocks"));
        command
            .arg("--config")
            .arg(&path)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .env_remove("RUST_LOG");
        adjust(&mut command);
        let mut child = command.spawn().expect("start poolsocks");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            addr: "0.0.0.0:0".parse().expect("addr"),
            log,
            startup_log: Vec::new(),
            _dir: dir,
        };
        let line = loop {
            match daemon.log.recv_timeout(EVENT_DEADLINE) {
                Ok(line) if line.contains("listening") => break line,
                Ok(line) => daemon.startup_log.push(line),
                Err(e) => panic!("the daemon never said it was listening: {e}"),
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("addr="))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        daemon.addr = addr;
        daemon
    }

    /// Awaits the stats endpoint's "listening" line (it follows the SOCKS one) and returns its
    /// address; for configs with `stats_api_port = 0`.
    pub fn await_stats_addr(&mut self) -> SocketAddr {
        let line = self.await_log("stats endpoint listening");
        line.split_whitespace()
            .find_map(|word| word.strip_prefix("addr="))
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line:?}"))
    }

    /// The log lines that have arrived so far, without waiting.
    pub fn log_so_far(&mut self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Every log line still to come, up to the daemon's exit (when its stderr closes).
    pub fn rest_of_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.recv_timeout(EVENT_DEADLINE) {
            lines.push(line);
        }
        lines
    }

    /// Blocks until a log line containing `needle` appears.
    pub fn await_log(&mut self, needle: &str) -> String {
        loop {
            match self.log.recv_timeout(EVENT_DEADLINE) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(e) => panic!("log line {needle:?} never came: {e}"),
            }
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + EVENT_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "daemon did not exit");
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
