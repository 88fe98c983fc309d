//! The open-file limit. A proxy holds two descriptors per session (client and upstream), some
//! sessions more (a name lookup's sockets, a UDP association's outbound sockets, a BIND's
//! listener: one more per session is kept for those, see `crate::descriptors`), plus its idle
//! spares, so the usual soft limit of 1,024 caps it near 340 sessions whatever
//! `max_connections` says. At start the daemon raises its soft limit to what the config needs,
//! as far as the hard limit allows, and says so; if the hard limit is too low it warns with the
//! figures, since sessions beyond it fail (accepts back off, dials fail with `0x01`).

use std::io;

use crate::config::Config;

/// Descriptors kept aside for everything that is not a session: the listeners, the runtime's
/// epoll and wake-up descriptors, standard streams, and the stats endpoint's connections.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Descriptors per session that every session may hold: the client and its upstream.
pub const PER_SESSION: u64 = 2;
/// Descriptors per session kept for sessions that hold more (the extra budget).
pub const EXTRA_PER_SESSION: u64 = 1;

/// What every session's two, the spares and the reserve take.
fn base_needed(config: &Config) -> u64 {
    let sessions = config.server.max_connections as u64;
    let pool = &config.server.pool;
    let spares = if pool.enabled { pool.max_total_idle as u64 } else { 0 };
    PER_SESSION * sessions + spares + RESERVED_DESCRIPTORS
}

/// What the config needs at most: two per session and one more kept for sessions that hold
/// more, one per idle spare, and the reserve.
pub fn descriptors_needed(config: &Config) -> u64 {
    base_needed(config) + EXTRA_PER_SESSION * config.server.max_connections as u64
}

/// The extra descriptors the soft limit in force leaves beyond every session's two, the
/// spares and the reserve: the size of `crate::descriptors::DescriptorBudget`.
/// When the limit is below what the config needs (the start-up warning says so), the share of
/// what fits: one in three of the descriptors left after the spares and the reserve.
pub fn extra_descriptors(config: &Config) -> usize {
    let Some(soft) = soft_limit() else { return usize::MAX };
    let extra = if soft >= descriptors_needed(config) {
        soft - base_needed(config)
    } else {
        let pool = &config.server.pool;
        let spares = if pool.enabled { pool.max_total_idle as u64 } else { 0 };
        soft.saturating_sub(spares + RESERVED_DESCRIPTORS) / (PER_SESSION + EXTRA_PER_SESSION)
    };
    usize::try_from(extra).unwrap_or(usize::MAX)
}

#[cfg(unix)]
fn soft_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

#[cfg(not(unix))]
fn soft_limit() -> Option<u64> {
    None
}

/// The soft limit before and after, and the hard limit (`None` = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub needed: u64,
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub hard: Option<u64>,
}

impl OpenFileLimit {
    /// False when even the hard limit is below what the config needs.
    pub fn suffices(&self) -> bool {
        self.after.map_or(true, |soft| soft >= self.needed)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to `needed` (or to the hard limit if that is lower). Never
/// lowers it.
#[cfg(unix)]
pub fn raise_open_file_limit(needed: u64) -> io::Result<OpenFileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    let limit = getrlimit(Resource::Nofile);
    let (before, hard) = (limit.current, limit.maximum);
    let wanted = hard.map_or(needed, |hard| needed.min(hard));
    if before.is_some_and(|soft| soft < wanted) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: hard })?;
    }
    let after = getrlimit(Resource::Nofile).current;
    Ok(OpenFileLimit { needed, before, after, hard })
}

#[cfg(not(unix))]
pub fn raise_open_file_limit(needed: u64) -> io::Result<OpenFileLimit> {
    Ok(OpenFileLimit { needed, before: None, after: None, hard: None })
}

/// Raises the limit for `config` and logs the outcome: info when raised, a warning naming the
/// figures when the hard limit is too low for `max_connections`.
pub fn apply(config: &Config) {
    let needed = descriptors_needed(config);
    match raise_open_file_limit(needed) {
        Ok(limit) if !limit.suffices() => {
            let fit = limit.after.map_or(0, |soft| {
                soft.saturating_sub(RESERVED_DESCRIPTORS) / (PER_SESSION + EXTRA_PER_SESSION)
            });
            tracing::warn!(
                soft = ?limit.after,
                hard = ?limit.hard,
                needed,
                max_connections = config.server.max_connections,
                sessions_that_fit = fit,
                "the open-file hard limit is below what max_connections needs: sessions beyond \
                 {fit} will fail. Set server.max_connections = {fit} (or less), or raise the hard \
                 limit to {needed} (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
            )
        }
        Ok(limit) if limit.after != limit.before => tracing::info!(
            from = ?limit.before,
            to = ?limit.after,
            needed,
            "raised the open-file limit for max_connections"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, needed, "cannot raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_three_descriptors_per_session_and_the_spares_only_when_pooling() {
        let mut config = Config::default();
        config.server.max_connections = 1000;
        config.server.pool.max_total_idle = 50;
        config.server.pool.enabled = false;
        assert_eq!(descriptors_needed(&config), 3000 + RESERVED_DESCRIPTORS);
        config.server.pool.enabled = true;
        assert_eq!(descriptors_needed(&config), 3050 + RESERVED_DESCRIPTORS);
    }

    #[test]
    fn a_hard_limit_below_the_need_is_reported() {
        let limit =
            OpenFileLimit { needed: 500, before: Some(100), after: Some(256), hard: Some(256) };
        assert!(!limit.suffices());
        let limit = OpenFileLimit { needed: 500, before: Some(100), after: Some(500), hard: None };
        assert!(limit.suffices());
    }
}
