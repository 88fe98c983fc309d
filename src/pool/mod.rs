//! The upstream connection pool as ractor actors (work in progress).
