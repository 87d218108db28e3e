//! Memory given back after a load: the allocator (glibc's) keeps the memory
//! of freed connections in its free lists, per thread, for good; after a
//! load of thousands of connections the process would stay at its peak.
//! Every 2 s this task asks the allocator how much it holds free; once that
//! has grown by [`HELD_FREE`] since its lowest point after the last trim
//! (connections' memory freed and kept), it asks the allocator to return its
//! free pages to the system (`malloc_trim`).
//!
//! Why the allocator's own figure and not the open connections: a check
//! every 2 s misses a load that comes and goes between two checks, and the
//! memory such a load leaves is the same. While a load holds, its memory is
//! in use, not free, so no trim walks the arenas (under their locks, with
//! workers allocating) until the load has passed.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the allocator is asked.
const CHECK: Duration = Duration::from_secs(2);

/// Free memory the allocator may gain and keep before a trim gives it back:
/// what about 2,000 connections leave.
const HELD_FREE: usize = 4 << 20;

/// When a trim is due, as the allocator's free memory rises and falls.
#[derive(Debug, Default)]
struct Policy {
    /// The least free memory seen since the last trim.
    least_free: Option<usize>,
}

impl Policy {
    /// Takes the bytes the allocator holds free now; `true` when a trim is
    /// due: they have grown by [`HELD_FREE`] since their lowest point.
    fn trim_now(&mut self, free: usize) -> bool {
        let least = self.least_free.map_or(free, |least| least.min(free));
        if free >= least + HELD_FREE {
            self.least_free = Some(free);
            return true;
        }
        self.least_free = Some(least);
        false
    }
}

/// Watches the allocator's free memory until `stop`, trimming after each load.
pub async fn trim_after_load(stop: CancellationToken) {
    let mut policy = Policy::default();
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(free) = held_free() else { return };
        if policy.trim_now(free) {
            let _ = tokio::task::spawn_blocking(move || trim(free)).await;
        }
    }
}

/// The bytes the allocator holds free (its free lists and the top of its
/// heaps), or `None` where it cannot tell (not glibc: no trim either).
fn held_free() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions; it only reads the arenas.
        Some(unsafe { libc::mallinfo2() }.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Returns the allocator's free pages to the system.
fn trim(free: usize) {
    let started = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
    debug!(
        "gave free memory back to the system ({} KiB held free) in {:?}",
        free >> 10,
        started.elapsed()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn a_trim_follows_each_load_once_its_memory_is_free() {
        let mut p = Policy::default();
        let small: Vec<bool> = [2, 1, 3, 4, 2].into_iter().map(|m| p.trim_now(m * MIB)).collect();
        assert_eq!(small, [false; 5], "less than HELD_FREE gained: no trim");
        let mut p = Policy::default();
        // At start 2 MiB free; a load takes memory (free falls), then ends.
        let load: Vec<bool> = [2, 1, 0, 0, 3].into_iter().map(|m| p.trim_now(m * MIB)).collect();
        assert_eq!(load, [false; 5], "the load holds or gave back too little");
        assert!(p.trim_now(12 * MIB), "the load's memory is free: trim");
        assert!(
            !p.trim_now(12 * MIB),
            "once per load: glibc keeps the trimmed chunks in its lists"
        );
        assert!(!p.trim_now(15 * MIB), "3 MiB more is not worth a trim");
        assert!(p.trim_now(16 * MIB), "4 MiB more since the last trim: trim again");
        assert!(!p.trim_now(6 * MIB), "the next load takes the free memory");
        assert!(p.trim_now(10 * MIB), "and leaves it: trim");
    }

    #[test]
    fn the_allocator_says_what_it_holds_free() {
        // Small blocks kept between the freed ones, as a connection's memory
        // sits between others': the freed memory cannot fall back to the top
        // of the heap, where glibc would give it back by itself.
        let (mut freed, mut kept) = (Vec::new(), Vec::new());
        for _ in 0..8192 {
            freed.push(vec![1u8; 4096]);
            kept.push(vec![1u8; 64]);
        }
        let in_use = held_free().expect("glibc on Linux");
        drop(freed);
        let after = held_free().unwrap();
        drop(kept);
        // 32 MiB freed; the rest of the margin is for other tests' threads.
        assert!(
            after >= in_use + 16 * MIB,
            "freed memory shows as held free: {in_use} then {after}"
        );
    }
}
