//! What every connection task shares: the live state (snapshot and pins),
//! the tracker of connection tasks, the cut at the end of the shutdown
//! grace, the hand-over of an upgrade, and the count of open clients under
//! the global limit. Data only.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::model::{ConnectionState, Live};

/// A connection leaving this process: its state, its client socket and its node socket.
pub struct Departing {
    pub state: ConnectionState,
    pub client: OwnedFd,
    pub node: OwnedFd,
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) live: Arc<Live>,
    /// Cancelled when the shutdown grace period ends: open connections are cut
    /// (each waits on its accept loop's child of this token).
    pub(crate) cut_all: CancellationToken,
    pub(crate) connections: TaskTracker,
    /// Client connections admitted and not yet closed, all services together.
    pub(crate) open_clients: Arc<AtomicU64>,
    /// Set (before `cut_all` is cancelled) when connections are to be handed
    /// to another process rather than cut: each then leaves once nothing of
    /// it is in flight here, through `hand_over`.
    pub(crate) handing_over: AtomicBool,
    pub(crate) hand_over: Mutex<Option<std::sync::mpsc::Sender<Departing>>>,
    /// Cancelled when a hand-over's time is up: the connections still here are cut.
    pub(crate) cut_now: CancellationToken,
}

impl Shared {
    pub(crate) fn new(live: Arc<Live>) -> Shared {
        Shared {
            live,
            cut_all: CancellationToken::new(),
            connections: TaskTracker::new(),
            open_clients: Default::default(),
            handing_over: AtomicBool::new(false),
            hand_over: Mutex::new(None),
            cut_now: CancellationToken::new(),
        }
    }

    /// Whether open connections are being handed over rather than cut.
    pub(crate) fn is_handing_over(&self) -> bool {
        self.handing_over.load(Relaxed)
    }

    /// Where a connection that leaves goes, while a hand-over runs.
    pub(crate) fn hand_over_to(&self) -> Option<std::sync::mpsc::Sender<Departing>> {
        self.hand_over.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves when the connection whose loop's cut token is `cut` must be
    /// cut: at once when `cut` is cancelled, or, during a hand-over, only
    /// when its time is up (the connection is handed over meanwhile).
    pub(crate) async fn must_cut(&self, cut: &CancellationToken) {
        cut.cancelled().await;
        if self.is_handing_over() {
            self.cut_now.cancelled().await;
        }
    }
}
