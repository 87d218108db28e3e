//! Balancing algorithms. Each is a pure choice over a cluster's nodes: given the
//! client and the nodes (with their live figures), return the index of the node
//! to try first, among the eligible ones (green and available), or `None` when
//! no node is eligible. No I/O and no clocks here; the round-robin position is
//! the only state an algorithm keeps.

mod round_robin;

use std::net::IpAddr;

use crate::config::{AlgorithmKind, ClusterConfig};
use crate::model::Node;

pub use round_robin::RoundRobin;

/// A balancing algorithm.
pub trait Balancer: Send + Sync {
    /// The node to try first for `client`, or `None` when no node is eligible.
    fn pick(&self, client: IpAddr, nodes: &[Node]) -> Option<usize>;
}

/// Whether this build implements `kind` (config validation refuses the others).
pub fn is_implemented(kind: AlgorithmKind) -> bool {
    matches!(kind, AlgorithmKind::RoundRobin)
}

/// The balancer a validated cluster config asks for.
pub fn build(cluster: &ClusterConfig) -> Box<dyn Balancer> {
    match cluster.algorithm {
        AlgorithmKind::RoundRobin => Box::new(RoundRobin::new(cluster.nodes.len())),
        other => unreachable!("config validation refuses unimplemented algorithm {other}"),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use crate::config::NodeAddress;
    use crate::model::{Node, NodeFigures, NodeState};

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
                }
            })
            .collect()
    }
}
