//! Availability with real sockets: fall-over chains, unavailable nodes and the
//! probe that brings them back, green/yellow/red at run time, and client
//! affinity that survives restarts. Every backend is a real listener on
//! 127.0.0.1; client source addresses are 127.x.y.z.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// Clients of Behaviour::Echo backends

/// Which node serves a connection from `from`: sends "ping\n", reads the
/// backend's name line and the echo.
async fn who_from(from: IpAddr, to: SocketAddr) -> String {
    let stream = connect_from(from, to).await;
    let (name, _) = exchange(stream, b"ping\n").await;
    name
}

async fn who(to: SocketAddr) -> String {
    who_from(IpAddr::V4(Ipv4Addr::LOCALHOST), to).await
}

/// Sends `payload` to a [`Behaviour::Echo`] backend through the balancer;
/// returns the backend's name and the echoed bytes.
async fn exchange(stream: TcpStream, payload: &[u8]) -> (String, Vec<u8>) {
    within("the answer", async {
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(payload).await.unwrap();
        let mut name = String::new();
        stream.read_line(&mut name).await.unwrap();
        assert!(name.ends_with('\n'), "no name line, got {name:?}");
        let mut echo = vec![0u8; payload.len()];
        stream.read_exact(&mut echo).await.unwrap();
        (name.trim_end().to_string(), echo)
    })
    .await
}

// ---------------------------------------------------------------------------
// The balancer

/// Service "svc" served by cluster "c" of `nodes`, whose probe retries
/// unavailable nodes every 100 ms, with `keys` for the cluster.
fn cluster(keys: &str, nodes: impl IntoIterator<Item = Node>) -> ConfigText {
    ConfigText::one_service(
        Cluster::new("c")
            .key("retry_interval = \"100ms\"")
            .key(keys)
            .nodes(nodes),
    )
}

fn figures(server: &Server, node: &str) -> Arc<NodeFigures> {
    server.snapshot().clusters["c"].node(node).unwrap().figures.clone()
}

// ---------------------------------------------------------------------------
// Fall-over

#[tokio::test]
async fn a_node_killed_mid_test_is_skipped_then_probed_back() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;

    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(who(addr).await);
    }
    assert_eq!(served, ["a", "b", "a", "b"]);

    let a_addr = a.kill().await;
    // Every client is served, by b, although a's address refuses connections.
    for i in 0..20 {
        assert_eq!(who(addr).await, "b", "client {i} after a died");
    }
    let fa = figures(&server, "a");
    assert!(!fa.is_available());
    assert_eq!(fa.health_transitions(), 1, "one transition to unavailable");
    assert_eq!(fa.connect_failures(), 1, "a left selection after its first failure");

    // a comes back on the same address: the background probe (not a client) notices.
    let _a = Backend::start_on("a", Behaviour::Echo, a_addr).await;
    wait_until("the probe marks a available", || async { fa.is_available() }).await;
    assert_eq!(fa.health_transitions(), 2);
    let mut served: Vec<String> = Vec::new();
    for _ in 0..4 {
        served.push(who(addr).await);
    }
    assert!(served.iter().any(|n| n == "a"), "a takes clients again: {served:?}");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_that_closes_at_once_gets_the_client_bytes_replayed_to_the_next() {
    let a = Backend::start("a", Behaviour::CloseAtOnce).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;

    // 10,000 bytes: under the held limit, sent in one write before any answer.
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (name, echo) = exchange(TcpStream::connect(addr).await.unwrap(), &payload).await;
    assert_eq!(name, "b");
    assert!(echo == payload, "the replayed bytes arrive byte for byte");
    let fa = figures(&server, "a");
    assert!(!fa.is_available(), "a node that closes before answering is unavailable");
    assert_eq!(figures(&server, "b").bytes_in(), payload.len() as u64);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_half_closed_client_is_replayed_with_its_eof() {
    // The client sends and half-closes at once; a resets on seeing the bytes;
    // b gets the same bytes and the EOF, and answers after the EOF.
    let a = Backend::start("a", Behaviour::ResetOnData).await;
    let b = Backend::start("b", Behaviour::AnswerAfterEof).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    within("the answer", stream.read_to_string(&mut answer)).await.unwrap();
    assert_eq!(answer, "b got 5 bytes");
    assert!(!figures(&server, "a").is_available());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_that_reads_and_hangs_up_without_a_word_falls_over() {
    let a = Backend::start("a", Behaviour::ReadAndClose).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    assert_eq!(who(addr).await, "b");
    assert!(!figures(&server, "a").is_available());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_that_hangs_up_after_the_client_finished_sending_is_kept() {
    // The client sends its request and half-closes: the node's silent close is
    // its answer (fire-and-forget), not a failure; nothing is sent twice.
    let a = Backend::start("a", Behaviour::ReadAndClose).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"log line\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    within("the answer", stream.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.is_empty(), "no answer, no fall-over: {answer:?}");
    assert!(figures(&server, "a").is_available());
    assert_eq!(figures(&server, "b").total_connections(), 0);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_whose_accept_queue_is_full_times_out_and_falls_over() {
    let (a_addr, _queue) = never_accepts();
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster(
        "connect_timeout = \"300ms\"",
        [Node::new("a", a_addr).fallover("b"), Node::new("b", b.addr)],
    );
    let (server, addr) = cfg.start().await;
    assert_eq!(who(addr).await, "b");
    let fa = figures(&server, "a");
    assert!(!fa.is_available());
    assert_eq!(fa.connect_failures(), 1);
    assert_eq!(who(addr).await, "b");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_chain_of_three_is_followed_before_the_other_nodes() {
    // a (picked: heaviest) refuses, its fall-over b closes at once, b's fall-over
    // c serves; d, not in the chain, would come after c.
    let b = Backend::start("b", Behaviour::CloseAtOnce).await;
    let c = Backend::start("c", Behaviour::Echo).await;
    let d = Backend::start("d", Behaviour::Echo).await;
    let cfg = cluster(
        "",
        [
            Node::new("d", d.addr),
            Node::new("a", dead_addr()).weight(100).fallover("b"),
            Node::new("b", b.addr).fallover("c"),
            Node::new("c", c.addr),
        ],
    );
    let (server, addr) = cfg.start().await;
    assert_eq!(who(addr).await, "c");
    assert!(!figures(&server, "a").is_available());
    assert!(!figures(&server, "b").is_available());
    assert!(figures(&server, "c").is_available());
    assert_eq!(figures(&server, "d").total_connections(), 0);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn no_client_sees_an_error_while_one_node_can_serve() {
    let a = Backend::start("a", Behaviour::CloseAtOnce).await;
    let c = Backend::start("c", Behaviour::Echo).await;
    let cfg = cluster(
        "",
        [
            Node::new("a", a.addr),
            Node::new("b", dead_addr()),
            Node::new("c", c.addr),
        ],
    );
    let (server, addr) = cfg.start().await;
    for i in 0..10 {
        assert_eq!(who(addr).await, "c", "client {i}");
    }
    server.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// Server-speaks-first protocols

#[tokio::test]
async fn a_node_that_closes_before_its_greeting_falls_over() {
    let a = Backend::start("a", Behaviour::CloseAtOnce).await;
    let b = Backend::start("b", Behaviour::Greet).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    within("the answer", stream.read_line(&mut greeting)).await.unwrap();
    assert_eq!(greeting, "220 b\r\n");
    assert!(!figures(&server, "a").is_available());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_that_greets_then_closes_is_answering_not_failing() {
    let a = Backend::start("a", Behaviour::GreetAndClose).await;
    let b = Backend::start("b", Behaviour::Greet).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut all = String::new();
    within("the answer", stream.read_to_string(&mut all)).await.unwrap();
    assert_eq!(all, "220 a\r\n", "the client sees a's greeting and a's close");
    let fa = figures(&server, "a");
    assert!(fa.is_available(), "closing after the greeting is a's answer");
    assert_eq!(fa.health_transitions(), 0);
    assert_eq!(figures(&server, "b").total_connections(), 0, "no fall-over");
    server.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// States

#[tokio::test]
async fn yellow_drains_while_an_open_connection_keeps_streaming() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let c = Backend::start("c", Behaviour::Echo).await;
    let cfg = cluster(
        "",
        [
            Node::new("a", a.addr).fallover("c"),
            Node::new("b", b.addr),
            Node::new("c", c.addr),
        ],
    );
    let (server, addr) = cfg.start().await;

    let mut open = BufReader::new(TcpStream::connect(addr).await.unwrap());
    open.get_mut().write_all(b"hello\n").await.unwrap();
    let mut line = String::new();
    open.read_line(&mut line).await.unwrap();
    assert_eq!(line, "a\n");
    line.clear();
    open.read_line(&mut line).await.unwrap();

    server.set_node_state("c", "a", NodeState::Yellow).unwrap();
    assert_eq!(figures(&server, "a").state(), NodeState::Yellow);
    // New connections avoid a; the ones that would have gone to a go to its fall-over node c.
    let mut served = Vec::new();
    for _ in 0..6 {
        served.push(who(addr).await);
    }
    assert!(
        !served.iter().any(|n| n == "a"),
        "yellow a takes no new client: {served:?}"
    );
    // The open connection to a keeps streaming, both ways.
    for i in 0..200 {
        let msg = format!("message {i}\n");
        open.get_mut().write_all(msg.as_bytes()).await.unwrap();
        line.clear();
        within("the answer", open.read_line(&mut line)).await.unwrap();
        assert_eq!(line, msg);
    }
    assert_eq!(figures(&server, "a").active_connections(), 1);
    assert_eq!(a.open_connections(), 1);
    drop(open);
    wait_until("a drained", || async {
        figures(&server, "a").active_connections() == 0
    })
    .await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn yellow_sends_a_pinned_client_to_the_fall_over_node_first() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let c = Backend::start("c", Behaviour::Echo).await;
    let cfg = cluster(
        "affinity = true",
        [
            Node::new("a", a.addr),
            Node::new("b", b.addr).fallover("c"),
            Node::new("c", c.addr),
        ],
    );
    let (server, addr) = cfg.start().await;
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");
    server.set_node_state("c", "b", NodeState::Yellow).unwrap();
    for _ in 0..3 {
        assert_eq!(who_from(ip(0, 0, 3), addr).await, "c", "b's fall-over node first");
    }
    server.set_node_state("c", "b", NodeState::Green).unwrap();
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b", "the pin stayed on b");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn red_cuts_open_connections_at_once_and_takes_no_new_ones() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;

    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut answer = [0u8; 3];
    open.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"a\nx");
    assert_eq!(a.open_connections(), 1);

    server.set_node_state("c", "a", NodeState::Red).unwrap();
    // The client sees its connection end (EOF or reset), without sending anything.
    let mut rest = [0u8; 16];
    let ended = within("the client's connection is cut", open.read(&mut rest)).await;
    assert!(matches!(ended, Ok(0) | Err(_)), "cut, not data: {ended:?}");
    // And the node's side is closed too.
    wait_until("a's side of the connection is closed", || async {
        a.open_connections() == 0
    })
    .await;
    assert_eq!(figures(&server, "a").active_connections(), 0);
    for _ in 0..3 {
        assert_eq!(who(addr).await, "b");
    }
    assert!(server.set_node_state("c", "nope", NodeState::Red).is_err());
    assert!(server.set_node_state("nope", "a", NodeState::Red).is_err());
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_node_that_turns_red_before_answering_hands_the_client_to_the_next() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr).fallover("b"), Node::new("b", b.addr)]);
    let (server, addr) = cfg.start().await;
    // Connected to a, which waits for the client's first bytes: on probation.
    let stream = TcpStream::connect(addr).await.unwrap();
    wait_until("a has the connection", || async { a.open_connections() == 1 }).await;
    server.set_node_state("c", "a", NodeState::Red).unwrap();
    wait_until("a's connection is closed", || async { a.open_connections() == 0 }).await;
    let (name, echo) = exchange(stream, b"ping\n").await;
    assert_eq!((name.as_str(), echo.as_slice()), ("b", &b"ping\n"[..]));
    assert!(figures(&server, "a").is_available(), "red is not a failure");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn ip_hash_sends_the_clients_of_a_yellow_or_dead_node_to_its_fall_over_node_first() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let c = Backend::start("c", Behaviour::Echo).await;
    let sources: Vec<IpAddr> = (1..=60).map(|i| ip(0, 1, i)).collect();
    let hashed = |fallover: bool| {
        let a = Node::new("a", a.addr);
        let a = if fallover { a.fallover("c") } else { a };
        cluster(
            "algorithm = \"ip-hash\"",
            [a, Node::new("b", b.addr), Node::new("c", c.addr)],
        )
    };
    // Where the hash alone sends a's clients once a is out: the runner-up.
    let (plain, plain_addr) = hashed(false).start().await;
    let mut home_a = Vec::new();
    for &src in &sources {
        if who_from(src, plain_addr).await == "a" {
            home_a.push(src);
        }
    }
    plain.set_node_state("c", "a", NodeState::Yellow).unwrap();
    let mut runner_up_b = Vec::new();
    for &src in &home_a {
        if who_from(src, plain_addr).await == "b" {
            runner_up_b.push(src);
        }
    }
    plain.shutdown(Duration::from_secs(5)).await;
    assert!(
        !runner_up_b.is_empty(),
        "some of a's clients would go to b by hash alone"
    );

    // With a.fallover = c, those clients go to c: a's chain comes first.
    let (server, addr) = hashed(true).start().await;
    server.set_node_state("c", "a", NodeState::Yellow).unwrap();
    for &src in &runner_up_b {
        assert_eq!(who_from(src, addr).await, "c", "yellow a's client {src}");
    }
    server.set_node_state("c", "a", NodeState::Green).unwrap();
    a.kill().await;
    for &src in &runner_up_b {
        assert_eq!(who_from(src, addr).await, "c", "dead a's client {src}");
    }
    assert!(!figures(&server, "a").is_available());
    server.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// Affinity

#[tokio::test]
async fn affinity_is_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("affinity = true", [Node::new("a", a.addr), Node::new("b", b.addr)]).state_dir(dir.path());

    let (server, addr) = cfg.start().await;
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");
    for _ in 0..3 {
        assert_eq!(who_from(ip(0, 0, 3), addr).await, "b", "pinned, not round robin");
        assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    }
    server.shutdown(Duration::from_secs(5)).await;

    // A fresh round robin would give a first; the pin says b.
    let (server, addr) = cfg.start().await;
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_pin_expires_after_its_ttl() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster(
        "affinity = true\naffinity_ttl = \"1h\"",
        [Node::new("a", a.addr), Node::new("b", b.addr)],
    );
    let clock = WallClock::manual(1_000_000_000);
    let (server, addr) = cfg
        .start_with(Options {
            wall_clock: clock.clone(),
            ..Options::default()
        })
        .await;
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");
    wait_until("b's connections ended", || async { b.open_connections() == 0 }).await;
    // The pin is refreshed when a connection ends: the TTL counts from there.
    clock.advance(Duration::from_secs(3599));
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b", "pinned within the TTL");
    wait_until("b's connections ended", || async { b.open_connections() == 0 }).await;
    clock.advance(Duration::from_secs(3601));
    assert_eq!(
        who_from(ip(0, 0, 3), addr).await,
        "a",
        "expired: the algorithm picks again (round robin's turn is a)"
    );
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_corrupt_state_file_means_a_fresh_store_not_a_failed_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("affinity.redb"), vec![0xA5u8; 8192]).unwrap();
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster("affinity = true", [Node::new("a", a.addr), Node::new("b", b.addr)]).state_dir(dir.path());
    let (server, addr) = cfg.start().await;
    assert!(server.affinity().is_persistent());
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("affinity.redb.corrupt.")
        })
        .count();
    assert_eq!(aside, 1, "the bad file is kept aside");
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");
    server.shutdown(Duration::from_secs(5)).await;
    let (server, addr) = cfg.start().await;
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b", "the fresh store works");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn hundreds_of_client_ips_are_pinned_and_restored_after_a_restart() {
    // The store itself is tested with 10,000 clients (src/affinity.rs); end to
    // end, 300 distinct sources keep the test quick on two loaded cores.
    const CLIENTS: u16 = 300;
    let dir = tempfile::tempdir().unwrap();
    let backends = [
        Backend::start("a", Behaviour::Echo).await,
        Backend::start("b", Behaviour::Echo).await,
        Backend::start("c", Behaviour::Echo).await,
    ];
    let cfg = cluster(
        "affinity = true",
        [
            Node::new("a", backends[0].addr),
            Node::new("b", backends[1].addr),
            Node::new("c", backends[2].addr),
        ],
    )
    .state_dir(dir.path());
    let source = |i: u16| ip(1 + (i / 250) as u8, 0, (i % 250) as u8 + 1);

    let (server, addr) = cfg.start().await;
    let mut first = Vec::new();
    for i in 0..CLIENTS {
        first.push(who_from(source(i), addr).await);
    }
    assert_eq!(server.affinity().len("c"), usize::from(CLIENTS));
    server.shutdown(Duration::from_secs(5)).await;

    let (server, addr) = cfg.start().await;
    assert_eq!(server.affinity().len("c"), usize::from(CLIENTS));
    // Walk in reverse, so that round robin alone would not reproduce the order.
    for i in (0..CLIENTS).rev() {
        assert_eq!(
            who_from(source(i), addr).await,
            first[usize::from(i)],
            "client {}",
            source(i)
        );
    }
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn pins_are_shared_by_every_listener_of_the_service() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = ConfigText::new()
        .service(Service::new("svc", "c").listen(&["127.0.0.1:0", "127.0.0.1:0"]))
        .cluster(
            Cluster::new("c")
                .key("affinity = true")
                .nodes([Node::new("a", a.addr), Node::new("b", b.addr)]),
        );
    let (server, _) = cfg.start().await;
    let ports: Vec<SocketAddr> = server.listen_addrs().into_iter().map(|(_, a)| a).collect();
    assert_eq!(ports.len(), 2);
    assert_eq!(who_from(ip(0, 0, 2), ports[0]).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), ports[0]).await, "b");
    // The "data connection" on the other port reaches the same node.
    assert_eq!(who_from(ip(0, 0, 3), ports[1]).await, "b");
    assert_eq!(who_from(ip(0, 0, 2), ports[1]).await, "a");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_pin_survives_its_node_being_unavailable_and_moves_when_it_turns_red() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let b = Backend::start("b", Behaviour::Echo).await;
    let cfg = cluster(
        "affinity = true",
        [Node::new("a", a.addr), Node::new("b", b.addr).fallover("a")],
    );
    let (server, addr) = cfg.start().await;
    assert_eq!(who_from(ip(0, 0, 2), addr).await, "a");
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b");

    // b dies: its client is served by b's fall-over node, and stays pinned to b.
    let b_addr = b.kill().await;
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "a");
    let fb = figures(&server, "b");
    assert!(!fb.is_available());
    let _b = Backend::start_on("b", Behaviour::Echo, b_addr).await;
    wait_until("the probe marks b available", || async { fb.is_available() }).await;
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "b", "back to its pinned node");

    // Red moves the pin for good, even if b is green again before the client returns.
    server.set_node_state("c", "b", NodeState::Red).unwrap();
    server.set_node_state("c", "b", NodeState::Green).unwrap();
    assert_eq!(
        who_from(ip(0, 0, 3), addr).await,
        "a",
        "pinned anew (round robin's turn is a)"
    );
    assert_eq!(who_from(ip(0, 0, 3), addr).await, "a", "the pin moved to a");
    server.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// Last resort

/// One node "a" that refuses one connect (killed, then back on its address);
/// the probe waits an hour, so only a client can find it serving again.
/// Whether the client after the refused one is served.
async fn next_client_after_one_refusal(last_resort: &str) -> bool {
    let a = Backend::start("a", Behaviour::Echo).await;
    let cfg = ConfigText::one_service(
        Cluster::new("c")
            .key("retry_interval = \"1h\"")
            .key(last_resort)
            .nodes([Node::new("a", a.addr)]),
    );
    let (server, addr) = cfg.start().await;
    let a_addr = a.kill().await;
    // This client's connect to a is refused: a leaves selection.
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let ended = within("the refused client is closed", refused.read(&mut buf)).await;
    assert!(matches!(ended, Ok(0) | Err(_)), "closed, not served: {ended:?}");
    let fa = figures(&server, "a");
    assert!(!fa.is_available());

    let _a = Backend::start_on("a", Behaviour::Echo, a_addr).await;
    let mut next = TcpStream::connect(addr).await.unwrap();
    next.write_all(b"x").await.unwrap();
    let mut answer = Vec::new();
    within("the next client's answer or close", async {
        let mut buf = [0u8; 8];
        while answer.len() < 3 {
            match next.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let served = answer == b"a\nx";
    assert_eq!(
        fa.is_available(),
        served,
        "a serving a last-resort client is available again"
    );
    drop(next);
    server.shutdown(Duration::from_secs(5)).await;
    served
}

#[tokio::test]
async fn a_single_node_that_refused_one_connect_serves_the_next_client() {
    assert!(next_client_after_one_refusal("").await, "default last_resort");
    assert!(next_client_after_one_refusal("last_resort = \"try-unavailable\"").await);
}

#[tokio::test]
async fn last_resort_refuse_keeps_refusing_until_the_probe() {
    assert!(!next_client_after_one_refusal("last_resort = \"refuse\"").await);
}

#[tokio::test]
async fn last_resort_never_tries_a_yellow_node() {
    let a = Backend::start("a", Behaviour::Echo).await;
    let cfg = cluster("", [Node::new("a", a.addr)]);
    let (server, addr) = cfg.start().await;
    server.set_node_state("c", "a", NodeState::Yellow).unwrap();
    figures(&server, "a").set_available(false);
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let ended = within("the client is refused", client.read(&mut buf)).await;
    assert!(matches!(ended, Ok(0) | Err(_)), "refused, not served: {ended:?}");
    assert_eq!(a.open_connections(), 0);
    server.shutdown(Duration::from_secs(5)).await;
}
