//! Traffic rate: the eligible node with the lowest live bytes per second, both
//! directions, per unit of weight: `(rx_rate + tx_rate) / weight`. The pump
//! counts bytes as each chunk moves, and the live rate includes the bytes since
//! the last sample, so a long-lived connection weighs from its first bytes.
//! Unsampled nodes follow the warm-up rule of `crate::model::rates`.

use std::net::IpAddr;

use super::{Balancer, TieBreak, lowest_rate_per_weight};
use crate::model::Node;
use crate::model::Rate;

#[derive(Debug, Default)]
pub struct TrafficRate {
    ties: TieBreak,
}

impl Balancer for TrafficRate {
    fn pick(&self, _client: IpAddr, nodes: &[Node]) -> Option<usize> {
        lowest_rate_per_weight(nodes, &self.ties, Rate::Traffic)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::rates::sample;
    use crate::model::testing::{nodes, shares, weight_shares};

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn byte_shares_follow_weights() {
        let ns = nodes(&[1, 2, 3]);
        let tr = TrafficRate::default();
        let got = shares(3, 6_000, |i| {
            if i % 50 == 0 {
                sample(&ns, Duration::from_millis(250));
            }
            let pick = tr.pick(ip(), &ns);
            // Each connection moves 1 kB in and 3 kB out while it is open.
            ns[pick?].figures.add_bytes_in(1_000);
            ns[pick?].figures.add_bytes_out(3_000);
            pick
        });
        for (g, want) in got.iter().zip(weight_shares(&[1, 2, 3])) {
            assert!((g - want).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn prefers_the_lighter_node_both_directions_and_follows_changes() {
        let ns = nodes(&[2, 1]);
        let tr = TrafficRate::default();
        ns[0].figures.set_rates(0.0, 1_000.0, 1_000.0); // 1000 B/s per unit of weight
        ns[1].figures.set_rates(0.0, 0.0, 1_500.0); // 1500
        assert!((0..10).all(|_| tr.pick(ip(), &ns) == Some(0)));
        // Bytes flowing now count before any sample: 1000 B/s × τ more to node 0.
        ns[0].figures.add_bytes_out(5_000 * 2);
        assert!((0..10).all(|_| tr.pick(ip(), &ns) == Some(1)));
    }
}
