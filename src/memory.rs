//! The process's memory given back to the system: large, short-lived blocks (an argon2 check's
//! 19 MiB) kept out of the allocator's arenas, and arenas trimmed after the pool let go of many
//! destinations at once.
//!
//! glibc serves a large `malloc` with its own `mmap` and unmaps it on `free`, but only above a
//! threshold that it raises, by default, to the size of every such block freed. After the first
//! argon2 check, later ones came from the arenas of the blocking threads and stayed resident:
//! 160 concurrent logins left 2.4 GiB behind. Fixing the threshold keeps every block of 4 MiB or
//! more a mapping of its own, returned to the system the moment it is freed; nothing else this
//! daemon allocates is that large.
//!
//! Fixing that threshold also leaves the trim threshold at glibc's 128 KiB: an arena whose top
//! had that much free was shrunk with `madvise` and the pages faulted back in by the next
//! sessions. Each session's relay buffers are 32 KiB, so 16 clients churned the arenas' tops
//! past it all the time: 0.16 page faults per session against a minimal relay's 0.03, and
//! `madvise`/`sysmalloc` in the proxy's profile. The arenas now keep up to the same 4 MiB free
//! at their tops; pruning still returns everything (`give_back_free_memory`).

/// Blocks of this size and more are mapped and unmapped individually.
pub const LARGE_BLOCK_BYTES: i32 = 4 << 20;

/// Free memory an arena keeps at its top rather than give back at once.
pub const ARENA_TOP_KEPT_BYTES: i32 = LARGE_BLOCK_BYTES;

/// Applies the fixed thresholds (glibc only; elsewhere the system allocator decides).
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt(3) only sets allocator tunables; it has no memory-safety
        // preconditions and is called from main before the runtime starts its threads.
        let applied = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)
                & libc::mallopt(libc::M_TRIM_THRESHOLD, ARENA_TOP_KEPT_BYTES)
        };
        if applied != 1 {
            tracing::warn!(
                "could not fix the allocator's thresholds; argon2 memory may stay resident"
            );
        }
    }
}

/// Returns the free memory of every allocator arena to the system (glibc's `malloc_trim`).
/// Freed small blocks otherwise stay resident: 9,500 pool destinations pruned left RSS at its
/// peak (121 MiB) for good. It walks the arenas, so it is for rare events, off the reactor.
pub fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim(3) only releases memory the allocator holds free; it takes the
        // arenas' own locks and has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Entries below which a table's capacity is left alone: a few pages at most.
const SHRINK_FLOOR: usize = 1024;

/// Whether a table that has emptied is worth shrinking: it has room for four times what it
/// holds, and for more than [`SHRINK_FLOOR`] entries. Tables keep their capacity when entries
/// leave, so every per-destination table would otherwise stay at its largest (10,000
/// destinations: about 1 MiB each) after pruning; shrinking only once it is a quarter full
/// keeps the cost of the rehash amortized over the removals that made it so.
pub fn oversized(len: usize, capacity: usize) -> bool {
    capacity > SHRINK_FLOOR && capacity / 4 > len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_tables_a_quarter_full_are_shrunk() {
        assert!(!oversized(0, SHRINK_FLOOR), "small tables keep their room");
        assert!(oversized(0, 4 * SHRINK_FLOOR));
        assert!(oversized(SHRINK_FLOOR - 1, 4 * SHRINK_FLOOR));
        assert!(!oversized(SHRINK_FLOOR, 4 * SHRINK_FLOOR), "a quarter full is not yet");
    }
}
