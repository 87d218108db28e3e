//! The order in which a connection tries nodes. Fall-over is "take the next
//! candidate":
//!
//! 1. the client's home (its pin, or its ip-hash node) or else the
//!    algorithm's pick (only eligible nodes are picked);
//! 2. the pick's fall-over chain, in chain order;
//! 3. every other node of the cluster, in config order, starting after the pick.
//!
//! Nodes that are not eligible (not green, or unavailable, or refusing the
//! client's destination port: see `Node::health_port`) when their turn
//! comes are skipped, but a skipped node's fall-over node still follows it in
//! the chain. Each node is offered at most once. The iterator allocates nothing.
//!
//! The last resort (`last_resort = "try-unavailable"`, when no node is
//! eligible) walks the same order but offers every green node, available or
//! not: yellow and red nodes are never offered.

use crate::model::{Node, NodeState};

pub struct Candidates<'a> {
    nodes: &'a [Node],
    first: Option<usize>,
    /// The port the client came to (a node without a port takes it).
    port: u16,
    /// The last resort: green nodes are offered even when unavailable.
    last_resort: bool,
    /// `first` is the client's home (its pin or ip-hash node): offered
    /// first even on a port it refused lately.
    home: bool,
    /// Where we are: the first pick, walking its chain, or sweeping the rest.
    next: Step,
}

#[derive(Clone, Copy)]
enum Step {
    First,
    Chain(Option<usize>),
    /// Offset (1..len) from the first pick, in config order.
    Rest(usize),
    Done,
}

impl<'a> Candidates<'a> {
    /// Candidates for a client who came to `port`, starting from `first`,
    /// the algorithm's pick (`None`: no node is eligible).
    pub fn new(nodes: &'a [Node], first: Option<usize>, port: u16) -> Self {
        Candidates {
            nodes,
            first,
            port,
            last_resort: false,
            home: false,
            next: if first.is_some() { Step::First } else { Step::Done },
        }
    }

    /// Candidates starting from the client's `home` node (see [`Candidates::new`]).
    pub fn from_home(nodes: &'a [Node], home: usize, port: u16) -> Self {
        Candidates {
            home: true,
            ..Candidates::new(nodes, Some(home), port)
        }
    }

    /// The last resort's candidates: the green nodes, available or not, in the
    /// order of [`Candidates::new`] from `first` (`None`: config order).
    pub fn last_resort(nodes: &'a [Node], first: Option<usize>, port: u16) -> Self {
        let first = first.or(if nodes.is_empty() { None } else { Some(0) });
        Candidates {
            last_resort: true,
            ..Candidates::new(nodes, first, port)
        }
    }

    fn takes(&self, index: usize) -> bool {
        let node = &self.nodes[index];
        if self.last_resort {
            node.figures.state() == NodeState::Green
        } else if self.home && Some(index) == self.first {
            node.is_eligible()
        } else {
            node.is_eligible_on(self.port)
        }
    }

    fn in_first_chain(&self, index: usize) -> bool {
        let mut at = self.first;
        let mut steps = 0;
        while let Some(i) = at {
            if i == index {
                return true;
            }
            // Config validation rejects loops; the bound keeps a bug from hanging us.
            steps += 1;
            if steps > self.nodes.len() {
                return false;
            }
            at = self.nodes[i].fallover;
        }
        false
    }
}

impl Iterator for Candidates<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let first = self.first?;
        loop {
            match self.next {
                Step::First => {
                    self.next = Step::Chain(self.nodes[first].fallover);
                    if self.takes(first) {
                        return Some(first);
                    }
                }
                Step::Chain(Some(i)) => {
                    let after = self.nodes[i].fallover;
                    // A chain that comes back to the first pick is a loop: stop it.
                    self.next = if after == Some(first) {
                        Step::Rest(1)
                    } else {
                        Step::Chain(after)
                    };
                    if self.takes(i) {
                        return Some(i);
                    }
                }
                Step::Chain(None) => self.next = Step::Rest(1),
                Step::Rest(offset) if offset < self.nodes.len() => {
                    self.next = Step::Rest(offset + 1);
                    let i = (first + offset) % self.nodes.len();
                    if self.takes(i) && !self.in_first_chain(i) {
                        return Some(i);
                    }
                }
                Step::Rest(_) | Step::Done => {
                    self.next = Step::Done;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::nodes;

    #[test]
    fn pick_then_chain_then_the_rest() {
        let mut ns = nodes(&[1, 1, 1, 1, 1]);
        ns[1].fallover = Some(3);
        ns[3].fallover = Some(0);
        let order: Vec<usize> = Candidates::new(&ns, Some(1), 80).collect();
        assert_eq!(order, vec![1, 3, 0, 2, 4]);
    }

    #[test]
    fn skips_ineligible_but_follows_their_chain() {
        let mut ns = nodes(&[1, 1, 1, 1]);
        ns[0].fallover = Some(1);
        ns[1].fallover = Some(2);
        ns[1].figures.set_state(NodeState::Yellow);
        ns[3].figures.set_available(false);
        let order: Vec<usize> = Candidates::new(&ns, Some(0), 80).collect();
        assert_eq!(order, vec![0, 2]);
    }

    #[test]
    fn nothing_without_a_pick() {
        let ns = nodes(&[1, 1]);
        assert_eq!(Candidates::new(&ns, None, 80).count(), 0);
    }

    #[test]
    fn last_resort_offers_green_unavailable_nodes_only() {
        let ns = nodes(&[1, 1, 1, 1]);
        ns[0].figures.set_available(false);
        ns[1].figures.set_state(NodeState::Yellow);
        ns[1].figures.set_available(false);
        ns[2].figures.set_state(NodeState::Red);
        ns[3].figures.set_available(false);
        assert_eq!(Candidates::new(&ns, None, 80).count(), 0);
        let order: Vec<usize> = Candidates::last_resort(&ns, None, 80).collect();
        assert_eq!(order, vec![0, 3]);
        let order: Vec<usize> = Candidates::last_resort(&ns, Some(3), 80).collect();
        assert_eq!(order, vec![3, 0]);
    }

    #[test]
    fn a_refused_port_skips_the_node_for_that_port_only() {
        let ns = nodes(&[1, 1]);
        ns[0].figures.mark_port(2121, true);
        let order: Vec<usize> = Candidates::new(&ns, Some(0), 2121).collect();
        assert_eq!(order, vec![1]);
        let order: Vec<usize> = Candidates::new(&ns, Some(0), 21).collect();
        assert_eq!(order, vec![0, 1]);
        ns[1].figures.mark_port(2121, true);
        assert_eq!(Candidates::new(&ns, Some(0), 2121).count(), 0);
        let order: Vec<usize> = Candidates::last_resort(&ns, Some(0), 2121).collect();
        assert_eq!(order, vec![0, 1], "the last resort tries them anyway");
        ns[1].figures.mark_port(2121, false);
        let order: Vec<usize> = Candidates::from_home(&ns, 0, 2121).collect();
        assert_eq!(order, vec![0, 1], "a client's home is tried first even so");
    }

    #[test]
    fn a_node_keeps_its_latest_down_ports_only() {
        let ns = nodes(&[1]);
        let f = &ns[0].figures;
        for port in 0..crate::model::MAX_DOWN_PORTS as u16 + 3 {
            f.mark_port(30_000 + port, true);
        }
        let down = f.down_ports();
        assert_eq!(down.len(), crate::model::MAX_DOWN_PORTS);
        assert_eq!(down[0], 30_003, "the three marked down first are forgotten");
        f.mark_port(30_010, false);
        assert!(f.is_port_down(30_011) && !f.is_port_down(30_010));
    }
}
