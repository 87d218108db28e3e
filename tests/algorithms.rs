//! Algorithms end to end through real sockets: least-load steered by load
//! agents, and traffic-rate weighing an open connection by the bytes it moves.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A load agent that answers each poll with the current value of `load`.
async fn agent(load: Arc<AtomicU64>) -> SocketAddr {
    serve(move |mut stream| {
        let answer = format!("{}\n", f64::from_bits(load.load(Relaxed)));
        async move {
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    })
    .await
}

/// Connects through the balancer to a [`Behaviour::Greet`] node; returns the
/// connection and the name of the node it reached.
async fn connect(balancer: SocketAddr) -> (BufReader<TcpStream>, String) {
    within("a greeting through the balancer", async {
        let mut stream = BufReader::new(TcpStream::connect(balancer).await.unwrap());
        let mut greeting = String::new();
        stream.read_line(&mut greeting).await.unwrap();
        let name = greeting
            .strip_prefix("220 ")
            .unwrap_or_else(|| panic!("greeting {greeting:?}"));
        let name = name.trim_end().to_string();
        (stream, name)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_follows_what_the_agents_report() {
    let load_a = Arc::new(AtomicU64::new(1.0f64.to_bits()));
    let load_b = Arc::new(AtomicU64::new(5.0f64.to_bits()));
    let (a, b) = (
        Backend::start("a", Behaviour::Greet).await,
        Backend::start("b", Behaviour::Greet).await,
    );
    let (agent_a, agent_b) = (agent(load_a.clone()).await, agent(load_b.clone()).await);
    let cluster = Cluster::new("c")
        .key("algorithm = \"least-load\"")
        .key("load_rating = \"agent_load * 1000 + connections / weight\"")
        .key("retry_interval = \"50ms\"")
        .node(Node::new("a", a.addr).key(&format!("agent = \"{agent_a}\"")))
        .node(Node::new("b", b.addr).key(&format!("agent = \"{agent_b}\"")));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let snapshot = server.snapshot();
    let figures = |n: &str| snapshot.clusters["c"].node(n).unwrap().figures.clone();
    let (fa, fb) = (figures("a"), figures("b"));

    wait_until("the first agent answers", || async {
        fa.agent_load() == 1.0 && fb.agent_load() == 5.0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(connect(addr).await.1, "a");
    }

    load_a.store(9.0f64.to_bits(), Relaxed);
    load_b.store(2.0f64.to_bits(), Relaxed);
    wait_until("the new loads", || async {
        fa.agent_load() == 9.0 && fb.agent_load() == 2.0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(connect(addr).await.1, "b");
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_rate_weighs_an_open_connection_by_the_bytes_it_moves() {
    let (a, b) = (
        Backend::start("a", Behaviour::Greet).await,
        Backend::start("b", Behaviour::Greet).await,
    );
    let cluster = Cluster::of("c", &[("a", a.addr), ("b", b.addr)]).key("algorithm = \"traffic-rate\"");
    let (server, addr) = ConfigText::one_service(cluster).start().await;

    // One long-lived connection moves 256 kB each way and stays open.
    let (mut busy, busy_node) = connect(addr).await;
    let chunk = vec![7u8; 256 * 1024];
    let mut echoed = vec![0u8; chunk.len()];
    let (mut r, mut w) = busy.get_mut().split();
    let (sent, received) = tokio::join!(w.write_all(&chunk), r.read_exact(&mut echoed));
    sent.unwrap();
    received.unwrap();

    // Every new connection now goes to the other node, the traffic of the open
    // one counting already (rates sample every 250 ms and decay over 5 s: a
    // few new connections that move one byte stay far below it).
    let other = if busy_node == "a" { "b" } else { "a" };
    for _ in 0..10 {
        assert_eq!(connect(addr).await.1, other);
    }
    drop(busy);
    server.shutdown(Duration::from_secs(5)).await;
}

/// An agent that reports a negative load (`-1e300`) counts as idle (0), no
/// less: a negative number would turn the rating upside down, so that the
/// node seemed the less loaded the more connections it held, and took them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_agent_load_counts_as_zero() {
    let (a, b) = (
        Backend::start("a", Behaviour::Greet).await,
        Backend::start("b", Behaviour::Greet).await,
    );
    // a's agent says 7 first, so that its next answer shows when it lands.
    let negative = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agent_a = serve({
        let negative = negative.clone();
        move |mut stream| {
            let answer: &[u8] = if negative.load(Relaxed) { b"-1e300\n" } else { b"7\n" };
            async move {
                let _ = stream.write_all(answer).await;
            }
        }
    })
    .await;
    let agent_b = agent(Arc::new(AtomicU64::new(0f64.to_bits()))).await;
    let cluster = Cluster::new("c")
        .key("algorithm = \"least-load\"")
        .key("load_rating = \"(agent_load + 1) * (connections + 1)\"")
        .key("retry_interval = \"50ms\"")
        .node(Node::new("a", a.addr).key(&format!("agent = \"{agent_a}\"")))
        .node(Node::new("b", b.addr).key(&format!("agent = \"{agent_b}\"")));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let snapshot = server.snapshot();
    let figures = |n: &str| snapshot.clusters["c"].node(n).unwrap().figures.clone();
    let (fa, fb) = (figures("a"), figures("b"));
    wait_until("a's agent to answer", || async { fa.agent_load() == 7.0 }).await;
    negative.store(true, Relaxed);
    wait_until("a's agent to answer -1e300", || async { fa.agent_load() != 7.0 }).await;
    assert_eq!(fa.agent_load(), 0.0, "held at 0");
    assert_eq!(fb.agent_load(), 0.0);

    // Open connections count: with a at 0, the two nodes take turns.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect(addr).await);
    }
    let on_b = held.iter().filter(|(_, node)| node == "b").count();
    assert_eq!(
        on_b,
        5,
        "b takes its share: {:?}",
        held.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );
    drop(held);
    server.shutdown(Duration::from_secs(5)).await;
}
