//! Weighted random: each eligible node with probability weight / Σ weights
//! over the eligible nodes. Stateless; the generator is the thread's own
//! (fastrand's wyrand, seeded per thread), so picks never contend.

use std::net::IpAddr;

use super::Balancer;
use crate::model::Node;

#[derive(Debug, Default)]
pub struct Random;

impl Balancer for Random {
    fn pick(&self, _client: IpAddr, nodes: &[Node]) -> Option<usize> {
        let eligible = || nodes.iter().enumerate().filter(|(_, n)| n.is_eligible());
        let total: u64 = eligible().map(|(_, n)| n.weight_permille()).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        for (i, n) in eligible() {
            let w = n.weight_permille();
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        unreachable!("r < total, the sum of the weights walked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeState;
    use crate::model::testing::{nodes, shares, weight_shares};

    #[test]
    fn shares_of_100_000_picks_at_1_2_3_are_within_one_point() {
        let ns = nodes(&[1, 2, 3]);
        let ip = "127.0.0.1".parse().unwrap();
        let got = shares(3, 100_000, |_| Random.pick(ip, &ns));
        for (g, want) in got.iter().zip(weight_shares(&[1, 2, 3])) {
            assert!((g - want).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn ineligible_nodes_get_nothing() {
        let ns = nodes(&[5, 1, 5]);
        ns[0].figures.set_state(NodeState::Yellow);
        ns[2].figures.set_available(false);
        let ip = "127.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| Random.pick(ip, &ns) == Some(1)));
        ns[1].figures.set_state(NodeState::Red);
        assert_eq!(Random.pick(ip, &ns), None);
    }
}
