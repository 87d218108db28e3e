//! IP hash: weighted rendezvous (highest random weight) hashing of the client
//! IP under a secret key. Each node scores `-weight / ln(u)`, where `u` in
//! (0, 1) is a keyed hash of (client IP, node name); the highest score wins.
//!
//! - Instances sharing the cluster's `hash_key` (default: a fixed built-in
//!   key) and node names choose identically: nothing here depends on the
//!   process, the order of nodes or the time.
//! - Removing a node moves only the clients it had; adding one moves to it
//!   only the clients it wins; nobody else moves, since the other scores stay.
//! - `-w / ln(u)` is the weighted rendezvous score: node i wins with
//!   probability `w_i / Σ w` exactly (it is the inverse of an exponential
//!   variate with rate w_i; the smallest of those is node i with that chance).
//! - The hash is SipHash-2-4, a keyed pseudo-random function: without the key,
//!   nobody can tell or steer which node an address maps to. It runs once per
//!   pick over the client IP (64-bit digest `d`); each node then scores
//!   `mix(d ⊕ s_node)` with `s_node`, SipHash-2-4 of the node's name under the
//!   same key, precomputed, and `mix` the SplitMix64 finalizer (a bijective
//!   avalanche mixer) — keeping a pick at 30 nodes well under a microsecond.
//! - The key is derived from `hash_key` by SipHash-2-4-128 under a fixed,
//!   public key (a domain-separated digest, not a password hash: use a long
//!   random `hash_key`).

use std::hash::Hasher;
use std::net::IpAddr;

use siphasher::sip::SipHasher24;
use siphasher::sip128::{Hasher128, SipHasher24 as SipHasher24x128};

use super::Balancer;
use crate::model::Node;

/// The key used when a cluster sets no `hash_key`: instances still agree with
/// each other, but anyone who reads this source can predict the mapping.
pub const DEFAULT_HASH_KEY: &str = "protobalance ip-hash built-in key v1";

#[derive(Debug)]
pub struct IpHash {
    key: (u64, u64),
    /// Per node, in the cluster's order: its name's keyed hash.
    node_seeds: Vec<u64>,
}

impl IpHash {
    /// A hasher for nodes named `names` (the cluster's nodes, in order).
    pub fn new<'a>(hash_key: Option<&str>, names: impl Iterator<Item = &'a str>) -> IpHash {
        let mut derive = SipHasher24x128::new_with_keys(0x7072_6f74_6f62_616c, 0x6970_2d68_6173_6820);
        derive.write(hash_key.unwrap_or(DEFAULT_HASH_KEY).as_bytes());
        let k = derive.finish128();
        let key = (k.h1, k.h2);
        IpHash {
            key,
            node_seeds: names.map(|n| node_seed(key, n)).collect(),
        }
    }

    fn client_digest(&self, client: IpAddr) -> u64 {
        let mut h = SipHasher24::new_with_keys(self.key.0, self.key.1);
        // An IPv4 client seen through a dual-stack socket hashes as itself.
        match client.to_canonical() {
            IpAddr::V4(v4) => {
                h.write_u8(4);
                h.write(&v4.octets());
            }
            IpAddr::V6(v6) => {
                h.write_u8(6);
                h.write(&v6.octets());
            }
        }
        h.finish()
    }
}

fn node_seed(key: (u64, u64), name: &str) -> u64 {
    let mut h = SipHasher24::new_with_keys(key.0, key.1);
    h.write(b"node\0");
    h.write(name.as_bytes());
    h.finish()
}

/// SplitMix64's finalizer: a bijection whose every output bit depends on
/// every input bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The weighted rendezvous score of a node of weight `weight` whose hash is `h`.
fn score(h: u64, weight: f64) -> f64 {
    // The top 53 bits as a float strictly inside (0, 1): ln(u) < 0.
    let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    -weight / libm::log(u)
}

impl Balancer for IpHash {
    fn pick(&self, client: IpAddr, nodes: &[Node]) -> Option<usize> {
        self.best(client, nodes, true)
    }

    fn home(&self, client: IpAddr, nodes: &[Node]) -> Option<usize> {
        self.best(client, nodes, false)
    }
}

impl IpHash {
    /// The highest-scoring node for `client`, among the eligible ones only or all.
    fn best(&self, client: IpAddr, nodes: &[Node], eligible_only: bool) -> Option<usize> {
        let digest = self.client_digest(client);
        let mut best: Option<(usize, f64)> = None;
        for (i, node) in nodes.iter().enumerate() {
            if eligible_only && !node.is_eligible() {
                continue;
            }
            // Seeds are built from the same cluster config as the nodes;
            // hashing the name is the (slower) fallback should they differ.
            let seed = match self.node_seeds.get(i) {
                Some(&s) if nodes.len() == self.node_seeds.len() => s,
                _ => node_seed(self.key, &node.name),
            };
            let s = score(mix(digest ^ seed), node.share_weight());
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::NodeState;
    use crate::model::testing::{nodes, shares, weight_shares};

    fn hasher(key: Option<&str>, ns: &[Node]) -> IpHash {
        IpHash::new(key, ns.iter().map(|n| n.name.as_str()))
    }

    fn client(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))
    }

    #[test]
    fn weights_hold_over_many_clients() {
        let ns = nodes(&[1, 2, 3]);
        let h = hasher(None, &ns);
        let got = shares(3, 100_000, |i| h.pick(client(i), &ns));
        for (g, want) in got.iter().zip(weight_shares(&[1, 2, 3])) {
            assert!((g - want).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_clients() {
        let ns = nodes(&[1, 1, 1, 1]);
        let h = hasher(Some("k"), &ns);
        let before: Vec<usize> = (0..10_000).map(|i| h.pick(client(i), &ns).unwrap()).collect();
        // Node 2 leaves: as a config without it (a new hasher over 3 nodes)...
        let three: Vec<Node> = nodes(&[1, 1, 1, 1]).into_iter().filter(|n| n.name != "n2").collect();
        let h3 = hasher(Some("k"), &three);
        // ...and as an ineligible node of the same config.
        ns[2].figures.set_state(NodeState::Red);
        let mut moved = 0;
        for (i, &was) in before.iter().enumerate() {
            let now = &three[h3.pick(client(i), &three).unwrap()].name;
            assert_eq!(*now, ns[h.pick(client(i), &ns).unwrap()].name);
            if was == 2 {
                moved += 1;
                assert_ne!(*now, "n2");
            } else {
                assert_eq!(*now, ns[was].name, "client {i} moved off a node that stayed");
            }
        }
        assert!((2_000..3_000).contains(&moved), "{moved}");
    }

    #[test]
    fn the_key_decides_and_equal_keys_agree() {
        let ns = nodes(&[1, 1, 1, 1]);
        let (a, b, c) = (
            hasher(Some("secret"), &ns),
            hasher(Some("secret"), &ns),
            hasher(Some("other"), &ns),
        );
        let mut differ = 0;
        for i in 0..1_000 {
            assert_eq!(a.pick(client(i), &ns), b.pick(client(i), &ns));
            differ += usize::from(a.pick(client(i), &ns) != c.pick(client(i), &ns));
        }
        // A different key is a different mapping: about 3 in 4 change.
        assert!((650..850).contains(&differ), "{differ}");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(a.pick(v4, &ns), a.pick(mapped, &ns));
    }

    #[test]
    fn ineligible_nodes_get_nothing() {
        let ns = nodes(&[1, 1]);
        let h = hasher(None, &ns);
        ns[0].figures.set_available(false);
        assert!((0..100).all(|i| h.pick(client(i), &ns) == Some(1)));
        ns[1].figures.set_state(NodeState::Yellow);
        assert_eq!(h.pick(client(0), &ns), None);
    }
}
