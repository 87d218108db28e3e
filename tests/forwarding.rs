//! Forwarding through real sockets: byte-exactness on both pump paths,
//! half-close, reset propagation, weights, connect timeouts, port ranges and
//! graceful shutdown.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const TEN_MB: usize = 10 * 1024 * 1024;

/// A backend that receives until EOF (reported through the channel) while
/// sending `reply`, then closes.
async fn exchange_backend(reply: Vec<u8>) -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reply = std::sync::Arc::new(reply);
    let addr = serve(move |mut s| {
        let (tx, reply) = (tx.clone(), reply.clone());
        async move {
            let (mut r, mut w) = s.split();
            let mut got = Vec::new();
            let (read, write) = tokio::join!(r.read_to_end(&mut got), async {
                w.write_all(&reply).await?;
                w.shutdown().await
            });
            read.expect("backend reads until EOF");
            write.expect("backend writes its reply");
            let _ = tx.send(got).await;
        }
    })
    .await;
    (addr, rx)
}

async fn ten_mb_each_way(forwarding: &str) {
    ten_mb_each_way_with(&format!("forwarding = \"{forwarding}\"")).await;
}

/// 10 MB each way through a balancer with one node and `top` among its
/// top-level keys: byte-exact both ways, and counted.
async fn ten_mb_each_way_with(top: &str) {
    let upstream = random_bytes(TEN_MB);
    let downstream = random_bytes(TEN_MB);
    let (node, mut received) = exchange_backend(downstream.clone()).await;
    let (server, addr) = one_node(node).top(top).start().await;

    let client = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let (sent, got) = within("10 MB each way", async {
        tokio::join!(
            async {
                w.write_all(&upstream).await.unwrap();
                w.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::with_capacity(TEN_MB);
                r.read_to_end(&mut got).await.unwrap();
                got
            }
        )
    })
    .await;
    let () = sent;
    assert!(
        got == downstream,
        "node → client bytes differ ({} of {} bytes)",
        got.len(),
        TEN_MB
    );
    let at_node = within("backend report", received.recv()).await.unwrap();
    assert!(
        at_node == upstream,
        "client → node bytes differ ({} of {} bytes)",
        at_node.len(),
        TEN_MB
    );

    let snap = server.snapshot();
    let figures = &snap.clusters["pool"].nodes[0].figures;
    assert_eq!(figures.bytes_in(), TEN_MB as u64);
    assert_eq!(figures.bytes_out(), TEN_MB as u64);
    server.shutdown(PATIENCE).await;
}

/// Service `svc` on cluster `pool` of one node `a` at `node`.
fn one_node(node: SocketAddr) -> ConfigText {
    ConfigText::one_service(Cluster::of("pool", &[("a", node)]))
}

/// A balancer with one node and the named forwarding path.
async fn start_one_node(node: SocketAddr, forwarding: &str) -> (Server, SocketAddr) {
    one_node(node)
        .top(&format!("forwarding = \"{forwarding}\""))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mb_each_way_byte_exact_with_splice() {
    ten_mb_each_way("splice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mb_each_way_byte_exact_with_copy() {
    ten_mb_each_way("copy").await;
}

/// `auto` starts each direction on the copy path and moves to splice once
/// chunks grow: 10 MB crosses both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mb_each_way_byte_exact_with_auto() {
    ten_mb_each_way("auto").await;
}

/// Busy polling changes when a worker looks for events, never what it
/// forwards: the auto path (copy, then splice) with workers that spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mb_each_way_byte_exact_with_busy_polling() {
    ten_mb_each_way_with("busy_poll = \"50us\"").await;
}

#[test]
fn forwarding_key_selects_the_path() {
    let with = |mode: &str| {
        one_node(dead_addr())
            .top(&format!("forwarding = \"{mode}\""))
            .config()
            .forwarding
    };
    assert_eq!(with("copy"), ForwardMode::Copy);
    assert_eq!(with("splice"), ForwardMode::Splice);
    assert_eq!(with("auto"), ForwardMode::Auto);
}

async fn client_half_close(forwarding: &str) {
    // The client sends, shuts down its write side, and still gets the reply
    // that the node sends only after seeing EOF.
    let node = serve(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes after your EOF", got.len()).as_bytes())
            .await
            .unwrap();
    })
    .await;
    let (server, addr) = start_one_node(node, forwarding).await;
    let reply = within("client half-close", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    })
    .await;
    assert_eq!(reply, "got 5 bytes after your EOF");
    server.shutdown(PATIENCE).await;
}

async fn node_half_close(forwarding: &str) {
    // The node greets and shuts down its write side; the client reads EOF,
    // then answers, and the node still receives the answer.
    let (tx, rx) = oneshot::channel::<String>();
    let tx = std::sync::Mutex::new(Some(tx));
    let node = serve(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).await.unwrap();
            if let Some(tx) = tx {
                let _ = tx.send(got);
            }
        }
    })
    .await;
    let (server, addr) = start_one_node(node, forwarding).await;
    within("node half-close", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = String::new();
        s.read_to_string(&mut greeting).await.unwrap();
        assert_eq!(greeting, "greeting");
        s.write_all(b"answer after your EOF").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(rx.await.unwrap(), "answer after your EOF");
    })
    .await;
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn client_half_close_propagates_splice() {
    client_half_close("splice").await;
}

#[tokio::test]
async fn client_half_close_propagates_auto() {
    client_half_close("auto").await;
}

#[tokio::test]
async fn client_half_close_propagates_copy() {
    client_half_close("copy").await;
}

#[tokio::test]
async fn node_half_close_propagates_splice() {
    node_half_close("splice").await;
}

#[tokio::test]
async fn node_half_close_propagates_copy() {
    node_half_close("copy").await;
}

/// Resets a stream: close with SO_LINGER 0 sends RST.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

async fn client_reset_reaches_node(forwarding: &str) {
    let (tx, rx) = oneshot::channel::<std::io::Result<usize>>();
    let tx = std::sync::Mutex::new(Some(tx));
    let node = serve(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"ready").await.unwrap();
            let mut buf = [0u8; 16];
            let r = s.read(&mut buf).await;
            if let Some(tx) = tx {
                let _ = tx.send(r);
            }
        }
    })
    .await;
    let (server, addr) = start_one_node(node, forwarding).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 5];
    within("greeting", s.read_exact(&mut buf)).await.unwrap();
    reset(s);
    let seen = within("node sees the reset", rx).await.unwrap();
    assert_eq!(seen.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    server.shutdown(PATIENCE).await;
}

async fn node_reset_reaches_client(forwarding: &str) {
    let node = serve(|mut s| async move {
        s.write_all(b"ready").await.unwrap();
        let mut buf = [0u8; 1];
        let _ = s.read(&mut buf).await; // the client's go-ahead
        reset(s);
    })
    .await;
    let (server, addr) = start_one_node(node, forwarding).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 5];
    within("greeting", s.read_exact(&mut buf)).await.unwrap();
    s.write_all(b"!").await.unwrap();
    let r = within("client sees the reset", s.read(&mut buf)).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn client_reset_propagates_splice() {
    client_reset_reaches_node("splice").await;
}

#[tokio::test]
async fn client_reset_propagates_copy() {
    client_reset_reaches_node("copy").await;
}

#[tokio::test]
async fn node_reset_propagates_splice() {
    node_reset_reaches_client("splice").await;
}

#[tokio::test]
async fn node_reset_propagates_auto() {
    node_reset_reaches_client("auto").await;
}

#[tokio::test]
async fn node_reset_propagates_copy() {
    node_reset_reaches_client("copy").await;
}

#[tokio::test]
async fn weights_3_to_1_over_400_connections_interleaved() {
    let a = name_backend("a").await;
    let b = name_backend("b").await;
    let cluster = Cluster::new("pool")
        .key("algorithm = \"round-robin\"")
        .node(Node::new("a", a).weight(3))
        .node(Node::new("b", b).weight(1));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let mut order = String::new();
    for _ in 0..400 {
        order.push_str(&read_all(addr).await);
    }
    assert_eq!(order.len(), 400, "every connection got an answer");
    assert_eq!(order.matches('a').count(), 300);
    for (i, window) in order.as_bytes().chunks(4).enumerate() {
        assert_eq!(
            window.iter().filter(|&&c| c == b'a').count(),
            3,
            "window {i}: {:?}",
            order.get(i * 4..i * 4 + 4)
        );
    }
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn node_that_never_accepts_is_skipped_after_connect_timeout() {
    let (stuck, _queue) = never_accepts();
    let good = name_backend("good").await;
    let cluster = Cluster::of("pool", &[("stuck", stuck), ("good", good)]).key("connect_timeout = \"300ms\"");
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    // Round robin offers "stuck" first to one of the first two clients.
    for _ in 0..2 {
        assert_eq!(read_all(addr).await, "good");
    }
    let snap = server.snapshot();
    assert!(snap.clusters["pool"].node("stuck").unwrap().figures.connect_failures() >= 1);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn refused_node_is_skipped_and_no_node_closes_the_client() {
    let good = name_backend("good").await;
    let (server, addr) = ConfigText::one_service(Cluster::of("pool", &[("dead", dead_addr()), ("good", good)]))
        .start()
        .await;
    for _ in 0..4 {
        assert_eq!(read_all(addr).await, "good");
    }
    server.shutdown(PATIENCE).await;

    let (server, addr) =
        ConfigText::one_service(Cluster::of("pool", &[("dead1", dead_addr()), ("dead2", dead_addr())]))
            .start()
            .await;
    assert_eq!(
        read_all(addr).await,
        "",
        "the client is closed when no node can take it"
    );
    let snap = server.snapshot();
    assert_eq!(snap.services["svc"].figures.refused(Refusal::NoNode), 1);
    server.shutdown(PATIENCE).await;
}

/// Three consecutive ports held on 127.0.0.2 (the node side) while the
/// balancer holds the same three on 127.0.0.1. The ports lie below the
/// kernel's range for outgoing connections (32768 and up by default), which
/// busy tests can exhaust; a range is retried until both sides bind it.
async fn paired_port_range() -> (u16, Vec<std::net::TcpListener>, Server) {
    for attempt in 0..200u16 {
        let base = 25_000 + attempt * 37;
        let nodes: Vec<_> = (0..3)
            .filter_map(|i| std::net::TcpListener::bind(("127.0.0.2", base + i)).ok())
            .collect();
        if nodes.len() < 3 {
            continue;
        }
        let range = format!("127.0.0.1:{base}-{}", base + 2);
        let config = ConfigText::new()
            .service(Service::new("svc", "pool").listen(&[&range]))
            .cluster(Cluster::new("pool").node(Node::new("n", "127.0.0.2")));
        match config.try_start().await {
            Ok(server) => return (base, nodes, server),
            Err(StartError::Bind { .. }) => continue,
            Err(e) => panic!("the balancer does not start: {e}"),
        }
    }
    panic!("no three consecutive ports were free on both 127.0.0.1 and 127.0.0.2");
}

#[tokio::test]
async fn port_range_forwards_each_port_to_the_same_port_on_the_node() {
    let (base, node_listeners, server) = paired_port_range().await;
    for l in node_listeners {
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let port = s.local_addr().unwrap().port();
                let _ = s.write_all(format!("port {port}").as_bytes()).await;
            }
        });
    }
    assert_eq!(server.listen_addrs().len(), 3);
    for port in base..=base + 2 {
        assert_eq!(
            read_all(SocketAddr::from(([127, 0, 0, 1], port))).await,
            format!("port {port}")
        );
    }
    server.shutdown(PATIENCE).await;
}

/// A balancer in front of an echo node, and a client connection through it
/// that has had its first echo (so it is fully established).
async fn echoed_connection() -> (Server, SocketAddr, TcpStream) {
    let node = echo_backend().await;
    let (server, addr) = one_node(node).start().await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", open.read_exact(&mut buf)).await.unwrap();
    (server, addr, open)
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_open_connections_finish() {
    let (server, addr, mut open) = echoed_connection().await;

    let stopping = tokio::spawn(server.shutdown(PATIENCE));
    // New clients are refused once the listener is closed.
    within("listener closes", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The open connection still works, then ends normally.
    let mut buf = [0u8; 4];
    open.write_all(b"pong").await.unwrap();
    within("echo after shutdown began", open.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"pong");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF", open.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(within("shutdown", stopping).await.unwrap(), 0, "nothing had to be cut");
}

#[tokio::test]
async fn shutdown_cuts_connections_still_open_after_the_grace_period() {
    let (server, _addr, mut open) = echoed_connection().await;
    assert_eq!(within("shutdown", server.shutdown(Duration::from_millis(100))).await, 1);
    let mut rest = Vec::new();
    assert_eq!(within("cut", open.read_to_end(&mut rest)).await.unwrap(), 0);
}

/// The inodes of the sockets listening on 127.0.0.1:`port` (/proc/net/tcp),
/// and how many of this process's descriptors refer to them.
fn listening_sockets_and_descriptors(port: u16) -> (usize, usize) {
    let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[1] == local && f[3] == "0A") // 0A: LISTEN
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    let descriptors = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| inodes.iter().any(|inode| target.as_os_str() == inode.as_str()))
        .count();
    (inodes.len(), descriptors)
}

/// A balancer with `threads` workers, pinned where `pin`, over one node that
/// answers "n".
async fn start_with_workers(threads: usize, pin: bool) -> (Server, SocketAddr) {
    let node = name_backend("n").await;
    ConfigText::one_service(Cluster::of("pool", &[("n", node)]))
        .top(&format!("threads = {threads}\npin_workers = {pin}"))
        .start()
        .await
}

#[tokio::test]
async fn each_worker_accepts_from_its_own_socket_and_its_neighbours() {
    let (server, addr) = start_with_workers(3, false).await;
    assert_eq!(
        listening_sockets_and_descriptors(addr.port()),
        (3, 9),
        "one SO_REUSEPORT socket per worker, each watched by two workers, and a copy to hand over in an upgrade"
    );
    assert_eq!(read_all(addr).await, "n");
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn steered_workers_accept_only_from_their_own_sockets() {
    let cpus = protobalance::proxy::allowed_cpus();
    if cpus.len() < 2 {
        skip_or_fail("steering needs a CPU for each of two workers; this process may use one");
        return;
    }
    let (server, addr) = start_with_workers(2, true).await;
    assert_eq!(
        listening_sockets_and_descriptors(addr.port()),
        (2, 4),
        "each worker's own socket, and a copy of each to hand over in an upgrade"
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_workers_take_the_clients_that_arrive_on_their_cpu() {
    use protobalance::proxy::{allowed_cpus, pin_this_thread};
    let cpus = allowed_cpus();
    let workers = cpus.len().min(4);
    let (server, addr) = start_with_workers(workers, true).await;
    for round in 0..2 {
        for (worker, &cpu) in cpus[..workers].iter().enumerate() {
            let before = server.accepted_by_worker();
            // Served to the end, so each client has been accepted by then.
            tokio::task::spawn_blocking(move || {
                pin_this_thread(cpu).unwrap();
                for _ in 0..5 {
                    let mut answer = String::new();
                    std::io::Read::read_to_string(&mut std::net::TcpStream::connect(addr).unwrap(), &mut answer)
                        .unwrap();
                    assert_eq!(answer, "n");
                }
            })
            .await
            .unwrap();
            let added: Vec<u64> = server
                .accepted_by_worker()
                .iter()
                .zip(&before)
                .map(|(after, before)| after - before)
                .collect();
            let mut expected = vec![0; workers];
            expected[worker] = 5;
            assert_eq!(added, expected, "round {round}: 5 clients from CPU {cpu}");
        }
    }
    server.shutdown(PATIENCE).await;
}
