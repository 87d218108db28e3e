//! Memory given back after a load: the allocator (glibc's) keeps the memory
//! of freed connections in its free lists, per thread, for good; after a
//! load of thousands of connections the process would stay at its peak.
//! Once the open connections have fallen to half their peak, this task asks
//! the allocator to return its free pages to the system (`malloc_trim`).
//! Never while the load holds: a trim walks every arena under its lock, and
//! workers allocating meanwhile would wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proxy::DataPlane;

/// How often the open connections are looked at.
const CHECK: Duration = Duration::from_secs(2);

/// When a trim is due, as the open connections rise and fall.
#[derive(Debug, Default)]
struct Policy {
    /// The most connections open since the last trim.
    peak: usize,
}

/// A peak below this leaves too little to give back to be worth a trim.
const MIN_PEAK: usize = 64;

impl Policy {
    /// Takes the number of connections open now; `true` when the load has
    /// passed (half its peak or less, of a peak worth trimming after).
    fn trim_now(&mut self, open: usize) -> bool {
        self.peak = self.peak.max(open);
        if self.peak >= MIN_PEAK && open <= self.peak / 2 {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Watches `data`'s open connections until `stop`, trimming after each load.
pub async fn trim_after_load(data: Arc<DataPlane>, stop: CancellationToken) {
    let mut policy = Policy::default();
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if policy.trim_now(data.open_connections()) {
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

/// Returns the allocator's free pages to the system.
fn trim() {
    let started = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
    debug!("gave free memory back to the system in {:?}", started.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_each_load_once_it_has_halved() {
        let mut p = Policy::default();
        let trims: Vec<bool> = [0, 10, 30, 20, 5].into_iter().map(|n| p.trim_now(n)).collect();
        assert_eq!(trims, [false; 5], "too small a load to trim after");
        let mut p = Policy::default();
        let rising: Vec<bool> = [100, 4000, 4000, 2500].into_iter().map(|n| p.trim_now(n)).collect();
        assert_eq!(rising, [false; 4], "the load holds: no trim");
        assert!(p.trim_now(1900), "half the peak: trim");
        assert!(!p.trim_now(1500), "once per load");
        assert!(!p.trim_now(1000));
        assert!(p.trim_now(700), "halved again from where the last trim left it");
        assert!(!p.trim_now(4000));
        assert!(p.trim_now(0), "the next load over");
    }
}
