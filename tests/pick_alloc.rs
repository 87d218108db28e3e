//! A pick allocates nothing, for every algorithm: counted by a global
//! allocator that tallies the allocations of the thread being measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr};

use protobalance::config::{AlgorithmKind, Config};

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
        let mut text = format!(
            "state_dir = \"\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\nalgorithm = \"{algorithm}\"\n\
             load_rating = \"max(connections / weight, traffic_rate / 1e6) + agent_load ^ 2 - sqrt(total_connections)\"\n"
        );
        for i in 0..30 {
            text.push_str(&format!(
                "[[cluster.node]]\nname = \"n{i}\"\naddress = \"127.0.0.1:{}\"\nweight = {}\n",
                10_000 + i,
                1 + i % 4
            ));
        }
        let snapshot = protobalance::balance::compile(&Config::parse(&text, "test").unwrap(), None);
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
