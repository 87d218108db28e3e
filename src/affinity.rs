//! Client affinity's persistence: the pins of `model::Pins`, kept across
//! restarts in `state_dir/affinity.redb`, a redb file. This module writes and
//! reads that file and never chooses nodes; the rules of pins themselves (the
//! TTL, the per-cluster bound) are `model::pins`'s, and which pin a client
//! gets is the proxy's (see docs/availability.md).
//!
//! - Changed pins are marked dirty in memory and written in one transaction
//!   per [`FLUSH_INTERVAL`] by a background task (and once more at shutdown),
//!   never on a connection's path.
//! - A damaged file is logged, moved aside to `affinity.redb.corrupt.SECONDS`
//!   (the Unix time: a later damage keeps the earlier copies) and replaced
//!   by an empty one. A file that cannot be used for another reason (held by
//!   another process, no permission, a symbolic link) is left alone and pins
//!   are kept in memory only. The balancer never refuses to start because of
//!   this file.
//! - The file holds client addresses: `state_dir` is created 0700 and the
//!   file 0600 (an existing file is brought to 0600), and it is opened with
//!   `O_NOFOLLOW`: a symbolic link at its path is refused, never followed
//!   (root would write wherever it points).
//! - When no cluster has affinity at start and there is no file yet, the file
//!   is not created until there is a pin to write (a reload turned affinity
//!   on): opening it runs enough of the store library to cost about half a
//!   megabyte of resident memory, for nothing while no client is pinned. Not
//!   with `user`: the process may no longer create files in `state_dir`
//!   after it drops privileges, so the file is opened at start.

use std::fs::{DirBuilder, File, OpenOptions};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, NodeState};
use crate::model::{Change, Pin, Pins, WallClock, expired};

pub use crate::model::MAX_PINS_PER_CLUSTER;

/// The store's file name inside `state_dir`.
pub const STORE_FILE: &str = "affinity.redb";
/// How often changed pins are written to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// (cluster, client IP octets: 4 or 16) → (node name, last seen in Unix ms).
const PINS: TableDefinition<(&str, &[u8]), (&str, u64)> = TableDefinition::new("pins");

/// The pins of every cluster, and the file they are kept in.
pub struct Affinity {
    pins: Arc<Pins>,
    store: Mutex<Store>,
    /// The file, when there is one.
    path: Option<PathBuf>,
}

/// Where pins are written.
enum Store {
    /// Nowhere: pins live in memory only (no `state_dir`, or the store failed).
    None,
    /// To this file, which does not exist yet: it is created by the first
    /// flush that has a pin to write.
    Deferred(PathBuf),
    Open(Arc<Database>),
    /// Closed and left to the process this one is upgrading to: nothing is
    /// written (changes stay dirty, for the hand-over) until it is taken back.
    Lent(PathBuf),
}

/// A pin read from the store: cluster, client, pin.
type StoredPin = (String, IpAddr, Pin);

impl Affinity {
    /// Pins kept in memory only.
    pub fn in_memory() -> Affinity {
        Affinity::with_pins(Pins::default())
    }

    fn with_pins(pins: Pins) -> Affinity {
        Affinity {
            pins: Arc::new(pins),
            path: None,
            store: Mutex::new(Store::None),
        }
    }

    /// The pins in memory, which the data plane reads and writes.
    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// Opens (or creates) the store under `state_dir` and loads the pins that
    /// `config` still honours: their cluster has affinity, their node still
    /// exists, their TTL has not run out. An empty `state_dir` means no store.
    /// Without a file and without a cluster that has affinity, there is
    /// nothing to load or clean up: the file is created later, when needed.
    /// At most `limit` pins per cluster, aged by `clock`.
    /// Never fails: problems are logged and pins are then kept in memory.
    /// Blocking (file I/O): call it from a blocking context.
    pub fn open(state_dir: &Path, config: &Config, limit: usize, clock: WallClock) -> Affinity {
        let mut affinity = Affinity::with_pins(Pins::new(limit, clock));
        if state_dir.as_os_str().is_empty() {
            return affinity;
        }
        affinity.path = Some(state_dir.join(STORE_FILE));
        if let Err(e) = DirBuilder::new().recursive(true).mode(0o700).create(state_dir) {
            error!(
                "cannot create state_dir {}: {e}; client affinity will not survive a restart",
                state_dir.display()
            );
            return affinity;
        }
        if let Ok(meta) = std::fs::metadata(state_dir)
            && meta.mode() & 0o077 != 0
        {
            warn!(
                "state_dir {} is open to other users (mode {:04o}); its files are 0600, but 0700 hides even their names",
                state_dir.display(),
                meta.mode() & 0o7777
            );
        }
        let path = state_dir.join(STORE_FILE);
        if !config.clusters.iter().any(|c| c.affinity) && !path.exists() && config.run_as.is_none() {
            *affinity.store() = Store::Deferred(path);
            return affinity;
        }
        let Some((db, entries)) = open_store(&path) else {
            return affinity;
        };
        let kept = affinity.pins.restore(entries, |cluster, pin, now| {
            config.cluster(cluster).is_some_and(|c| {
                c.affinity
                    && c.nodes
                        .iter()
                        .any(|n| *n.name == *pin.node && n.state != NodeState::Red)
                    && !expired(pin.last_seen_ms, c.affinity_ttl, now)
            })
        });
        info!("affinity store {}: {kept} pin(s) restored", path.display());
        *affinity.store() = Store::Open(Arc::new(db));
        affinity
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the deferred store (see [`Affinity::open`]). `None`: there is
    /// no store, or it cannot be used (logged; pins then stay in memory).
    /// Blocking.
    fn open_deferred(&self) -> Option<Arc<Database>> {
        let path = match &*self.store() {
            Store::Deferred(path) => path.clone(),
            Store::Open(db) => return Some(db.clone()),
            Store::None | Store::Lent(_) => return None,
        };
        let opened = open_store(&path);
        let mut store = self.store();
        let Some((db, entries)) = opened else {
            *store = Store::None;
            return None;
        };
        // Pins another process wrote since start: this process never loaded
        // them, so (as at start) they go at this first flush.
        self.pins
            .forget_unknown(entries.into_iter().map(|(cluster, ip, _)| (cluster, ip)));
        info!("affinity store {} created", path.display());
        let db = Arc::new(db);
        *store = Store::Open(db.clone());
        Some(db)
    }

    /// How many pins `cluster` holds now.
    pub fn len(&self, cluster: &str) -> usize {
        self.pins.len(cluster)
    }

    pub fn is_empty(&self, cluster: &str) -> bool {
        self.pins.is_empty(cluster)
    }

    /// Whether pins are written to a file (one still to be created included).
    pub fn is_persistent(&self) -> bool {
        !matches!(*self.store(), Store::None)
    }

    /// Writes every pin changed since the last flush, in one transaction.
    /// Blocking. Returns how many pins were written or deleted. On failure the
    /// changes stay dirty for the next flush.
    pub fn flush(&self) -> Result<usize, redb::Error> {
        let store = match &*self.store() {
            Store::Open(db) => Some(db.clone()),
            Store::Deferred(_) => None,
            Store::None | Store::Lent(_) => return Ok(0),
        };
        let db = match store {
            Some(db) => db,
            None if !self.pins.has_dirty() => return Ok(0),
            None => match self.open_deferred() {
                Some(db) => db,
                None => return Ok(0),
            },
        };
        let changes = self.pins.take_dirty();
        if changes.is_empty() {
            return Ok(0);
        }
        match write(&db, &changes) {
            Ok(()) => Ok(changes.len()),
            Err(e) => {
                self.pins.mark_dirty(&changes);
                Err(e)
            }
        }
    }
    /// Flushes once more and closes the store; later pins stay in memory.
    pub fn close(&self) {
        if let Err(e) = self.flush() {
            error!("affinity store: last write failed: {e}");
        }
        *self.store() = Store::None;
    }

    /// Flushes and closes the file so that the process this one upgrades to
    /// can open it; pins changed from now on stay dirty in memory, to be
    /// handed over ([`Pins::take_dirty`]) or written after
    /// [`Affinity::take_back`]. Blocking.
    pub fn lend(&self) {
        if let Err(e) = self.flush() {
            error!("affinity store: last write before the upgrade failed: {e}");
        }
        let mut store = self.store();
        let path = match &*store {
            Store::Open(_) | Store::Deferred(_) => self.path.clone(),
            Store::None | Store::Lent(_) => return,
        };
        if let Some(path) = path {
            *store = Store::Lent(path);
        }
    }

    /// After an upgrade that did not happen: the file is this process's again
    /// (reopened by the next flush that has a pin to write).
    pub fn take_back(&self) {
        let mut store = self.store();
        if let Store::Lent(path) = &*store {
            *store = Store::Deferred(path.clone());
        }
    }
}

/// Flushes `affinity` every [`FLUSH_INTERVAL`] until `stop` is cancelled, then
/// flushes a last time and closes the store.
pub async fn run_flusher(affinity: Arc<Affinity>, stop: CancellationToken) {
    if !affinity.is_persistent() {
        return;
    }
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let a = affinity.clone();
        match tokio::task::spawn_blocking(move || a.flush()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("affinity store: write failed ({e}); will retry"),
            Err(e) => error!("affinity store: flush task failed: {e}"),
        }
    }
    let a = affinity.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || a.close()).await {
        error!("affinity store: closing failed: {e}");
    }
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from_octets(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Why the store could not be opened.
enum StoreError {
    /// The file's contents are unreadable: it is moved aside and replaced.
    Damaged(String),
    /// The file may be fine but cannot be used now (held by another process,
    /// no permission, disk error): it is left alone.
    Unusable(String),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> StoreError {
        use std::io::ErrorKind::{InvalidData, UnexpectedEof};
        let damaged = match &e {
            redb::Error::Corrupted(_)
            | redb::Error::UpgradeRequired(_)
            | redb::Error::RepairAborted
            | redb::Error::ValueTooLarge(_)
            | redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. }
            | redb::Error::TableIsMultimap(_) => true,
            redb::Error::Io(io) => matches!(io.kind(), InvalidData | UnexpectedEof),
            _ => false,
        };
        if damaged {
            StoreError::Damaged(e.to_string())
        } else {
            StoreError::Unusable(e.to_string())
        }
    }
}

/// Opens (or creates) the store at `path` and reads every pin in it. A damaged
/// file is moved aside and replaced by an empty store; `None` (logged): the
/// file cannot be used, pins stay in memory.
fn open_store(path: &Path) -> Option<(Database, Vec<StoredPin>)> {
    match open_and_read(path) {
        Ok(loaded) => Some(loaded),
        Err(StoreError::Unusable(e)) => {
            // Not the file's fault (another process holds it, no permission...): leave it be.
            error!(
                "cannot open affinity store {}: {e}; client affinity will not survive a restart",
                path.display()
            );
            None
        }
        Err(StoreError::Damaged(e)) => {
            let aside = aside_name(path);
            error!(
                "affinity store {} is damaged ({e}); moving it to {} and starting an empty one",
                path.display(),
                aside.display()
            );
            match std::fs::rename(path, &aside) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => error!("cannot move {} aside: {e}", path.display()),
            }
            match open_and_read(path) {
                Ok(loaded) => Some(loaded),
                Err(StoreError::Damaged(e) | StoreError::Unusable(e)) => {
                    error!(
                        "cannot create a fresh affinity store at {}: {e}; client affinity will not survive a restart",
                        path.display()
                    );
                    None
                }
            }
        }
    }
}

/// Where a damaged store at `path` is moved: `PATH.corrupt.SECONDS`, a name
/// no earlier copy has (`-2`, `-3`, ... within one second).
fn aside_name(path: &Path) -> PathBuf {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.corrupt.{seconds}", path.display());
    (1..)
        .map(|n| PathBuf::from(if n == 1 { base.clone() } else { format!("{base}-{n}") }))
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .expect("some name is free")
}

/// Opens (or creates, 0600) the store's file at `path`, never through a
/// symbolic link, and brings it to 0600.
fn open_file(path: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => StoreError::Unusable("it is a symbolic link: refused, never followed".into()),
            _ => StoreError::Unusable(e.to_string()),
        })?;
    let meta = file.metadata().map_err(|e| StoreError::Unusable(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(StoreError::Unusable("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Unusable(format!("cannot make it 0600: {e}")))?;
        info!(
            "affinity store {}: mode {:04o} made 0600",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(file)
}

/// Opens or creates the store at `path` and reads every pin in it. A panic
/// inside the store library on a damaged file counts as damage too.
fn open_and_read(path: &Path) -> Result<(Database, Vec<StoredPin>), StoreError> {
    let file = open_file(path)?;
    panic::catch_unwind(AssertUnwindSafe(|| -> Result<_, redb::Error> {
        let backend = redb::backends::FileBackend::new(file)?;
        let db = Database::builder().create_with_backend(backend)?;
        // Make sure the table exists, so that reading a fresh file works.
        let txn = db.begin_write()?;
        txn.open_table(PINS)?;
        txn.commit()?;
        let mut entries = Vec::new();
        let txn = db.begin_read()?;
        let table = txn.open_table(PINS)?;
        for row in table.iter()? {
            let (key, value) = row?;
            let (cluster, ip) = key.value();
            let (node, last_seen_ms) = value.value();
            if let Some(ip) = ip_from_octets(ip) {
                let pin = Pin {
                    node: node.into(),
                    last_seen_ms,
                };
                entries.push((cluster.to_string(), ip, pin));
            }
        }
        drop(table);
        drop(txn);
        Ok((db, entries))
    }))
    .map_err(|_| StoreError::Damaged("the store library panicked while reading it".to_string()))?
    .map_err(StoreError::from)
}

fn write(db: &Database, changes: &[Change]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(PINS)?;
        for (cluster, ip, pin) in changes {
            let octets = ip_octets(*ip);
            let key = (cluster.as_str(), octets.as_slice());
            match pin {
                Some((node, last_seen_ms)) => {
                    table.insert(key, (&**node, *last_seen_ms))?;
                }
                None => {
                    table.remove(key)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ttl: &str) -> Config {
        let text = format!(
            "state_dir = \"\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\naffinity = true\naffinity_ttl = \"{ttl}\"\n\
             [[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
             [[cluster.node]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n"
        );
        Config::parse(&text, "test").unwrap()
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + i))
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn ten_thousand_pins_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = config("1d");
        let store = Affinity::open(dir.path(), &config, MAX_PINS_PER_CLUSTER, WallClock::System);
        assert!(store.is_persistent());
        for i in 1..=10_000 {
            store.pins().pin("c", ip(i), if i % 3 == 0 { "a" } else { "b" });
        }
        store.close();
        drop(store);

        let store = Affinity::open(dir.path(), &config, MAX_PINS_PER_CLUSTER, WallClock::System);
        assert_eq!(store.len("c"), 10_000);
        for i in 1..=10_000 {
            let want = if i % 3 == 0 { "a" } else { "b" };
            assert_eq!(
                store.pins().pinned("c", ip(i), DAY).as_deref(),
                Some(want),
                "client {}",
                ip(i)
            );
        }
    }

    #[test]
    fn eviction_is_persisted_and_the_bound_holds_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let config = config("1d");
        let store = Affinity::open(dir.path(), &config, 10, WallClock::System);
        for i in 1..=20 {
            store.pins().pin("c", ip(i), "a");
        }
        store.close();
        let store = Affinity::open(dir.path(), &config, 5, WallClock::System);
        assert_eq!(store.len("c"), 5);
        for i in 16..=20 {
            assert!(
                store.pins().pinned("c", ip(i), DAY).is_some(),
                "most recent client {i} kept"
            );
        }
    }

    #[test]
    fn pins_of_removed_nodes_and_clusters_without_affinity_are_dropped_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        store.pins().pin("c", ip(1), "a");
        store.pins().pin("c", ip(2), "gone");
        store.pins().pin("other", ip(3), "a");
        store.close();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert_eq!(store.pins().pinned("c", ip(1), DAY).as_deref(), Some("a"));
        assert!(store.pins().pinned("c", ip(2), DAY).is_none());
        assert!(store.pins().pinned("other", ip(3), DAY).is_none());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STORE_FILE),
            b"this is not a redb file at all, not even close",
        )
        .unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert!(store.is_persistent(), "a fresh store replaces the corrupt one");
        assert_eq!(corrupt_copies(dir.path()).len(), 1);
        store.pins().pin("c", ip(1), "b");
        store.close();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert_eq!(store.pins().pinned("c", ip(1), DAY).as_deref(), Some("b"));
    }

    /// The damaged copies moved aside in `dir`, with their contents.
    fn corrupt_copies(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("affinity.redb.corrupt.")
            })
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        found.sort();
        found
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_second_damage_keeps_the_first_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        for garbage in [&b"first garbage, not a store"[..], b"second garbage, not a store"] {
            std::fs::write(&path, garbage).unwrap();
            let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
            assert!(store.is_persistent());
            store.close();
        }
        let copies = corrupt_copies(dir.path());
        let contents: Vec<&[u8]> = copies.iter().map(|(_, c)| c.as_slice()).collect();
        assert_eq!(copies.len(), 2, "{copies:?}");
        assert!(
            contents.contains(&&b"first garbage, not a store"[..]),
            "the first copy stays"
        );
        assert!(contents.contains(&&b"second garbage, not a store"[..]));
        for (name, _) in &copies {
            assert_eq!(mode(&dir.path().join(name)), 0o600, "{name}");
        }
    }

    #[test]
    fn the_store_is_private_to_its_owner() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let store = Affinity::open(&dir, &config("1d"), 100, WallClock::System);
        store.pins().pin("c", ip(1), "a");
        store.close();
        assert_eq!(mode(&dir), 0o700, "state_dir");
        assert_eq!(mode(&dir.join(STORE_FILE)), 0o600, "the store");
        // A file left world-readable (by an older version) is made private.
        std::fs::set_permissions(dir.join(STORE_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Affinity::open(&dir, &config("1d"), 100, WallClock::System);
        assert_eq!(store.pins().pinned("c", ip(1), DAY).as_deref(), Some("a"));
        assert_eq!(mode(&dir.join(STORE_FILE)), 0o600);
    }

    #[test]
    fn a_symlink_at_the_store_path_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("somewhere-else");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(STORE_FILE)).unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert!(!store.is_persistent(), "pins stay in memory");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious", "the target is untouched");
        assert!(
            std::fs::symlink_metadata(dir.path().join(STORE_FILE))
                .unwrap()
                .file_type()
                .is_symlink(),
            "the link is left alone, not moved aside"
        );
        assert!(corrupt_copies(dir.path()).is_empty());
        // A dangling link is refused too: nothing is created where it points.
        let dangling = tempfile::tempdir().unwrap();
        let nowhere = dangling.path().join("nowhere");
        std::os::unix::fs::symlink(&nowhere, dangling.path().join(STORE_FILE)).unwrap();
        let store = Affinity::open(dangling.path(), &config("1d"), 100, WallClock::System);
        assert!(!store.is_persistent());
        assert!(!nowhere.exists());
    }

    #[test]
    fn a_truncated_file_is_damaged_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        store.pins().pin("c", ip(1), "b");
        store.close();
        drop(store);
        let path = dir.path().join(STORE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 3)
            .unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert!(store.is_persistent());
        assert_eq!(corrupt_copies(dir.path()).len(), 1, "moved aside");
    }

    #[test]
    fn a_store_held_by_another_owner_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        first.pins().pin("c", ip(1), "b");
        let second = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert!(!second.is_persistent(), "the second owner keeps pins in memory");
        assert!(corrupt_copies(dir.path()).is_empty(), "the file was not moved");
        first.close();
        let again = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert_eq!(again.pins().pinned("c", ip(1), DAY).as_deref(), Some("b"));
    }

    fn without_affinity() -> Config {
        Config::parse(
            "state_dir = \"\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
            "test",
        )
        .unwrap()
    }

    #[test]
    fn without_affinity_the_file_waits_for_a_first_pin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let store = Affinity::open(dir.path(), &without_affinity(), 100, WallClock::System);
        assert!(store.is_persistent());
        assert_eq!(store.flush().unwrap(), 0);
        assert!(!path.exists(), "nothing to write: no file yet");
        // A reload turned affinity on and a client was pinned.
        store.pins().pin("c", ip(1), "a");
        assert_eq!(store.flush().unwrap(), 1);
        assert!(path.exists());
        store.close();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert_eq!(store.pins().pinned("c", ip(1), DAY).as_deref(), Some("a"));
    }

    #[test]
    fn without_affinity_an_existing_file_is_still_cleaned_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        store.pins().pin("c", ip(1), "a");
        store.close();
        let store = Affinity::open(dir.path(), &without_affinity(), 100, WallClock::System);
        assert!(store.pins().pinned("c", ip(1), DAY).is_none());
        store.close();
        let store = Affinity::open(dir.path(), &config("1d"), 100, WallClock::System);
        assert!(
            store.pins().pinned("c", ip(1), DAY).is_none(),
            "dropped from the file too"
        );
    }

    #[test]
    fn an_unusable_state_dir_means_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let store = Affinity::open(&file, &config("1d"), 100, WallClock::System);
        assert!(!store.is_persistent());
        store.pins().pin("c", ip(1), "a");
        assert_eq!(store.pins().pinned("c", ip(1), DAY).as_deref(), Some("a"));
    }
}
