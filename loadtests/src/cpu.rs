//! A process's CPU time from `/proc/PID/stat`: what a proxy spends per session, read by the
//! load generator around its measured window (`loadgen run --cpu-pid`).

use serde::{Deserialize, Serialize};

/// User and system CPU time of a process, all its threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTime {
    pub user_us: u64,
    pub system_us: u64,
}

impl CpuTime {
    /// The time spent between `earlier` and this reading.
    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            system_us: self.system_us.saturating_sub(earlier.system_us),
        }
    }
}

/// The CPU time of process `pid` so far, or None if it cannot be read (gone, not Linux).
pub fn process_cpu(pid: u32) -> Option<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_stat(&stat, u64::try_from(ticks_per_sec).ok().filter(|&t| t > 0)?)
}

/// utime and stime are fields 14 and 15 of `/proc/PID/stat`, in clock ticks. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted after its last ')'.
fn parse_stat(stat: &str, ticks_per_sec: u64) -> Option<CpuTime> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let to_us = |ticks: u64| ticks.saturating_mul(1_000_000) / ticks_per_sec;
    Some(CpuTime { user_us: to_us(utime), system_us: to_us(stime) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_name_with_spaces() {
        let stat = "4242 (tokio rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        let cpu = parse_stat(stat, 100).expect("parsed");
        assert_eq!(cpu, CpuTime { user_us: 2_500_000, system_us: 750_000 });
    }

    #[test]
    fn a_truncated_line_is_none() {
        assert_eq!(parse_stat("4242 (poolsocks) S 1 2", 100), None);
    }

    #[test]
    fn this_process_has_a_reading() {
        assert!(process_cpu(std::process::id()).is_some());
    }
}
