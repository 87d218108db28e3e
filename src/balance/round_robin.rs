//! Smooth weighted round robin (the algorithm of NGINX's upstream module):
//! every pick adds each eligible node's weight to its running score, picks the
//! highest score and subtracts the total weight from it. Weights 3:1 give
//! `a a b a` rather than `a a a b`: shares hold over every window of one
//! weight-sum, without bursts.

use std::net::IpAddr;
use std::sync::Mutex;

use super::Balancer;
use crate::model::Node;

pub struct RoundRobin {
    /// Running score per node. A short critical section per pick: O(nodes)
    /// additions, uncontended at any realistic connection rate.
    scores: Mutex<Vec<i64>>,
}

impl RoundRobin {
    pub fn new(nodes: usize) -> RoundRobin {
        RoundRobin {
            scores: Mutex::new(vec![0; nodes]),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _client: IpAddr, nodes: &[Node]) -> Option<usize> {
        let mut scores = self.scores.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        scores.resize(nodes.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, node) in nodes.iter().enumerate() {
            if !node.is_eligible() {
                continue;
            }
            let w = node.weight_permille() as i64;
            scores[i] += w;
            total += w;
            if best.is_none_or(|b| scores[i] > scores[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        scores[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeState;
    use crate::model::testing::nodes;

    #[test]
    fn weights_3_1_interleave_in_every_window_of_four() {
        let ns = nodes(&[3, 1]);
        let rr = RoundRobin::new(ns.len());
        let ip = "127.0.0.1".parse().unwrap();
        let picks: Vec<usize> = (0..400).map(|_| rr.pick(ip, &ns).unwrap()).collect();
        for window in picks.chunks(4) {
            assert_eq!(window.iter().filter(|&&i| i == 0).count(), 3, "{window:?}");
        }
        // No burst of more than three in a row either.
        assert!(!picks.windows(4).any(|w| w.iter().all(|&i| i == 0)));
    }

    #[test]
    fn skips_ineligible_nodes_and_none_when_all_out() {
        let ns = nodes(&[1, 1, 1]);
        let rr = RoundRobin::new(ns.len());
        let ip = "127.0.0.1".parse().unwrap();
        ns[1].figures.set_state(NodeState::Yellow);
        ns[2].figures.set_available(false);
        assert!((0..10).all(|_| rr.pick(ip, &ns) == Some(0)));
        ns[0].figures.set_state(NodeState::Red);
        assert_eq!(rr.pick(ip, &ns), None);
    }
}
