//! `loadgen run --strace-pid`: the proxy's syscalls counted by `strace -c -f -p PID` (every
//! thread of it, and threads it starts) while the sessions run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::stats::SyscallCount;

pub struct Strace {
    child: Child,
    output: PathBuf,
}

impl Strace {
    /// Starts strace on `pid` and waits until it says it is attached (up to 10 s).
    pub async fn attach(pid: u32) -> Result<Strace, String> {
        let output =
            std::env::temp_dir().join(format!("loadgen-strace-{}-{pid}.txt", std::process::id()));
        let mut child = Command::new("strace")
            .args(["-c", "-f", "-p", &pid.to_string(), "-o"])
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Never outlives the run, even if the run fails.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start strace: {e}"))?;
        let stderr = child.stderr.take().ok_or("strace: no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let attached = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("attached") {
                    return Ok(());
                }
                if line.contains("Operation not permitted") || line.contains("No such process") {
                    return Err(line);
                }
            }
            Err("strace exited before attaching".to_string())
        })
        .await;
        match attached {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(format!("strace -p {pid}: {why}")),
            Err(_) => return Err(format!("strace -p {pid}: not attached after 10 s")),
        }
        // Keep reading what it says, so a full pipe never blocks it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Strace { child, output })
    }

    /// Detaches (SIGINT: strace then writes its summary) and returns the counts by syscall.
    pub async fn finish(mut self) -> Result<BTreeMap<String, SyscallCount>, String> {
        // The proxy closes the last sessions' sockets just after the client sees them end.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(pid) = self.child.id() {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
            return Err("strace did not stop within 10 s of SIGINT".into());
        }
        let text = std::fs::read_to_string(&self.output)
            .map_err(|e| format!("read {}: {e}", self.output.display()))?;
        let _ = std::fs::remove_file(&self.output);
        let counts = parse_summary(&text);
        if counts.is_empty() {
            return Err(format!("strace summary had no syscalls: {text:?}"));
        }
        Ok(counts)
    }
}

/// Parses `strace -c` output: `% time  seconds  usecs/call  calls  [errors]  syscall` rows
/// between the dashed lines, the `total` row left out.
pub fn parse_summary(text: &str) -> BTreeMap<String, SyscallCount> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0].starts_with('%') || fields[0].starts_with('-') {
            continue;
        }
        let name = fields[fields.len() - 1];
        if name == "total" || fields[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(calls) = fields[3].parse::<u64>() else { continue };
        let errors = if fields.len() >= 6 { fields[4].parse().unwrap_or(0) } else { 0 };
        counts.insert(name.to_string(), SyscallCount { calls, errors });
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_strace_summary() {
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 45.10    0.010000           5      2000           epoll_wait
 30.00    0.006000           3      1500       500 recvfrom
  0.00    0.000000           0         1           close
------ ----------- ----------- --------- --------- ----------------
100.00    0.016000           4      3501       500 total
";
        let counts = parse_summary(text);
        assert_eq!(counts.len(), 3);
        assert_eq!(counts["recvfrom"], SyscallCount { calls: 1500, errors: 500 });
        assert_eq!(counts["epoll_wait"].errors, 0);
    }
}
