//! Connection rate: the eligible node with the lowest live rate of new
//! connections per unit of weight, `connection_rate / weight`, where the rate
//! is the EWMA of `crate::model::rates` (time constant `rates::TIME_CONSTANT`) plus the
//! connections opened since its last sample. A node that has not been sampled
//! yet is rated at its cluster's mean (the warm-up rule), so it is not flooded.

use std::net::IpAddr;

use super::{Balancer, TieBreak, lowest_rate_per_weight};
use crate::model::Node;
use crate::model::Rate;

#[derive(Debug, Default)]
pub struct ConnectionRate {
    ties: TieBreak,
}

impl Balancer for ConnectionRate {
    fn pick(&self, _client: IpAddr, nodes: &[Node]) -> Option<usize> {
        lowest_rate_per_weight(nodes, &self.ties, Rate::Connections)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::NodeState;
    use crate::model::rates::sample;
    use crate::model::testing::{nodes, shares, weight_shares};

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn shares_follow_weights_as_connections_open() {
        let ns = nodes(&[1, 2, 3]);
        let cr = ConnectionRate::default();
        let got = shares(3, 6_000, |i| {
            if i % 50 == 0 {
                sample(&ns, Duration::from_millis(250));
            }
            let pick = cr.pick(ip(), &ns);
            drop(ns[pick?].figures.open_connection());
            pick
        });
        for (g, want) in got.iter().zip(weight_shares(&[1, 2, 3])) {
            assert!((g - want).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn prefers_the_lighter_node_per_weight_and_follows_changes() {
        let ns = nodes(&[1, 2]);
        let cr = ConnectionRate::default();
        ns[0].figures.set_rates(10.0, 0.0, 0.0);
        ns[1].figures.set_rates(10.0, 0.0, 0.0); // 5 per unit of weight
        assert!((0..10).all(|_| cr.pick(ip(), &ns) == Some(1)));
        ns[1].figures.set_rates(30.0, 0.0, 0.0); // 15 per unit of weight
        assert!((0..10).all(|_| cr.pick(ip(), &ns) == Some(0)));
        ns[0].figures.set_state(NodeState::Yellow);
        assert_eq!(cr.pick(ip(), &ns), Some(1));
    }

    #[test]
    fn a_new_node_takes_its_share_not_the_flood() {
        let ns = nodes(&[1, 1, 1, 1]);
        for n in &ns[..3] {
            n.figures.set_rates(10.0, 0.0, 0.0);
        }
        // ns[3] just joined: never sampled, rate 0. Read as 0 it would take
        // the next 50 connections (10/s × τ = 5 s) before anyone else.
        let cr = ConnectionRate::default();
        let mut new_node = 0;
        for i in 0..400 {
            if i > 0 && i % 100 == 0 {
                sample(&ns, Duration::from_millis(250));
            }
            let pick = cr.pick(ip(), &ns).unwrap();
            drop(ns[pick].figures.open_connection());
            if pick == 3 {
                new_node += 1;
            }
            if i == 39 {
                assert!(new_node <= 12, "{new_node} of the first 40 went to the new node");
            }
        }
        assert!((80..=120).contains(&new_node), "{new_node} of 400 went to the new node");
    }
}
