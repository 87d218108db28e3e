//! A pick allocates nothing, for every algorithm: counted by a global
//! allocator that tallies the allocations of the thread being measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};

mod common;

use common::*;
use protobalance::config::AlgorithmKind;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn no_pick_allocates() {
    // The counter itself works.
    COUNTING.with(|c| c.set(true));
    drop(std::hint::black_box(Box::new(1)));
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCATIONS.with(|n| n.replace(0)), 1);

    for algorithm in AlgorithmKind::ALL {
        let cluster = (0..30).fold(
            Cluster::new("c")
                .key(&format!("algorithm = \"{algorithm}\""))
                .key("load_rating = \"max(connections / weight, traffic_rate / 1e6) + agent_load ^ 2 - sqrt(total_connections)\""),
            |c, i| c.node(Node::new(&format!("n{i}"), format!("127.0.0.1:{}", 10_000 + i)).weight(1 + i % 4)),
        );
        let snapshot = protobalance::balance::compile(&ConfigText::one_service(cluster).config(), None);
        let cluster = &snapshot.clusters["c"];
        // Half the nodes have been sampled, half are new (the warm-up path).
        for node in cluster.nodes.iter().step_by(2) {
            node.figures.set_rates(3.0, 1e4, 2e4);
        }
        let client = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        assert!(cluster.pick(client(0)).is_some()); // any lazy set-up happens here
        COUNTING.with(|c| c.set(true));
        let picked = (1..1_000).filter(|&i| cluster.pick(client(i)).is_some()).count();
        COUNTING.with(|c| c.set(false));
        assert_eq!(picked, 999);
        assert_eq!(ALLOCATIONS.with(Cell::get), 0, "{algorithm} allocated");
    }
}

#[test]
fn reading_a_server_name_and_its_route_allocates_nothing() {
    let hello = client_hello(Some("www.api.example.com"), 20);
    let mut joined = vec![0u8; protobalance::proxy::sni::MAX_HELLO];
    let config = ConfigText::new()
        .service(Service::new("tls", "c").key(
            "[[service.route]]\nsni = [\"*.api.example.com\", \"shop.example.com\"]\ncluster = \"c\"\n\
             [[service.route]]\nsni = [\"www.api.example.com\"]\ncluster = \"c\"",
        ))
        .cluster(Cluster::new("c").node(Node::new("a", "127.0.0.1:1")))
        .config();
    let routes = &config.services[0].routes;
    COUNTING.with(|c| c.set(true));
    let mut routed = 0;
    for _ in 0..1_000 {
        if let protobalance::proxy::sni::Hello::Name(name) = protobalance::proxy::sni::parse(&hello, &mut joined)
            && protobalance::config::route_of(routes, name).is_some_and(|(i, _)| i == 1)
        {
            routed += 1;
        }
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(routed, 1_000, "every parse found the name and its exact route");
    assert_eq!(
        ALLOCATIONS.with(|n| n.replace(0)),
        0,
        "the parse and the match allocated"
    );
}
