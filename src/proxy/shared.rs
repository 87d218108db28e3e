//! What every connection task shares: the live state (snapshot and pins),
//! the tracker of connection tasks, the cut at the end of the shutdown
//! grace, and the count of open clients under the global limit. Data only.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::model::Live;

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) live: Arc<Live>,
    /// Cancelled when the shutdown grace period ends: open connections are cut
    /// (each waits on its accept loop's child of this token).
    pub(crate) cut_all: CancellationToken,
    pub(crate) connections: TaskTracker,
    /// Client connections admitted and not yet closed, all services together.
    pub(crate) open_clients: Arc<AtomicU64>,
}

impl Shared {
    pub(crate) fn new(live: Arc<Live>) -> Shared {
        Shared {
            live,
            cut_all: CancellationToken::new(),
            connections: TaskTracker::new(),
            open_clients: Default::default(),
        }
    }
}
