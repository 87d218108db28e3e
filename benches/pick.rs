//! The hot paths that touch no socket: one pick of each algorithm over 3, 30
//! and 300 eligible nodes with unequal weights and (synthetic) live figures,
//! the per-connection snapshot load, an affinity lookup among 10,000 pins,
//! and a connection's poll of its node's red state as another worker polls
//! its own: `cargo bench --bench pick`.
//!
//! Measured in CPU time of the benchmarking thread, not wall-clock time: on a
//! shared machine (CI, a busy workstation) wall time counts the slices other
//! processes take, which can double the figures and says nothing about the
//! pick. On an idle machine the two agree.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Waker};

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use protobalance::config::LoadRating;
use protobalance::config::{AlgorithmKind, Config};
use protobalance::model::{NodeFigures, NodeState, Snapshot, bind_worker_slot};

fn snapshot(algorithm: AlgorithmKind, nodes: usize) -> Snapshot {
    let mut text = format!(
        "state_dir = \"\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\nalgorithm = \"{algorithm}\"\n\
         load_rating = \"connections / weight + agent_load * 10\"\n"
    );
    for i in 0..nodes {
        text.push_str(&format!(
            "[[cluster.node]]\nname = \"n{i}\"\naddress = \"127.0.0.1:{}\"\nweight = {}\n",
            10_000 + i,
            1 + i % 5
        ));
    }
    let snapshot = protobalance::balance::compile(&Config::parse(&text, "bench").unwrap(), None);
    for (i, node) in snapshot.clusters["c"].nodes.iter().enumerate() {
        let x = i as f64;
        node.figures
            .set_rates(1.0 + x % 7.0, 1_000.0 * (x % 3.0), 5_000.0 * (x % 4.0));
        node.figures.set_agent_load(x % 11.0);
    }
    snapshot
}

/// CPU time of the calling thread, in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, started: u64) -> u64 {
        thread_cpu_ns() - started
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Nanoseconds
    }
}

/// Shows nanoseconds as ns or µs.
struct Nanoseconds;

impl ValueFormatter for Nanoseconds {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        if typical < 1_000.0 {
            return "ns";
        }
        values.iter_mut().for_each(|v| *v /= 1_000.0);
        "µs"
    }
    fn scale_throughputs(&self, _typical: f64, _throughput: &Throughput, _values: &mut [f64]) -> &'static str {
        unreachable!("these benchmarks declare no throughput")
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

fn pick(c: &mut Criterion<ThreadCpuTime>) {
    let mut group = c.benchmark_group("pick");
    for algorithm in AlgorithmKind::ALL {
        for nodes in [3, 30, 300] {
            let snapshot = snapshot(algorithm, nodes);
            let cluster = &snapshot.clusters["c"];
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(algorithm.name(), nodes), &nodes, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (client & 0xff_ffff)));
                    black_box(cluster.pick(black_box(ip)))
                })
            });
        }
    }
    group.finish();
}

/// The least-load expression alone, over one node's figures.
fn load_rating(c: &mut Criterion<ThreadCpuTime>) {
    let rating = LoadRating::compile("connections / weight + agent_load * 10").unwrap();
    let figures = [4.0, 2.0, 0.5, 1500.0, 500.0, 1000.0, 80.0, 3.0];
    c.bench_function("load_rating/eval", |b| b.iter(|| rating.eval(black_box(&figures))));
}

/// What every connection does first: load the published snapshot and find
/// its service's cluster.
fn snapshot_load(c: &mut Criterion<ThreadCpuTime>) {
    let published = arc_swap::ArcSwap::from_pointee(snapshot(AlgorithmKind::RoundRobin, 30));
    c.bench_function("snapshot/load_and_find_cluster", |b| {
        b.iter(|| {
            let snapshot = published.load();
            black_box(snapshot.cluster_of(black_box("s")).map(|(_, cluster)| cluster.clone()))
        })
    });
}

/// A client's pin among 10,000, found and not found.
fn affinity_lookup(c: &mut Criterion<ThreadCpuTime>) {
    let affinity = protobalance::model::Pins::default();
    let ip = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i));
    for i in 0..10_000 {
        affinity.pin("c", ip(i), &format!("n{}", i % 30));
    }
    let ttl = std::time::Duration::from_secs(3600);
    let mut i = 0u32;
    c.bench_function("affinity/pinned_hit", |b| {
        b.iter(|| {
            i = (i + 1) % 10_000;
            black_box(affinity.pinned("c", black_box(ip(i)), ttl))
        })
    });
    c.bench_function("affinity/pinned_miss", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(affinity.pinned("c", black_box(ip(20_000 + (i & 0xffff))), ttl))
        })
    });
}

/// What an open connection's task does on every wake-up besides its pump:
/// poll its wait for the node to turn red. Another worker's connection to the
/// same node polls its own wait without pause meanwhile, from the same worker
/// slot (one `Notify` for both, as when a node had a single one) or from a
/// slot of its own (the default for one worker per CPU). Needs 2 CPUs to show
/// a difference: with one, there is one slot.
fn red_wait(c: &mut Criterion<ThreadCpuTime>) {
    let figures = Arc::new(NodeFigures::new(NodeState::Green));
    let mut group = c.benchmark_group("red_wait_poll");
    for (name, other_slot) in [("other_worker_same_slot", 0), ("other_worker_own_slot", 1)] {
        let stop = Arc::new(AtomicBool::new(false));
        let other = std::thread::spawn({
            let (figures, stop) = (figures.clone(), stop.clone());
            move || {
                bind_worker_slot(other_slot);
                let mut red = pin!(figures.red());
                while !stop.load(Relaxed) {
                    let _ = red.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                }
            }
        });
        bind_worker_slot(0);
        let mut red = pin!(figures.red());
        group.bench_function(name, |b| {
            b.iter(|| black_box(red.as_mut().poll(&mut Context::from_waker(Waker::noop()))))
        });
        stop.store(true, Relaxed);
        other.join().unwrap();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = pick, load_rating, snapshot_load, affinity_lookup, red_wait
}
criterion_main!(benches);
