//! Admission and limits through real sockets: per-service, global and
//! per-client connection limits, allow/deny lists (IPv4 and IPv6), and the
//! idle timeout.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Service `svc` on `listen` with `service_keys`, in front of one node.
fn service_config(node: SocketAddr, listen: &str, service_keys: &str) -> ConfigText {
    ConfigText::new()
        .service(Service::new("svc", "pool").listen(&[listen]).key(service_keys))
        .cluster(Cluster::of("pool", &[("a", node)]))
}

/// Connects from `source` (any port) and reads the greeting: `Some(stream)`
/// when admitted, `None` when the balancer closed the connection at once.
async fn try_client(addr: SocketAddr, source: &str) -> Option<TcpStream> {
    within("client", async {
        let mut s = connect_from(source.parse().unwrap(), addr).await;
        let mut greeting = [0u8; 2];
        match s.read_exact(&mut greeting).await {
            Ok(_) => {
                assert_eq!(&greeting, b"hi");
                Some(s)
            }
            Err(_) => None,
        }
    })
    .await
}

/// Retries until a client is admitted: a slot frees once the balancer has
/// finished the connection that held it, which nothing outside it signals.
async fn admitted_eventually(addr: SocketAddr, source: &str) -> TcpStream {
    wait_for("a slot to free", || try_client(addr, source)).await
}

fn refused(server: &Server, reason: Refusal) -> u64 {
    server.snapshot().services["svc"].figures.refused(reason)
}

#[tokio::test]
async fn service_max_connections() {
    let node = holding_backend().await;
    let (server, addr) = service_config(node, "127.0.0.1:0", "max_connections = 2").start().await;
    let first = try_client(addr, "127.0.0.1").await.expect("first admitted");
    let _second = try_client(addr, "127.0.0.1").await.expect("second admitted");
    assert!(try_client(addr, "127.0.0.1").await.is_none(), "third refused");
    assert_eq!(refused(&server, Refusal::MaxConnections), 1);
    drop(first);
    let _again = admitted_eventually(addr, "127.0.0.1").await;
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn global_max_connections_spans_services() {
    let node = holding_backend().await;
    let (server, svc) = ConfigText::new()
        .top("max_connections = 2")
        .service(Service::new("svc", "pool"))
        .service(Service::new("other", "pool"))
        .cluster(Cluster::of("pool", &[("a", node)]))
        .start()
        .await;
    let other = server.addr_of("other").unwrap();
    let _a = try_client(svc, "127.0.0.1").await.expect("admitted");
    let _b = try_client(other, "127.0.0.1").await.expect("admitted");
    assert!(try_client(svc, "127.0.0.1").await.is_none());
    assert!(try_client(other, "127.0.0.1").await.is_none());
    assert_eq!(refused(&server, Refusal::GlobalMaxConnections), 1);
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn max_connections_per_client_ip() {
    let node = holding_backend().await;
    let (server, addr) = service_config(node, "127.0.0.1:0", "max_connections_per_client = 1")
        .start()
        .await;
    let first = try_client(addr, "127.0.0.1").await.expect("admitted");
    assert!(
        try_client(addr, "127.0.0.1").await.is_none(),
        "a second from the same IP is refused"
    );
    let _other_ip = try_client(addr, "127.0.0.2").await.expect("another IP is admitted");
    assert_eq!(refused(&server, Refusal::MaxConnectionsPerClient), 1);
    drop(first);
    let _again = admitted_eventually(addr, "127.0.0.1").await;
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn allow_and_deny_lists_ipv4() {
    let node = holding_backend().await;
    let keys = "allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.3\", \"127.0.9.0/24\"]";
    let (server, addr) = service_config(node, "127.0.0.1:0", keys).start().await;
    assert!(try_client(addr, "127.0.0.2").await.is_some());
    assert!(try_client(addr, "127.0.0.3").await.is_none());
    assert!(try_client(addr, "127.0.9.77").await.is_none());
    assert_eq!(refused(&server, Refusal::Denied), 2);
    server.shutdown(Duration::ZERO).await;

    let (server, addr) = service_config(node, "127.0.0.1:0", "allow = [\"127.0.0.2/32\"]")
        .start()
        .await;
    assert!(try_client(addr, "127.0.0.1").await.is_none(), "outside allow");
    assert!(try_client(addr, "127.0.0.2").await.is_some(), "inside allow");
    assert_eq!(refused(&server, Refusal::Denied), 1);
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn allow_and_deny_lists_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip_or_fail("this machine has no IPv6 loopback (::1)");
        return;
    }
    let node = holding_backend().await;
    let (server, addr) = service_config(node, "[::1]:0", "allow = [\"::1/128\"]").start().await;
    assert!(try_client(addr, "::1").await.is_some());
    server.shutdown(Duration::ZERO).await;
    let (server, addr) = service_config(node, "[::1]:0", "deny = [\"::/0\"]").start().await;
    assert!(try_client(addr, "::1").await.is_none());
    assert_eq!(refused(&server, Refusal::Denied), 1);
    server.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn idle_timeout_closes_silent_connections_only() {
    let node = holding_backend().await;
    let (server, addr) = service_config(node, "127.0.0.1:0", "idle_timeout = \"1s\"")
        .start()
        .await;

    // One client stays busy, a byte every 100 ms for 3 s: never idle for 1 s.
    let busy = tokio::spawn(async move {
        let mut s = try_client(addr, "127.0.0.1").await.expect("admitted");
        for _ in 0..30 {
            s.write_all(b".").await.expect("the busy connection stays open");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    });
    // Another says nothing: the balancer closes it.
    let mut silent = try_client(addr, "127.0.0.1").await.expect("admitted");
    let mut rest = Vec::new();
    assert_eq!(within("idle close", silent.read_to_end(&mut rest)).await.unwrap(), 0);

    let mut s = within("busy client", busy).await.unwrap();
    s.write_all(b"still here").await.unwrap();
    server.shutdown(Duration::ZERO).await;
}

/// The kernel's view of a socket: its two addresses and its buffer sizes
/// (SO_RCVBUF, SO_SNDBUF).
struct SocketView {
    local: SocketAddr,
    peer: SocketAddr,
    recv_buffer: usize,
    send_buffer: usize,
}

/// Every connected TCP socket this process holds. The balancer runs in this
/// process, so its sockets are among them.
fn own_sockets() -> Vec<SocketView> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: only read through, for the duration of this iteration. Another
        // test may close and reuse the number meanwhile: then the calls fail
        // or describe another socket, and the addresses below tell them apart.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let view = (|| {
            Some(SocketView {
                local: socket.local_addr().ok()?.as_socket()?,
                peer: socket.peer_addr().ok()?.as_socket()?,
                recv_buffer: socket.recv_buffer_size().ok()?,
                send_buffer: socket.send_buffer_size().ok()?,
            })
        })();
        found.extend(view);
    }
    found
}

/// `socket_buffer` sizes both buffers of the client's socket (the service's
/// value) and of the socket to the node (the cluster's). Linux reports twice
/// the size set (its bookkeeping share), so the sizes are chosen to match no
/// kernel default.
#[tokio::test]
async fn socket_buffer_sizes_the_sockets_of_each_side() {
    let node = echo_backend().await;
    let (server, addr) = ConfigText::new()
        .service(Service::new("svc", "pool").key("socket_buffer = \"40k\""))
        .cluster(Cluster::of("pool", &[("a", node)]).key("socket_buffer = \"72k\""))
        .start()
        .await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut echoed = [0u8; 4];
    client.write_all(b"ping").await.unwrap();
    within("the first echo", client.read_exact(&mut echoed)).await.unwrap();
    let client_addr = client.local_addr().unwrap();

    let sockets = own_sockets();
    let client_side = sockets
        .iter()
        .find(|s| s.local == addr && s.peer == client_addr)
        .expect("the balancer's socket to the client");
    assert_eq!(
        (client_side.recv_buffer, client_side.send_buffer),
        (2 * 40 * 1024, 2 * 40 * 1024),
        "the client's socket"
    );
    let node_side: Vec<_> = sockets.iter().filter(|s| s.peer == node).collect();
    assert_eq!(node_side.len(), 1, "one connection to the node");
    assert_eq!(
        (node_side[0].recv_buffer, node_side[0].send_buffer),
        (2 * 72 * 1024, 2 * 72 * 1024),
        "the node's socket"
    );

    // Through the small buffers, 4 MiB still come back byte for byte.
    let payload = random_bytes(4 << 20);
    let (mut read, mut write) = client.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    within("the echo of 4 MiB", read.read_to_end(&mut back)).await.unwrap();
    writer.await.unwrap();
    assert!(back == payload, "{} bytes came back, not the 4 MiB sent", back.len());
    server.shutdown(Duration::ZERO).await;
}

#[test]
fn limit_keys_are_validated() {
    let bad = [
        ("max_connections = 0", "must be 1 or more"),
        ("max_connections_per_client = -2", "must be 1 or more"),
        ("idle_timeout = \"0s\"", "above zero"),
        ("idle_timeout = \"soon\"", "idle_timeout"),
        ("allow = [\"10.0.0.0/33\"]", "expected an address or a network"),
        ("deny = [\"example.com\"]", "expected an address or a network"),
        ("socket_buffer = \"2k\"", "must be 4k to 64m"),
        ("socket_buffer = \"big\"", "expected a whole number of bytes"),
    ];
    for (keys, expected) in bad {
        let text = service_config(dead_addr(), "127.0.0.1:0", keys).text();
        let line = 1 + text.lines().position(|l| l == keys).unwrap();
        let err = config_error(&text);
        assert!(
            err.contains(expected) && err.contains(&format!(":{line}:")),
            "{keys} (line {line}): {err}"
        );
    }
    let global = config_error("max_connections = 0\n");
    assert!(global.contains("test config:1: max_connections = 0"), "{global}");
}
