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
    let own = node.figures.rate(rate) / node.share_weight();
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

#[cfg(test)]
mod slow_start {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use super::*;
    use crate::model::testing::{nodes, shares};

    const WINDOW: Option<Duration> = Some(Duration::from_secs(10));

    fn client(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))
    }

    #[test]
    fn a_ramping_node_takes_a_small_share_in_every_algorithm() {
        let ns = nodes(&[1, 1]);
        ns[1].figures.begin_ramp(WINDOW);
        // Equal weights: at a twentieth of its weight, node 1 takes about 1 in 21.
        let expected = 1.0 / 21.0;
        let rr = RoundRobin::new(2);
        let ip = IpHash::new(None, ns.iter().map(|n| n.name.as_str()));
        for (name, got) in [
            ("round-robin", shares(2, 21_000, |_| rr.pick(client(0), &ns))[1]),
            ("random", shares(2, 100_000, |_| Random.pick(client(0), &ns))[1]),
            ("ip-hash", shares(2, 100_000, |i| ip.pick(client(i), &ns))[1]),
        ] {
            assert!((got - expected).abs() < 0.01, "{name}: {got}");
        }
        // least-load on connections per weight: equal connections, the ramping node scores higher.
        for n in &ns {
            std::mem::forget(n.figures.open_connection());
        }
        let ll = LeastLoad::new(crate::config::LoadRating::compile("connections / weight").unwrap());
        assert!((0..10).all(|_| ll.pick(client(0), &ns) == Some(0)));
    }

    #[test]
    fn ip_hash_moves_to_a_ramping_node_only_clients_that_will_belong_to_it() {
        let ns = nodes(&[1, 1, 1]);
        let h = IpHash::new(Some("k"), ns.iter().map(|n| n.name.as_str()));
        let full: Vec<usize> = (0..10_000).map(|i| h.pick(client(i), &ns).unwrap()).collect();
        ns[2].figures.begin_ramp(WINDOW);
        let mut previous = 0;
        let start = std::time::Instant::now();
        for step in 1..=10u32 {
            ns[2]
                .figures
                .advance_ramp(WINDOW, start + Duration::from_secs(u64::from(step)));
            let now: Vec<usize> = (0..10_000).map(|i| h.pick(client(i), &ns).unwrap()).collect();
            let on_ramping: Vec<usize> = (0..10_000).filter(|&i| now[i] == 2).collect();
            assert!(
                on_ramping.iter().all(|&i| full[i] == 2),
                "step {step}: only clients of node 2 at full weight go there"
            );
            assert!(
                (0..10_000).all(|i| now[i] == 2 || now[i] == full[i] || full[i] == 2),
                "step {step}: the other clients stay where they are"
            );
            assert!(on_ramping.len() >= previous, "step {step}: it grows");
            previous = on_ramping.len();
        }
        assert_eq!(
            previous,
            full.iter().filter(|&&n| n == 2).count(),
            "all of them at the end"
        );
    }
}
