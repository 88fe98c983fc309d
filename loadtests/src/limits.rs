//! Process limits and memory readings.

/// Raises RLIMIT_NOFILE to at least `want` (up to what the kernel allows) and returns the new
/// soft limit. Holding 10,000 sessions needs about 10,000 descriptors here.
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if current.rlim_cur >= want {
        return Ok(current.rlim_cur);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(current.rlim_max);
    // Raising the hard limit needs root (CAP_SYS_RESOURCE); without it stay within the hard one.
    for hard in [want.max(current.rlim_max).min(nr_open), current.rlim_max] {
        let new = libc::rlimit { rlim_cur: want.min(hard), rlim_max: hard };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(new.rlim_cur);
        }
    }
    Err(std::io::Error::last_os_error().to_string())
}

/// Resident set size of a process in KiB, from /proc (`None` if it is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Proportional set size in KiB (shared pages divided among their sharers), falling back to RSS.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok();
    rollup
        .as_deref()
        .and_then(|text| text.lines().find_map(|line| line.strip_prefix("Pss:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .or_else(|| rss_kib(pid))
}

/// Summed PSS of a process and its children. Dante serves clients from forked children that
/// share most pages; summing their RSS would count those pages once per child.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    let mut total = pss_kib(pid)?;
    let mut stack = vec![pid];
    let mut guard = 0;
    // Bounded walk: a process tree deeper or wider than this is not one we started.
    while let Some(parent) = stack.pop() {
        guard += 1;
        if guard > 10_000 {
            break;
        }
        let path = format!("/proc/{parent}/task/{parent}/children");
        let Ok(children) = std::fs::read_to_string(path) else {
            continue;
        };
        for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            total += pss_kib(child).unwrap_or(0);
            stack.push(child);
        }
    }
    Some(total)
}
