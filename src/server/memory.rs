//! Memory given back: the pages start-up mapped from the process's files
//! ([`release_mapped_pages`]), and the allocator's after a load.
//!
//! After a load: the allocator (glibc's) keeps the memory
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
//!
//! It never touches memory in use: only the allocator's free chunks and
//! file pages that the next access maps back unchanged.

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

/// Lets go of the pages of code and read-only data that this process mapped
/// from its files (its executable, libc) and no longer needs: start-up runs
/// code the serving never runs again (the command line, the config's
/// parsing, the set-up of every part), and it would stay resident, and
/// counted, for the process's whole life. Dropping a mapping's pages keeps
/// them in the page cache: what runs next maps them back in on its first
/// use, a minor fault each (no read from disk, unless the system had
/// evicted the page anyway).
///
/// Only private mappings that cannot be written and hold no page of their
/// own (`Anonymous: 0 kB` in smaps: no copy made by a relocation or a
/// debugger's breakpoint) are dropped, so nothing is lost. Returns the KiB
/// that were resident in them, or `None` where the kernel would not say.
pub fn release_mapped_pages() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut released = 0;
    for mapping in droppable_mappings(&smaps) {
        // SAFETY: the range is one of this process's file mappings, read-only
        // and without private pages: MADV_DONTNEED only unmaps page-cache
        // pages, which the next access maps back unchanged.
        if unsafe { libc::madvise(mapping.start as *mut libc::c_void, mapping.len, libc::MADV_DONTNEED) } == 0 {
            released += mapping.resident_kib;
        }
    }
    debug!("unmapped {released} KiB of code and read-only data; pages map back on use");
    Some(released)
}

/// One mapping of a file, as smaps shows it.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    len: usize,
    resident_kib: u64,
}

/// The mappings of `smaps` (the text of /proc/self/smaps) that
/// [`release_mapped_pages`] may drop.
fn droppable_mappings(smaps: &str) -> Vec<Mapping> {
    let mut found = Vec::new();
    // (the mapping, whether it qualifies so far), for the header just read.
    let mut current: Option<(Mapping, bool)> = None;
    let mut finish = |current: &mut Option<(Mapping, bool)>| {
        if let Some((m, true)) = current.take()
            && m.resident_kib > 0
        {
            found.push(m);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            finish(&mut current);
            let perms = fields.next().unwrap_or("");
            let inode = fields.nth(2).unwrap_or("0");
            let file_backed = inode != "0" && fields.next().is_some_and(|path| path.starts_with('/'));
            let read_only_private = perms.len() == 4 && !perms.contains('w') && perms.ends_with('p');
            let mapping = Mapping {
                start,
                len: end.saturating_sub(start),
                resident_kib: 0,
            };
            current = Some((mapping, file_backed && read_only_private));
            continue;
        }
        let Some((mapping, qualifies)) = current.as_mut() else {
            continue;
        };
        let mut kib = || fields.next().and_then(|n| n.parse::<u64>().ok());
        match first {
            "Rss:" => mapping.resident_kib = kib().unwrap_or(0),
            // A page of its own (copied on write) would be lost: keep the mapping.
            "Anonymous:" | "Swap:" | "Locked:" => *qualifies &= kib() == Some(0),
            _ => {}
        }
    }
    finish(&mut current);
    found
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
    fn only_read_only_private_file_mappings_without_own_pages_are_dropped() {
        let smaps = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 1234 /usr/bin/protobalance
Rss:                 400 kB
Anonymous:             0 kB
Swap:                  0 kB
Locked:                0 kB
55d0c0100000-55d0c0700000 r-xp 00100000 08:01 1234 /usr/bin/protobalance
Rss:                4000 kB
Anonymous:             0 kB
55d0c0700000-55d0c0740000 r--p 00700000 08:01 1234 /usr/bin/protobalance
Rss:                 156 kB
Anonymous:           152 kB
55d0c0740000-55d0c0744000 rw-p 00740000 08:01 1234 /usr/bin/protobalance
Rss:                  16 kB
Anonymous:            16 kB
55d0c0800000-55d0c0900000 r-xp 00000000 08:01 99 /usr/lib/libc.so.6
Rss:                   0 kB
Anonymous:             0 kB
7f0000000000-7f0000100000 r--s 00000000 08:01 77 /var/lib/some.db
Rss:                  64 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00000000 00:00 0
Rss:                  64 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r-xp 00000000 08:01 88 /usr/lib/libx.so (deleted)
Rss:                  32 kB
Anonymous:             0 kB
Locked:               32 kB
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";
        let kept = |start: usize, len: usize, resident_kib: u64| Mapping {
            start,
            len,
            resident_kib,
        };
        assert_eq!(
            droppable_mappings(smaps),
            [
                kept(0x55d0c0000000, 0x100000, 400),
                kept(0x55d0c0100000, 0x600000, 4000)
            ],
            "the relocated data (copied pages), the writable, shared, anonymous, locked \
             and vDSO mappings stay, and one with nothing resident is skipped"
        );
        assert_eq!(droppable_mappings("not smaps\n\n12-zz r-xp\n"), []);
    }

    #[test]
    fn mapped_pages_are_let_go_and_map_back_on_use() {
        let resident = || -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            droppable_mappings(&smaps).iter().map(|m| m.resident_kib).sum()
        };
        let before = resident();
        let released = release_mapped_pages().expect("Linux has /proc/self/smaps");
        let after = resident();
        assert!(
            released > 0 && released >= before / 2,
            "{released} of {before} KiB let go"
        );
        assert!(after < before / 2, "{after} KiB resident again, of {before}");
        // The code dropped runs again: this test's own, and the allocator's.
        assert_eq!(format!("{:?}", vec![1, 2]), "[1, 2]");
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
