//! Client pins in memory: which node each client IP of a cluster is pinned
//! to, and when it was last seen. The hot path's side of affinity: a lookup
//! and an update per connection under one short mutex, no I/O. Which pins a
//! connection asks for and makes is the proxy's business; writing them to a
//! file is `crate::affinity`'s, through the dirty set kept here.
//!
//! - Each cluster keeps at most `limit` pins; beyond that the least recently
//!   seen client is forgotten.
//! - A pin lives for the cluster's `affinity_ttl` after its client was last
//!   seen. Time is wall-clock (Unix milliseconds, from a [`WallClock`]),
//!   because pins outlive the process.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;

/// Most pins a cluster keeps (memory: roughly 100 bytes each).
pub const MAX_PINS_PER_CLUSTER: usize = 1_000_000;

/// Where pins read the time: the system's clock, or one a test moves by hand.
#[derive(Debug, Clone, Default)]
pub enum WallClock {
    #[default]
    System,
    /// Unix milliseconds, set by [`WallClock::advance`].
    Manual(Arc<AtomicU64>),
}

impl WallClock {
    /// A clock that stands still at `start_ms` until advanced.
    pub fn manual(start_ms: u64) -> WallClock {
        WallClock::Manual(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Unix milliseconds now.
    pub fn now_ms(&self) -> u64 {
        match self {
            WallClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            WallClock::Manual(ms) => ms.load(Relaxed),
        }
    }

    /// Moves a manual clock on by `by`; the system's clock moves by itself.
    pub fn advance(&self, by: Duration) {
        if let WallClock::Manual(ms) = self {
            ms.fetch_add(by.as_millis() as u64, Relaxed);
        }
    }
}

/// One pin: the node, and when its client was last seen (Unix ms).
#[derive(Debug, Clone)]
pub struct Pin {
    pub node: Arc<str>,
    pub last_seen_ms: u64,
}

/// A pin to write to the store (cluster, client, pin); `None`: delete it.
pub type Change = (String, IpAddr, Option<(Arc<str>, u64)>);

/// One cluster's pins, most recently seen last.
struct ClusterPins {
    pins: LruCache<IpAddr, Pin>,
    /// Clients whose pin changed (or went) since the last flush.
    dirty: HashSet<IpAddr>,
}

impl ClusterPins {
    fn new() -> ClusterPins {
        ClusterPins {
            pins: LruCache::unbounded(),
            dirty: HashSet::new(),
        }
    }
}

/// The pins of every cluster.
pub struct Pins {
    clusters: Mutex<HashMap<String, ClusterPins>>,
    limit: usize,
    clock: WallClock,
}

impl Default for Pins {
    fn default() -> Pins {
        Pins::new(MAX_PINS_PER_CLUSTER, WallClock::System)
    }
}

impl Pins {
    /// At most `limit` pins per cluster, aged by `clock`.
    pub fn new(limit: usize, clock: WallClock) -> Pins {
        Pins {
            clusters: Mutex::new(HashMap::new()),
            limit: limit.max(1),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ClusterPins>> {
        // A panic elsewhere while holding the lock leaves the map consistent (every
        // update is one call on it): keep serving.
        self.clusters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The clock pins are aged by.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// The node `client` is pinned to in `cluster`, if its pin is younger than
    /// `ttl`. An expired pin is forgotten.
    pub fn pinned(&self, cluster: &str, client: IpAddr, ttl: Duration) -> Option<Arc<str>> {
        let now = self.clock.now_ms();
        let mut clusters = self.lock();
        let table = clusters.get_mut(cluster)?;
        let pin = table.pins.get(&client)?;
        if !expired(pin.last_seen_ms, ttl, now) {
            return Some(pin.node.clone());
        }
        table.pins.pop(&client);
        table.dirty.insert(client);
        None
    }

    /// Pins `client` to `node` in `cluster` (or refreshes the pin), seen now.
    pub fn pin(&self, cluster: &str, client: IpAddr, node: &str) {
        let now = self.clock.now_ms();
        let mut clusters = self.lock();
        let table = match clusters.get_mut(cluster) {
            Some(t) => t,
            None => clusters.entry(cluster.to_string()).or_insert_with(ClusterPins::new),
        };
        match table.pins.get_mut(&client) {
            Some(pin) if *pin.node == *node => pin.last_seen_ms = now,
            _ => {
                table.pins.put(
                    client,
                    Pin {
                        node: node.into(),
                        last_seen_ms: now,
                    },
                );
                if table.pins.len() > self.limit
                    && let Some((evicted, _)) = table.pins.pop_lru()
                {
                    table.dirty.insert(evicted);
                }
            }
        }
        table.dirty.insert(client);
    }

    /// Marks `client` as seen now, if it has a pin in `cluster`.
    pub fn touch(&self, cluster: &str, client: IpAddr) {
        let now = self.clock.now_ms();
        let mut clusters = self.lock();
        if let Some(table) = clusters.get_mut(cluster)
            && let Some(pin) = table.pins.get_mut(&client)
        {
            pin.last_seen_ms = now;
            table.dirty.insert(client);
        }
    }

    /// Drops every pin to `node` in `cluster` (the node turned red): its
    /// clients are pinned anew on their next connection. Returns how many.
    pub fn forget_node(&self, cluster: &str, node: &str) -> usize {
        let mut clusters = self.lock();
        let Some(table) = clusters.get_mut(cluster) else {
            return 0;
        };
        let gone: Vec<IpAddr> = table
            .pins
            .iter()
            .filter(|(_, pin)| *pin.node == *node)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &gone {
            table.pins.pop(ip);
            table.dirty.insert(*ip);
        }
        gone.len()
    }

    /// How many pins `cluster` holds now (expired ones not yet noticed included).
    pub fn len(&self, cluster: &str) -> usize {
        self.lock().get(cluster).map_or(0, |t| t.pins.len())
    }

    pub fn is_empty(&self, cluster: &str) -> bool {
        self.len(cluster) == 0
    }

    /// Whether any pin changed since the last [`Pins::take_dirty`].
    pub fn has_dirty(&self) -> bool {
        self.lock().values().any(|t| !t.dirty.is_empty())
    }

    /// Every pin changed since the last call, as it is now (`None`: gone).
    pub fn take_dirty(&self) -> Vec<Change> {
        let mut clusters = self.lock();
        let mut changes = Vec::new();
        for (name, table) in clusters.iter_mut() {
            for ip in table.dirty.drain() {
                let pin = table.pins.peek(&ip).map(|p| (p.node.clone(), p.last_seen_ms));
                changes.push((name.clone(), ip, pin));
            }
        }
        changes
    }

    /// Marks these clients' pins changed again (a write of them failed).
    pub fn mark_dirty(&self, changes: &[Change]) {
        let mut clusters = self.lock();
        for (cluster, ip, _) in changes {
            if let Some(t) = clusters.get_mut(cluster) {
                t.dirty.insert(*ip);
            }
        }
    }

    /// Loads stored pins, oldest first. `honoured` says whether a pin still
    /// holds (its cluster and node exist, its TTL has not run out, given the
    /// time now); the others, and those past the limit, are marked to be
    /// deleted from the store. Returns how many were kept.
    pub fn restore(
        &self,
        mut entries: Vec<(String, IpAddr, Pin)>,
        honoured: impl Fn(&str, &Pin, u64) -> bool,
    ) -> usize {
        let now = self.clock.now_ms();
        entries.sort_by_key(|(_, _, pin)| pin.last_seen_ms);
        let mut kept = 0;
        let mut clusters = self.lock();
        for (cluster_name, ip, pin) in entries {
            let keep = honoured(&cluster_name, &pin, now);
            let table = clusters.entry(cluster_name).or_insert_with(ClusterPins::new);
            if keep {
                table.pins.put(ip, pin);
                kept += 1;
            }
            // Dropped pins (and those evicted below) are deleted at the first flush.
            table.dirty.insert(ip);
        }
        for table in clusters.values_mut() {
            while table.pins.len() > self.limit {
                table.pins.pop_lru();
                kept -= 1;
            }
            let ClusterPins { pins, dirty } = table;
            dirty.retain(|ip| !pins.contains(ip));
        }
        kept
    }

    /// Takes a pin learnt from elsewhere (the process this one upgraded):
    /// `Some` pins `client` unless the pin held here was seen later; `None`
    /// drops its pin. Marked changed, so the file learns it too.
    pub fn learn(&self, cluster: &str, client: IpAddr, pin: Option<Pin>) {
        let mut clusters = self.lock();
        let table = clusters.entry(cluster.to_string()).or_insert_with(ClusterPins::new);
        match pin {
            Some(pin) => {
                if table
                    .pins
                    .peek(&client)
                    .is_some_and(|held| held.last_seen_ms > pin.last_seen_ms)
                {
                    return;
                }
                table.pins.put(client, pin);
                if table.pins.len() > self.limit
                    && let Some((evicted, _)) = table.pins.pop_lru()
                {
                    table.dirty.insert(evicted);
                }
            }
            None => {
                table.pins.pop(&client);
            }
        }
        table.dirty.insert(client);
    }

    /// Marks for deletion the stored clients this process does not hold (a
    /// file another process wrote, loaded late).
    pub fn forget_unknown(&self, stored: impl IntoIterator<Item = (String, IpAddr)>) {
        let mut clusters = self.lock();
        for (cluster, ip) in stored {
            let table = clusters.entry(cluster).or_insert_with(ClusterPins::new);
            if !table.pins.contains(&ip) {
                table.dirty.insert(ip);
            }
        }
    }
}

/// Whether a pin last seen at `last_seen_ms` has outlived `ttl` at `now_ms`.
pub fn expired(last_seen_ms: u64, ttl: Duration, now_ms: u64) -> bool {
    now_ms.saturating_sub(last_seen_ms) > ttl.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + i))
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn the_least_recently_seen_client_is_evicted() {
        let pins = Pins::new(3, WallClock::System);
        for i in 1..=3 {
            pins.pin("c", ip(i), "a");
        }
        pins.pinned("c", ip(1), DAY); // seen again: now the most recent
        pins.pin("c", ip(4), "b");
        assert_eq!(pins.len("c"), 3);
        assert!(pins.pinned("c", ip(2), DAY).is_none(), "oldest evicted");
        for i in [1, 3, 4] {
            assert!(pins.pinned("c", ip(i), DAY).is_some(), "client {i} kept");
        }
    }

    #[test]
    fn forgetting_a_node_drops_its_pins_only() {
        let pins = Pins::default();
        pins.pin("c", ip(1), "a");
        pins.pin("c", ip(2), "b");
        pins.pin("c", ip(3), "a");
        assert_eq!(pins.forget_node("c", "a"), 2);
        assert!(pins.pinned("c", ip(1), DAY).is_none());
        assert_eq!(pins.pinned("c", ip(2), DAY).as_deref(), Some("b"));
    }

    #[test]
    fn a_pin_lives_for_its_ttl_after_its_client_was_last_seen() {
        let clock = WallClock::manual(1_000_000);
        let pins = Pins::new(10, clock.clone());
        let ttl = Duration::from_secs(60);
        pins.pin("c", ip(1), "a");
        clock.advance(Duration::from_secs(59));
        assert!(pins.pinned("c", ip(1), ttl).is_some(), "within the TTL");
        pins.touch("c", ip(1));
        clock.advance(Duration::from_secs(59));
        assert!(
            pins.pinned("c", ip(1), ttl).is_some(),
            "seen again: the TTL starts over"
        );
        clock.advance(Duration::from_secs(2));
        assert!(pins.pinned("c", ip(1), ttl).is_none(), "61 s after it was last seen");
        assert!(pins.pinned("c", ip(1), DAY).is_none(), "forgotten once expired");
        let changes = pins.take_dirty();
        assert!(
            changes
                .iter()
                .any(|(c, i, pin)| c == "c" && *i == ip(1) && pin.is_none()),
            "the store is told to delete it: {changes:?}"
        );
    }
}
