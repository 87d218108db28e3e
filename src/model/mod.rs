//! The live model: what every part of the running balancer reads.
//!
//! - [`Snapshot`]: services, clusters, nodes and their compiled algorithms,
//!   immutable once built and replaced whole on reload;
//! - figures ([`NodeFigures`], [`ServiceFigures`]): atomics that outlive
//!   snapshots, so a reload keeps the counters of what stays;
//! - rates: the EWMA rates in each node's figures and the sampler that keeps them;
//! - [`Pins`]: the client pins of every cluster, in memory;
//! - [`Live`]: the snapshot and the pins together, shared by the data plane
//!   and every background task;
//! - [`PinStore`]: the face of the store twins share pins through.
//!
//! No I/O here, and nothing of the layers above: a background task (probes,
//! agents, the pin flusher) reads the model, never the proxy.

mod connection;
mod figures;
mod pins;
pub mod rates;
mod snapshot;
mod store;

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

pub use crate::config::NodeState;
pub use connection::ConnectionState;
pub use figures::{
    ActiveGuard, CheckReport, FULL_PERMILLE, MAX_DOWN_PORTS, NodeCounters, NodeFigures, Padded, Refusal,
    ServiceFigures, ServiceGuard, TurnedRed, bind_worker_slot, worker_slots,
};
pub use pins::{Change, MAX_PINS_PER_CLUSTER, Pin, Pins, WallClock, expired};
pub use rates::Rate;
pub use snapshot::{Algorithms, Balancer, Cluster, Node, NodeKey, Service, Snapshot};
pub use store::{Lookup, PinRecord, PinStore, SLOW_AFTER, StoreFigures, Written};

/// What the data plane and the background tasks share: the snapshot in force
/// (swapped whole on reload, loaded without a lock) and the client pins.
pub struct Live {
    pub snapshot: ArcSwap<Snapshot>,
    /// Client pins of every cluster; they outlive snapshots.
    pub pins: Arc<Pins>,
    /// The store twins share pins through (`[shared]`), once it is set up.
    pub store: OnceLock<Arc<dyn PinStore>>,
    /// The store's figures (all zero, and down, without `[shared]`).
    pub store_figures: Arc<StoreFigures>,
}

impl Live {
    pub fn new(snapshot: Snapshot, pins: Arc<Pins>) -> Live {
        Live {
            snapshot: ArcSwap::from_pointee(snapshot),
            pins,
            store: OnceLock::new(),
            store_figures: Arc::default(),
        }
    }

    /// The wall clock of this balancer (the pins' own: a test's manual
    /// clock moves everything that is dated in wall-clock time).
    pub fn clock(&self) -> &WallClock {
        self.pins.clock()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{Node, NodeFigures, NodeState};
    use crate::config::NodeAddress;

    /// Share of each node over `picks` picks by `pick`.
    pub fn shares(len: usize, picks: usize, mut pick: impl FnMut(usize) -> Option<usize>) -> Vec<f64> {
        let mut counts = vec![0usize; len];
        for i in 0..picks {
            counts[pick(i).expect("a node is eligible")] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    /// Each node's share of the weight.
    pub fn weight_shares(weights: &[u32]) -> Vec<f64> {
        let total: u32 = weights.iter().sum();
        weights.iter().map(|&w| f64::from(w) / f64::from(total)).collect()
    }

    /// Green, available nodes with the given weights, on made-up addresses.
    pub fn nodes(weights: &[u32]) -> Vec<Node> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = format!("127.0.0.1:{}", 10_000 + i);
                Node {
                    name: format!("n{i}"),
                    address: NodeAddress::Socket(addr.parse().unwrap()),
                    address_text: addr,
                    weight,
                    fallover: None,
                    figures: Arc::new(NodeFigures::new(NodeState::Green)),
                    agent: None,
                    send_proxy: crate::config::ProxyHeader::None,
                    health_port: None,
                }
            })
            .collect()
    }
}
