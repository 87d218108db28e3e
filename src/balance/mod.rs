//! Balancing algorithms. Each is a pure choice over a cluster's nodes: given the
//! client and the nodes (with their live figures), return the index of the node
//! to try first, among the eligible ones (green and available), or `None` when
//! no node is eligible. No I/O and no clocks here; the round-robin position and
//! the tie-breaking offset of the lowest-score algorithms are the only state an
//! algorithm keeps, and a pick allocates nothing. docs/algorithms.md explains
//! when to use which, with the formulas.

mod connection_rate;
mod ip_hash;
mod least_load;
mod random;
mod round_robin;
mod traffic_rate;

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::config::{AlgorithmKind, ClusterConfig, Config};
pub use crate::model::Balancer;
use crate::model::rates::seeded_mean;
use crate::model::{Node, Rate, Snapshot};

pub use connection_rate::ConnectionRate;
pub use ip_hash::IpHash;
pub use least_load::LeastLoad;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use traffic_rate::TrafficRate;

/// A snapshot of `config` with each cluster's algorithm compiled, reusing the
/// figures of `previous` for nodes and services that stay.
pub fn compile(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
    Snapshot::build(config, previous, build)
}

/// The balancer a validated cluster config asks for.
pub fn build(cluster: &ClusterConfig) -> Box<dyn Balancer> {
    match cluster.algorithm {
        AlgorithmKind::RoundRobin => Box::new(RoundRobin::new(cluster.nodes.len())),
        AlgorithmKind::Random => Box::new(Random),
        AlgorithmKind::ConnectionRate => Box::new(ConnectionRate::default()),
        AlgorithmKind::TrafficRate => Box::new(TrafficRate::default()),
        AlgorithmKind::LeastLoad => Box::new(LeastLoad::new(
            cluster
                .load_rating
                .clone()
                .expect("config validation requires load_rating for least-load"),
        )),
        AlgorithmKind::IpHash => Box::new(IpHash::new(
            cluster.hash_key.as_deref(),
            cluster.nodes.iter().map(|n| n.name.as_str()),
        )),
    }
}

/// Where the lowest-score algorithms start their scan, so that ties (idle
/// nodes, equal figures) rotate over the tied nodes instead of all going to
/// the first one in config order.
#[derive(Debug, Default)]
struct TieBreak(AtomicUsize);

impl TieBreak {
    fn next_start(&self, len: usize) -> usize {
        if len == 0 {
            0
        } else {
            self.0.fetch_add(1, Relaxed) % len
        }
    }
}

/// The eligible node with the lowest `score`, scanning from `start` (the first
/// of equal scores wins). A NaN score ranks last.
fn lowest(nodes: &[Node], start: usize, score: impl Fn(&Node) -> f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for offset in 0..nodes.len() {
        let i = (start + offset) % nodes.len();
        let node = &nodes[i];
        if !node.is_eligible() {
            continue;
        }
        let s = score(node);
        let s = if s.is_nan() { f64::INFINITY } else { s };
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// A node's live `rate` per unit of weight, an unseeded node taking its
/// cluster's `mean` per unit of weight plus what it took since it joined (the
/// warm-up rule of `crate::model::rates`).
fn rate_per_weight(node: &Node, rate: Rate, mean: f64) -> f64 {
    let own = node.figures.rate(rate) / f64::from(node.weight);
    if node.figures.is_seeded() { own } else { mean + own }
}

/// The eligible node with the lowest live `rate` per unit of weight.
fn lowest_rate_per_weight(nodes: &[Node], ties: &TieBreak, rate: Rate) -> Option<usize> {
    let mean = if nodes.iter().any(|n| n.is_eligible() && !n.figures.is_seeded()) {
        seeded_mean(nodes, rate)
    } else {
        0.0
    };
    lowest(nodes, ties.next_start(nodes.len()), |n| rate_per_weight(n, rate, mean))
}
