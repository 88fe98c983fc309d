//! Operational events in a bounded ring buffer (work in progress).
