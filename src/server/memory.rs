//! Memory given back: the pages start-up mapped from the process's files
//! ([`release_mapped_pages`]), and the allocator's after a load, then the
//! code pages the load mapped back in, once no connection is left.
//!
//! After a load: the allocator (glibc's) keeps the memory
//! of freed connections in its free lists, per thread, for good; after a
//! load of thousands of connections the process would stay at its peak.
//! Every 2 s this task works out how much memory the allocator holds free
//! and still resident; once that has grown by [`HELD_FREE`] since its lowest
//! point after the last trim (connections' memory freed and kept), or by
//! [`QUIET_FREE`] while two checks in a row find the same figure (the
//! workers' idle spares, shed after a load), it asks the allocator to return
//! its free pages to the system (`malloc_trim`). Before that it asks each
//! worker thread for the blocks its allocator cache holds
//! ([`take_thread_cache`]): `malloc_trim` counts them as in use, and after a
//! load they are scattered over the worker's heap, each pinning its page.
//!
//! Why a figure of memory and not the open connections: a check
//! every 2 s misses a load that comes and goes between two checks, and the
//! memory such a load leaves is the same. While a load holds, its memory is
//! in use, not free, so no trim walks the arenas (under their locks, with
//! workers allocating) until the load has passed.
//!
//! It never touches memory in use: only the allocator's free chunks (and
//! cached ones, taken through the allocator) and file pages that the next
//! access maps back unchanged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proxy::DataPlane;

/// How often the allocator is asked.
const CHECK: Duration = Duration::from_secs(2);

/// Free memory the allocator may gain and keep before a trim gives it back:
/// what about 2,000 connections leave.
const HELD_FREE: i64 = 4 << 20;

/// Free memory a quiet process may keep: once two checks in a row find the
/// same figure (nothing is being served: the last of a load's spares have
/// gone back, say), a trim gives back even this much.
const QUIET_FREE: i64 = 1 << 20;

/// Two figures this close count as the same, for [`QUIET_FREE`].
const QUIET_SLACK: u64 = 64 << 10;

/// When a trim is due, as the allocator's free memory rises and falls, and
/// when the code pages a load mapped back in may go again.
#[derive(Debug, Default)]
struct Policy {
    /// The least free memory seen since the last trim.
    least_free: Option<i64>,
    /// The figure of the check before.
    last: Option<i64>,
    /// A trim came after a load, and the code its serving mapped back in is
    /// still resident.
    code_mapped_back: bool,
}

impl Policy {
    /// Takes the bytes held free now; `true` when a trim is due: they have
    /// grown by [`HELD_FREE`] since their lowest point.
    fn trim_now(&mut self, free: i64) -> bool {
        let least = self.least_free.map_or(free, |least| least.min(free));
        let quiet = self.last.is_some_and(|last| last.abs_diff(free) <= QUIET_SLACK);
        self.least_free = Some(least);
        self.last = Some(free);
        free >= least + HELD_FREE || (quiet && free >= least + QUIET_FREE)
    }

    /// Takes the bytes a trim left held free: the new lowest point. (Not the
    /// figure before the trim: after a trim in the middle of a load, what
    /// the rest of the load frees must count.)
    fn trimmed(&mut self, free: i64) {
        self.least_free = Some(free);
        self.last = Some(free);
        self.code_mapped_back = true;
    }

    /// `true` once after each trim, at the first check that finds no
    /// connection open: the load has passed, and what serving mapped in of
    /// the executable and libraries can go as start-up's did. Not while
    /// connections remain: they would map it straight back, a fault each.
    fn release_code_now(&mut self, open_connections: usize) -> bool {
        let due = self.code_mapped_back && open_connections == 0;
        self.code_mapped_back &= !due;
        due
    }
}

/// Watches the allocator's free memory until `stop`, trimming after each
/// load: first the blocks each worker's allocator cache holds
/// ([`take_thread_cache`]), then every heap's free pages. /proc/self/statm is
/// opened here, before the task first runs: by the time the balancer says it
/// is ready its descriptors are all open.
pub fn trim_after_load(data: Arc<DataPlane>, stop: CancellationToken) -> impl Future<Output = ()> {
    let statm = Statm::open();
    async move {
        let Some(statm) = statm else { return };
        let mut policy = Policy::default();
        let mut tick = tokio::time::interval(CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(free) = held_free(&statm) else { continue };
            if policy.trim_now(free) {
                let cached: Vec<CachedBlocks> = data
                    .on_every_worker(take_thread_cache)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
                let _ = tokio::task::spawn_blocking(move || {
                    free_on_a_passing_thread(cached);
                    trim(free);
                })
                .await;
                policy.trimmed(held_free(&statm).unwrap_or(free));
            } else if policy.release_code_now(data.open_connections()) {
                let _ = tokio::task::spawn_blocking(release_mapped_pages).await;
            }
        }
    }
}

/// The bytes the allocator holds free and still resident, give or take a
/// steady offset: the process's resident anonymous memory less what the
/// allocator has handed out (its heaps' chunks in use and its mmapped
/// blocks). Anonymous memory outside the allocator (thread stacks) adds to
/// it, and memory handed out but never touched (a buffer's pages no data
/// has landed on) takes from it, so it can be below zero: the policy only
/// looks at how it moves. `None` where it cannot tell (not glibc on Linux:
/// no trim either).
///
/// Not the allocator's free total (`fordblks`): a trim returns the pages of
/// free chunks but keeps the chunks in its lists, so after a trim in the
/// middle of a load, the memory the load later frees again would not count
/// as new, and would stay resident.
fn held_free(statm: &Statm) -> Option<i64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions; it only reads the arenas.
        let info = unsafe { libc::mallinfo2() };
        let handed_out = i64::try_from(info.uordblks + info.hblkhd).ok()?;
        Some(i64::try_from(statm.resident_anonymous()?).ok()? - handed_out)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = statm;
        None
    }
}

/// /proc/self/statm, opened once and read again from its start at each
/// check: a load that has used every descriptor the process may hold is
/// when the trim matters most, and it must not need a new one (nor take one
/// from an accept in that moment).
struct Statm(std::fs::File);

impl Statm {
    /// `None` where there is no trim (not glibc on Linux) or no /proc.
    fn open() -> Option<Self> {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            std::fs::File::open("/proc/self/statm").ok().map(Self)
        } else {
            None
        }
    }

    /// The process's resident anonymous memory in bytes (resident pages less
    /// the file-backed and shared ones).
    fn resident_anonymous(&self) -> Option<usize> {
        use std::os::unix::fs::FileExt;
        let mut text = [0u8; 256];
        let len = self.0.read_at(&mut text, 0).ok()?;
        let text = std::str::from_utf8(&text[..len]).ok()?;
        let mut pages = text.split_whitespace().skip(1).map(|n| n.parse::<usize>().ok());
        let (resident, file_or_shared) = (pages.next()??, pages.next()??);
        Some(resident.saturating_sub(file_or_shared) * page_size())
    }
}

/// Sizes of block the allocator caches per thread (glibc's `tcache`, by
/// default): requests of up to 1,032 bytes, in 64 classes 16 bytes apart…
const CACHED_SIZES: std::ops::RangeInclusive<usize> = 0..=63;
/// …and how many freed blocks of each class a thread keeps.
const CACHED_PER_SIZE: usize = 7;

/// Blocks taken out of a worker's allocator cache, to be freed elsewhere.
struct CachedBlocks(Vec<usize>);

/// Takes the blocks the calling thread's allocator cache holds. Each glibc
/// thread keeps the last few blocks it freed of each small size
/// ([`CACHED_SIZES`], [`CACHED_PER_SIZE`]) for its next requests, and
/// `malloc_trim` cannot touch them: they count as in use. After a load those
/// are a worker's last freed blocks of every size its connections used,
/// scattered over its heap, each holding its page resident; measured, they
/// were most of the memory a 4,000-connection load left resident after a
/// trim (docs/performance.md). So a worker asks for that many blocks of
/// each size (the first come from its cache, the rest from its heap), and
/// [`free_on_a_passing_thread`] frees them on a thread that then ends: a
/// thread's end empties its cache into the heaps' free lists, whose pages
/// the trim gives back. The worker's cache fills again from its next frees.
/// Where the cache holds other sizes or counts (tuned, or another
/// allocator), this costs a few hundred allocations after a load and
/// returns less.
fn take_thread_cache() -> CachedBlocks {
    let mut blocks = Vec::with_capacity(CACHED_SIZES.count() * CACHED_PER_SIZE);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for class in CACHED_SIZES {
        for _ in 0..CACHED_PER_SIZE {
            // SAFETY: malloc has no preconditions; the block is only freed.
            let block = unsafe { libc::malloc(24 + 16 * class) };
            if !block.is_null() {
                blocks.push(block as usize);
            }
        }
    }
    CachedBlocks(blocks)
}

/// Frees `cached` on a thread of its own, which ends at once (its cache
/// goes back to the heaps' free lists as it ends); on this thread if none
/// can be started.
fn free_on_a_passing_thread(cached: Vec<CachedBlocks>) {
    let free_all = || {
        for block in cached.iter().flat_map(|c| &c.0) {
            // SAFETY: each address is a block malloc returned in
            // `take_thread_cache` and nothing else holds; `free_all` runs
            // once, on the passing thread or, if it cannot start, here.
            unsafe { libc::free(*block as *mut libc::c_void) };
        }
    };
    std::thread::scope(|scope| {
        let passing = std::thread::Builder::new().name("protobalance-trim".into());
        if passing.spawn_scoped(scope, free_all).is_err() {
            free_all();
        }
    });
}

/// Returns the allocator's free pages to the system.
fn trim(free: i64) {
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

/// Lets go of the pages of code and read-only data that the loader mapped
/// from this process's executable and libraries and that it no longer
/// needs: start-up runs code the serving never runs again (the command
/// line, the config's parsing, the set-up of every part), and those pages
/// would stay in its resident set for the process's whole life. The pages
/// stay in the page cache (shared with every process that maps them, and
/// reclaimable, as before): what runs next maps back in what it uses, a
/// minor fault each. What this lowers is the process's RSS, not the
/// system's memory in use.
///
/// Only the loader's read-only segments are dropped, and of them only the
/// pages of private file mappings that hold no page of their own
/// (`Anonymous: 0 kB` in smaps: no copy made by a relocation or a
/// debugger's breakpoint), so no page changes. Returns the KiB let go, or
/// `None` where /proc/self/smaps could not be read.
pub fn release_mapped_pages() -> Option<u64> {
    let mut release = Release::default();
    // SAFETY: `each_object` takes `release` back as it was passed, and only
    // while dl_iterate_phdr runs.
    unsafe { libc::dl_iterate_phdr(Some(each_object), (&raw mut release).cast()) };
    match release.droppable {
        Some(_) => debug!("let go of {} KiB of mapped code and read-only data", release.kib),
        None => debug!("cannot read /proc/self/smaps: no mapped pages let go"),
    }
    release.droppable.map(|_| release.kib)
}

/// What [`release_mapped_pages`] works with while the loader's lock is held.
#[derive(Default)]
struct Release {
    /// The mappings smaps allows to drop, read once at the first object.
    droppable: Option<Vec<Mapping>>,
    kib: u64,
}

/// Called by dl_iterate_phdr for each loaded object, under the loader's
/// lock: no object is loaded or unloaded until the last call returns, so
/// the mappings that smaps (read here, under the lock) shows for the
/// objects' segments are still theirs when their pages are dropped.
unsafe extern "C" fn each_object(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid `info` for the call, and `data`
    // is the `Release` that `release_mapped_pages` lent it.
    let (info, release) = unsafe { (&*info, &mut *data.cast::<Release>()) };
    if release.droppable.is_none() {
        match std::fs::read("/proc/self/smaps") {
            Ok(bytes) => release.droppable = Some(droppable_mappings(&String::from_utf8_lossy(&bytes))),
            Err(_) => return 1,
        }
    }
    let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
        &[]
    } else {
        // SAFETY: the loader's program headers of the object, `dlpi_phnum` of them.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let droppable = release.droppable.as_deref().unwrap_or_default();
    for ph in phdrs
        .iter()
        .filter(|ph| ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W == 0)
    {
        let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
        release.kib += release_within((start, start.saturating_add(ph.p_memsz as usize)), droppable);
    }
    0
}

/// Drops the pages of `start..end` that lie in the `droppable` mappings
/// (from [`droppable_mappings`]); returns about how many KiB of them were
/// resident.
fn release_within((start, end): (usize, usize), droppable: &[Mapping]) -> u64 {
    let (mut kib, page) = (0, page_size());
    for m in droppable {
        // Whole pages only: a mapping starts and ends on one, a segment may not.
        let from = start.max(m.start).next_multiple_of(page);
        let to = end.min(m.start + m.len) / page * page;
        if from >= to {
            continue;
        }
        // SAFETY: the range lies in a private file mapping that cannot be
        // written and holds no page of its own: MADV_DONTNEED only unmaps
        // page-cache pages, which the next access maps back unchanged.
        if unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED) } == 0 {
            kib += m.resident_kib * (to - from) as u64 / m.len.max(1) as u64;
        }
    }
    kib
}

/// The page size: mappings are whole pages.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// One mapping of a file, as smaps shows it.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    len: usize,
    resident_kib: u64,
}

/// The mappings of `smaps` (the text of /proc/self/smaps) whose pages
/// [`release_within`] may drop: private, not writable, of a file, with pages
/// resident, and said to hold no page of their own (a mapping whose
/// `Anonymous:` line is missing is kept), none swapped, locked or huge.
fn droppable_mappings(smaps: &str) -> Vec<Mapping> {
    /// A mapping being read: its header said it may qualify, and whether
    /// its lines have said so far that it holds no page of its own.
    struct Reading {
        mapping: Mapping,
        may_qualify: bool,
        no_own_page: bool,
        nothing_else: bool,
    }
    let mut found = Vec::new();
    let mut finish = |reading: Option<Reading>| {
        if let Some(r) = reading
            && r.may_qualify
            && r.no_own_page
            && r.nothing_else
            && r.mapping.resident_kib > 0
        {
            found.push(r.mapping);
        }
    };
    let mut current: Option<Reading> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            finish(current.take());
            let perms = fields.next().unwrap_or("");
            let inode = fields.nth(2).unwrap_or("0");
            let file_backed = inode != "0" && fields.next().is_some_and(|path| path.starts_with('/'));
            let read_only_private = perms.len() == 4 && !perms.contains('w') && perms.ends_with('p');
            current = Some(Reading {
                mapping: Mapping {
                    start,
                    len: end.saturating_sub(start),
                    resident_kib: 0,
                },
                may_qualify: file_backed && read_only_private,
                no_own_page: false,
                nothing_else: true,
            });
            continue;
        }
        let Some(r) = current.as_mut() else { continue };
        let mut kib = || fields.next().and_then(|n| n.parse::<u64>().ok());
        match first {
            "Rss:" => r.mapping.resident_kib = kib().unwrap_or(0),
            // A page of its own (copied on write) would be lost: keep the mapping.
            "Anonymous:" => r.no_own_page = kib() == Some(0),
            "Swap:" | "Locked:" | "Private_Hugetlb:" | "Shared_Hugetlb:" => r.nothing_else &= kib() == Some(0),
            _ => {}
        }
    }
    finish(current.take());
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: i64 = 1 << 20;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_threads_cached_blocks_are_taken_and_freed_elsewhere() {
        std::thread::spawn(|| {
            // A fresh thread's cache is empty: the 7 blocks it frees of one
            // size are all there, and taken again.
            // SAFETY: each block is malloc's, freed once.
            let freed: Vec<usize> = (0..CACHED_PER_SIZE)
                .map(|_| unsafe { libc::malloc(500) } as usize)
                .collect();
            for block in &freed {
                unsafe { libc::free(*block as *mut libc::c_void) };
            }
            let taken = take_thread_cache();
            assert_eq!(taken.0.len(), CACHED_SIZES.count() * CACHED_PER_SIZE);
            for block in &freed {
                assert!(taken.0.contains(block), "block {block:#x} stayed in the thread's cache");
            }
            free_on_a_passing_thread(vec![taken]);
        })
        .join()
        .unwrap();
    }

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
        p.trimmed(MIB);
        assert!(!p.trim_now(4 * MIB), "3 MiB more since the trim is not worth one");
        assert!(p.trim_now(5 * MIB), "4 MiB more since the trim: trim again");
        p.trimmed(0);
        assert!(!p.trim_now(0), "the next load takes the free memory");
        assert!(p.trim_now(10 * MIB), "and leaves it: trim");
    }

    #[test]
    fn a_quiet_process_gives_back_even_a_little() {
        let mut p = Policy::default();
        assert!(!p.trim_now(0));
        assert!(!p.trim_now(2 * MIB), "still changing: a load may take it back");
        assert!(p.trim_now(2 * MIB + 1000), "quiet, and 1 MiB or more held: trim");
        p.trimmed(MIB / 4);
        assert!(!p.trim_now(MIB / 4), "what a trim left is not trimmed again");
        assert!(!p.trim_now(MIB), "quiet, but under 1 MiB gained");
        assert!(!p.trim_now(MIB));
    }

    #[test]
    fn code_goes_once_after_each_trim_when_no_connection_is_left() {
        let mut p = Policy::default();
        assert!(!p.release_code_now(0), "no load yet: start-up let go of what it ran");
        p.trimmed(0);
        assert!(!p.release_code_now(3), "connections still open would map it back");
        assert!(p.release_code_now(0), "the load has passed");
        assert!(!p.release_code_now(0), "once per trim");
        p.trimmed(0);
        assert!(p.release_code_now(0), "and again after the next load's trim");
    }

    #[test]
    fn a_trim_in_the_middle_of_a_load_does_not_hide_the_rest_of_it() {
        let mut p = Policy::default();
        assert!(!p.trim_now(0));
        // Half the load's connections closed between two checks: trim, and
        // the trim leaves little free.
        assert!(p.trim_now(7 * MIB));
        p.trimmed(MIB / 2);
        // The other half closes: what it frees is new, however much the
        // figure was before the first trim.
        assert!(p.trim_now(8 * MIB), "the rest of the load's memory is given back too");
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
7f0000600000-7f0000700000 r--p 00000000 08:01 66 /usr/lib/liby.so
Rss:                  64 kB
7f0000800000-7f0000a00000 r--p 00000000 00:0f 55 /anon_hugepage (deleted)
Rss:                   0 kB
Anonymous:             0 kB
Private_Hugetlb:    2048 kB
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
            "the relocated data (copied pages), the writable, shared, anonymous, locked, \
             huge and vDSO mappings stay, one whose own pages smaps does not tell too, \
             and one with nothing resident is skipped"
        );
        assert_eq!(droppable_mappings("not smaps\n\n12-zz r-xp\n"), []);
    }

    /// A file of `pages` pages mapped private and read-only, each page read
    /// (resident); a page is written first (a copy of its own) with `own`.
    struct Mapped {
        at: *mut u8,
        len: usize,
        _file: std::fs::File,
    }

    impl Mapped {
        fn new(pages: usize, own: bool) -> Mapped {
            use std::io::Write;
            let len = pages * page_size();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
                .unwrap();
            let prot = if own {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            // SAFETY: a new mapping of our own file, unmapped in Drop.
            let at = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_PRIVATE, fd, 0) };
            assert_ne!(at, libc::MAP_FAILED);
            let mapped = Mapped {
                at: at.cast(),
                len,
                _file: file,
            };
            if own {
                // SAFETY: inside the writable mapping; then made read-only.
                unsafe {
                    *mapped.at = 7;
                    assert_eq!(libc::mprotect(at, len, libc::PROT_READ), 0);
                }
            }
            assert_eq!(mapped.sum(), mapped.expected_sum(own));
            mapped
        }

        fn range(&self) -> (usize, usize) {
            (self.at as usize, self.at as usize + self.len)
        }

        fn sum(&self) -> u64 {
            // SAFETY: the mapping is `len` readable bytes.
            unsafe { std::slice::from_raw_parts(self.at, self.len) }
                .iter()
                .map(|&b| u64::from(b))
                .sum()
        }

        fn expected_sum(&self, own: bool) -> u64 {
            let file: u64 = (0..self.len).map(|i| (i % 251) as u64).sum();
            if own { file + 7 } else { file }
        }

        /// Its resident KiB, from smaps.
        fn resident_kib(&self) -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let header = format!("{:x}-", self.at as usize);
            let at = smaps.find(&header).expect("the mapping is in smaps");
            let rss = &smaps[at..][smaps[at..].find("\nRss:").unwrap() + 5..];
            rss.split_whitespace().next().unwrap().parse().unwrap()
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.at.cast(), self.len) };
        }
    }

    #[test]
    fn a_file_mapping_is_let_go_and_reads_back_the_same() {
        let mapped = Mapped::new(16, false);
        assert_eq!(mapped.resident_kib(), 16 * page_size() as u64 / 1024);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let released = release_within(mapped.range(), &droppable_mappings(&smaps));
        assert_eq!(released, 16 * page_size() as u64 / 1024);
        assert_eq!(mapped.resident_kib(), 0, "its pages are no longer mapped");
        assert_eq!(mapped.sum(), mapped.expected_sum(false), "and map back unchanged");
    }

    #[test]
    fn a_mapping_with_a_page_of_its_own_is_kept() {
        let mapped = Mapped::new(4, true);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        assert_eq!(release_within(mapped.range(), &droppable_mappings(&smaps)), 0);
        assert_eq!(
            mapped.sum(),
            mapped.expected_sum(true),
            "the written byte is still there"
        );
        assert!(mapped.resident_kib() > 0);
    }

    #[test]
    fn the_loaded_objects_read_only_pages_are_let_go() {
        let released = release_mapped_pages().expect("Linux has /proc/self/smaps");
        assert!(released > 0, "this test's own code was resident");
        assert_eq!(format!("{:?}", [1, 2]), "[1, 2]", "and runs again");
    }

    #[test]
    fn statm_read_again_through_one_descriptor_is_fresh() {
        let statm = Statm::open().expect("glibc on Linux");
        let before = statm.resident_anonymous().unwrap();
        let touched = std::hint::black_box(vec![1u8; 32 * MIB as usize]);
        let after = statm.resident_anonymous().unwrap();
        assert!(
            after >= before + 16 * MIB as usize,
            "32 MiB touched show as resident: {before} then {after}"
        );
        drop(touched);
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
        let statm = Statm::open().expect("glibc on Linux");
        let in_use = held_free(&statm).unwrap();
        drop(freed);
        let after = held_free(&statm).unwrap();
        drop(kept);
        // 32 MiB freed; the rest of the margin is for other tests' threads.
        assert!(
            after >= in_use + 16 * MIB,
            "freed memory shows as held free: {in_use} then {after}"
        );
    }
}
