//! ip-hash across processes: two balancer processes started separately with
//! the same config choose the same node for each of 1,000 client addresses,
//! and a third one whose config lacks one of the 4 nodes moves only that
//! node's clients.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;

const CLIENTS: usize = 1_000;

/// `protobalance run` with service `web` on an ip-hash cluster of `nodes`;
/// its access log is off, as a thousand lines of it would only be noise.
fn balancer(nodes: &[(&str, std::net::SocketAddr)]) -> Running {
    let cluster = Cluster::of("c", nodes)
        .key("algorithm = \"ip-hash\"")
        .key("hash_key = \"shared secret of both instances\"");
    let config = ConfigText::new().service(Service::new("web", "c")).cluster(cluster);
    Running::run(&config, &["--log-level", "info,protobalance::access=off"])
}

fn client(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i / 250) as u8,
        (i % 250) as u8,
        1 + (i % 7) as u8,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_agree_and_removing_a_node_moves_only_its_clients() {
    let mut nodes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        nodes.push((name, name_backend(name).await));
    }
    let processes = [balancer(&nodes), balancer(&nodes), balancer(&nodes[..3])];
    let [first, second, without_d] = [0, 1, 2].map(|i| processes[i].listen_addr());

    let mut chosen = Vec::new();
    for i in 0..CLIENTS {
        chosen.push(read_from(client(i), first).await);
    }
    // The other instance is asked in reverse order: agreeing must come from
    // the client's address, not from the order of arrival.
    for i in (0..CLIENTS).rev() {
        let ip = client(i);
        assert_eq!(
            read_from(ip, second).await,
            chosen[i],
            "the instances disagree on client {ip}"
        );
    }
    let mut per_node = std::collections::HashMap::new();
    let mut moved = 0;
    for (i, chosen) in chosen.into_iter().enumerate() {
        let ip = client(i);
        let after = read_from(ip, without_d).await;
        if chosen == "d" {
            moved += 1;
            assert_ne!(after, "d");
        } else {
            assert_eq!(after, chosen, "client {ip} moved off node {chosen}, which stayed");
        }
        *per_node.entry(chosen).or_insert(0) += 1;
    }
    // Four equal nodes: about a quarter each, and so about 25% moved.
    for (node, n) in &per_node {
        assert!(
            (170..=330).contains(n),
            "node {node} got {n} of {CLIENTS}: {per_node:?}"
        );
    }
    assert_eq!(per_node.len(), 4);
    assert_eq!(moved, per_node["d"]);
}
