//! Least load: the eligible node with the lowest value of the cluster's
//! `load_rating` expression (see `load_rating`), evaluated over each node's
//! live figures. Rates of nodes not sampled yet follow the warm-up rule of
//! `crate::model::rates` (their cluster's mean per unit of weight, times their weight).

use std::net::IpAddr;

use super::{Balancer, TieBreak, lowest, rate_per_weight};
use crate::config::{LoadRating, Variable};
use crate::model::Node;
use crate::model::Rate;
use crate::model::rates::seeded_mean;

#[derive(Debug)]
pub struct LeastLoad {
    rating: LoadRating,
    ties: TieBreak,
}

impl LeastLoad {
    pub fn new(rating: LoadRating) -> LeastLoad {
        LeastLoad {
            rating,
            ties: TieBreak::default(),
        }
    }
}

/// Mean rates per unit of weight of the seeded nodes, for unseeded ones.
#[derive(Clone, Copy, Default)]
struct WarmUp {
    connection_rate: f64,
    rx_rate: f64,
    tx_rate: f64,
}

/// The value of `var` for `node`.
fn figure(node: &Node, var: Variable, warm: WarmUp) -> f64 {
    let f = &node.figures;
    let w = node.share_weight();
    let rate = |r: Rate, mean: f64| rate_per_weight(node, r, mean) * w;
    match var {
        Variable::Connections => f.active_connections() as f64,
        Variable::Weight => w,
        Variable::ConnectionRate => rate(Rate::Connections, warm.connection_rate),
        Variable::TrafficRate => rate(Rate::Rx, warm.rx_rate) + rate(Rate::Tx, warm.tx_rate),
        Variable::RxRate => rate(Rate::Rx, warm.rx_rate),
        Variable::TxRate => rate(Rate::Tx, warm.tx_rate),
        Variable::TotalConnections => f.total_connections() as f64,
        Variable::AgentLoad => f.agent_load(),
    }
}

impl Balancer for LeastLoad {
    fn pick(&self, _client: IpAddr, nodes: &[Node]) -> Option<usize> {
        let reads_rates = [
            Variable::ConnectionRate,
            Variable::TrafficRate,
            Variable::RxRate,
            Variable::TxRate,
        ]
        .into_iter()
        .any(|v| self.rating.uses(v));
        let warm = if reads_rates && nodes.iter().any(|n| n.is_eligible() && !n.figures.is_seeded()) {
            WarmUp {
                connection_rate: seeded_mean(nodes, Rate::Connections),
                rx_rate: seeded_mean(nodes, Rate::Rx),
                tx_rate: seeded_mean(nodes, Rate::Tx),
            }
        } else {
            WarmUp::default()
        };
        lowest(nodes, self.ties.next_start(nodes.len()), |n| {
            self.rating.eval_with(&|var| figure(n, var, warm))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeState;
    use crate::model::testing::{nodes, shares, weight_shares};

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    fn least_load(expr: &str) -> LeastLoad {
        LeastLoad::new(LoadRating::compile(expr).unwrap())
    }

    #[test]
    fn connections_per_weight_fill_nodes_in_proportion() {
        let ns = nodes(&[1, 2, 3]);
        let ll = least_load("connections / weight");
        let mut open = Vec::new();
        let got = shares(3, 600, |_| {
            let pick = ll.pick(ip(), &ns);
            open.push(ns[pick?].figures.open_connection());
            pick
        });
        assert_eq!(got, weight_shares(&[1, 2, 3]));
        assert_eq!(ns[2].figures.active_connections(), 300);
    }

    #[test]
    fn follows_the_agent_and_other_figures() {
        let ns = nodes(&[1, 1, 1]);
        let ll = least_load("agent_load * 100 + connections");
        ns[0].figures.set_agent_load(0.9);
        ns[1].figures.set_agent_load(0.2);
        ns[2].figures.set_agent_load(0.5);
        assert!((0..10).all(|_| ll.pick(ip(), &ns) == Some(1)));
        ns[1].figures.set_agent_load(0.95);
        assert!((0..10).all(|_| ll.pick(ip(), &ns) == Some(2)));
        ns[2].figures.set_state(NodeState::Red);
        assert_eq!(ll.pick(ip(), &ns), Some(0));

        let ns = nodes(&[1, 4]);
        let ll = least_load("traffic_rate / weight + 1000 * connection_rate");
        ns[0].figures.set_rates(0.0, 100.0, 100.0); // 200
        ns[1].figures.set_rates(0.0, 400.0, 1_000.0); // 350
        assert_eq!(ll.pick(ip(), &ns), Some(0));
        ns[0].figures.set_rates(1.0, 100.0, 100.0); // 1200
        assert_eq!(ll.pick(ip(), &ns), Some(1));
    }

    #[test]
    fn ties_rotate_and_nan_ranks_last() {
        let ns = nodes(&[1, 1, 1]);
        let ll = least_load("connections");
        let got = shares(3, 300, |_| ll.pick(ip(), &ns));
        assert_eq!(got, vec![1.0 / 3.0; 3]);
        // 0/0 on node 0 (no connections, weight... forced by the expression).
        let ll = least_load("connections / (agent_load - 1) + agent_load");
        ns[0].figures.set_agent_load(1.0); // 0/0: NaN
        ns[1].figures.set_agent_load(5.0);
        ns[2].figures.set_agent_load(7.0);
        assert!((0..10).all(|_| ll.pick(ip(), &ns) == Some(1)));
    }

    #[test]
    fn unsampled_nodes_are_rated_at_the_mean() {
        let ns = nodes(&[1, 1, 2]);
        ns[0].figures.set_rates(10.0, 0.0, 0.0);
        ns[1].figures.set_rates(20.0, 0.0, 0.0);
        let warm = WarmUp {
            connection_rate: 15.0,
            ..WarmUp::default()
        };
        assert_eq!(figure(&ns[2], Variable::ConnectionRate, warm), 30.0);
        let ll = least_load("connection_rate / weight");
        // 10, 20, and 15 for the new node: it is not preferred over node 0.
        assert!((0..10).all(|_| ll.pick(ip(), &ns) == Some(0)));
    }
}
