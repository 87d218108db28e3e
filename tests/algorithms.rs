//! Algorithms end to end through real sockets: least-load steered by load
//! agents, and traffic-rate weighing an open connection by the bytes it moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use protobalance::config::Config;
use protobalance::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A node that sends its name, then echoes what it receives.
async fn echo_backend(name: &'static str) -> SocketAddr {
    common::serve(move |mut stream| async move {
        if stream.write_all(name.as_bytes()).await.is_ok() {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await
}

/// A load agent that answers each poll with the current value of `load`.
async fn agent(load: Arc<AtomicU64>) -> SocketAddr {
    common::serve(move |mut stream| {
        let answer = format!("{}\n", f64::from_bits(load.load(Relaxed)));
        async move {
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    })
    .await
}

/// Connects through the balancer and returns the connection and the node name it reached.
async fn connect(balancer: SocketAddr) -> (TcpStream, String) {
    let mut stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(balancer))
        .await
        .unwrap()
        .unwrap();
    let mut name = [0u8; 1];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut name))
        .await
        .unwrap()
        .unwrap();
    (stream, String::from_utf8_lossy(&name).into_owned())
}

/// Waits (bounded) until `cond` holds, checking every 10 ms.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(cluster: &str, nodes: &[(&str, SocketAddr, Option<SocketAddr>)]) -> Config {
    let mut text = format!(
        "state_dir = \"\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\n{cluster}\n"
    );
    for (name, addr, agent) in nodes {
        text.push_str(&format!("[[cluster.node]]\nname = \"{name}\"\naddress = \"{addr}\"\n"));
        if let Some(agent) = agent {
            text.push_str(&format!("agent = \"{agent}\"\n"));
        }
    }
    Config::parse(&text, "test").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_load_follows_what_the_agents_report() {
    let load_a = Arc::new(AtomicU64::new(1.0f64.to_bits()));
    let load_b = Arc::new(AtomicU64::new(5.0f64.to_bits()));
    let nodes = [
        ("a", echo_backend("a").await, Some(agent(load_a.clone()).await)),
        ("b", echo_backend("b").await, Some(agent(load_b.clone()).await)),
    ];
    let config = config(
        "algorithm = \"least-load\"\nload_rating = \"agent_load * 1000 + connections / weight\"\nretry_interval = \"50ms\"",
        &nodes,
    );
    let server = Server::start(&config).await.unwrap();
    let addr = server.addr_of("web").unwrap();
    let snapshot = server.snapshot();
    let figures = |n: &str| snapshot.clusters["c"].node(n).unwrap().figures.clone();
    let (a, b) = (figures("a"), figures("b"));

    until("the first agent answers", || {
        a.agent_load() == 1.0 && b.agent_load() == 5.0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(connect(addr).await.1, "a");
    }

    load_a.store(9.0f64.to_bits(), Relaxed);
    load_b.store(2.0f64.to_bits(), Relaxed);
    until("the new loads", || a.agent_load() == 9.0 && b.agent_load() == 2.0).await;
    for _ in 0..20 {
        assert_eq!(connect(addr).await.1, "b");
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_rate_weighs_an_open_connection_by_the_bytes_it_moves() {
    let nodes = [
        ("a", echo_backend("a").await, None),
        ("b", echo_backend("b").await, None),
    ];
    let server = Server::start(&config("algorithm = \"traffic-rate\"", &nodes))
        .await
        .unwrap();
    let addr = server.addr_of("web").unwrap();

    // One long-lived connection moves 256 kB each way and stays open.
    let (mut busy, busy_node) = connect(addr).await;
    let chunk = vec![7u8; 256 * 1024];
    let mut echoed = vec![0u8; chunk.len()];
    let (mut r, mut w) = busy.split();
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
