//! What the data plane asks of the store twins share their pins through
//! (`[shared]`): a face, [`PinStore`], that `crate::shared` implements, so
//! the proxy reaches the store without knowing it; and the store's figures
//! ([`StoreFigures`]) for status and metrics. No I/O here.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin as PinBox;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::pins::Pin;

/// A lookup's answer, boxed: a store is chosen at run time.
pub type Lookup<'a> = PinBox<Box<dyn Future<Output = Option<Pin>> + Send + 'a>>;
/// A write that is done (or given up on, and queued) once it resolves.
pub type Written<'a> = PinBox<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The store's side of affinity, as a connection sees it.
pub trait PinStore: Send + Sync {
    /// The pin the store holds for `client` in `cluster`, within the
    /// lookup budget; `None` when it holds none, is down, or did not answer
    /// in time (the caller then decides from what this instance knows).
    fn lookup<'a>(&'a self, cluster: &'a str, client: IpAddr) -> Lookup<'a>;
    /// A pin made or refreshed here, to be written to the store. Never
    /// waits: the store's own task writes it, or keeps it until it can.
    fn write(&self, pin: PinRecord<'_>);
    /// A new client's first pin, written before its connection goes on,
    /// so that its next connection finds it through any twin: within what
    /// its lookup, which took `looked_up`, left of the budget (one budget
    /// per new client, both requests together); past it, queued as
    /// [`PinStore::write`] does.
    fn write_new<'a>(&'a self, pin: PinRecord<'a>, looked_up: Duration) -> Written<'a>;
}

/// A pin to write: whose, to which node, when seen, for how long.
#[derive(Clone, Copy, Debug)]
pub struct PinRecord<'a> {
    pub cluster: &'a str,
    pub client: IpAddr,
    pub node: &'a str,
    pub last_seen_ms: u64,
    pub ttl: Duration,
}

/// The store's figures: whether it answers, and what it cost.
#[derive(Debug, Default)]
pub struct StoreFigures {
    up: AtomicBool,
    requests: AtomicU64,
    request_micros: AtomicU64,
    errors: AtomicU64,
    lookup_timeouts: AtomicU64,
    /// Clients' requests past their budget since the store last answered
    /// one in time: at [`SLOW_AFTER`], clients stop asking it.
    timeouts_in_a_row: AtomicU32,
}

/// How many clients' requests in a row may run past their budget before
/// the store counts as slow: a hung store costs that many clients their
/// budget, not every client until the store's own task sees it down.
pub const SLOW_AFTER: u32 = 3;

impl StoreFigures {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }
    /// Sets whether the store answers; returns whether that changed.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Relaxed) != up
    }
    /// One request answered (or failed) after `took`.
    pub fn count_request(&self, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        self.request_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    pub fn count_lookup_timeout(&self) {
        self.lookup_timeouts.fetch_add(1, Relaxed);
        self.timeouts_in_a_row.fetch_add(1, Relaxed);
    }
    /// Whether clients should ask the store: it is up, and not slow.
    pub fn is_answering(&self) -> bool {
        self.is_up() && !self.is_slow()
    }
    /// Whether the store ran past [`SLOW_AFTER`] clients' budgets in a row.
    pub fn is_slow(&self) -> bool {
        self.timeouts_in_a_row.load(Relaxed) >= SLOW_AFTER
    }
    /// The store answered a request in time: clients ask it again.
    pub fn answered_in_time(&self) {
        if self.timeouts_in_a_row.load(Relaxed) != 0 {
            self.timeouts_in_a_row.store(0, Relaxed);
        }
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }
    /// Seconds spent on requests, all together.
    pub fn request_seconds(&self) -> f64 {
        self.request_micros.load(Relaxed) as f64 / 1e6
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Relaxed)
    }
    pub fn lookup_timeouts(&self) -> u64 {
        self.lookup_timeouts.load(Relaxed)
    }
}
