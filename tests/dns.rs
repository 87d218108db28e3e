//! Nodes that follow DNS (`resolve_interval`, `resolver`): a real dnsmasq
//! (Debian's) on a loopback port, answering from a hosts file the test
//! rewrites; a node's name moves from 127.0.0.2 to 127.0.0.3 and new
//! connections follow while an open one stays; the DNS server stopped, the
//! last good address keeps serving.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child process killed when dropped, also when a test panics.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq in the foreground on 127.0.0.1:`port`, answering only from `hosts`.
fn dnsmasq(port: u16, hosts: &std::path::Path) -> Killed {
    let child = Command::new(tool("dnsmasq"))
        .args([
            "--keep-in-foreground",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .args([
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--local-ttl=0",
            "--pid-file=",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .stdout(Stdio::null())
        // Its complaints (a port taken, a file unread) show in the test's output.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dnsmasq starts");
    Killed(child)
}

/// The first line a new client through `addr` reads: its node's greeting.
async fn greeting(addr: SocketAddr) -> String {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut line = String::new();
    within("a greeting", tokio::io::BufReader::new(stream).read_line(&mut line))
        .await
        .unwrap();
    line.trim_end().to_string()
}

/// A port nobody uses now on 127.0.0.1, for UDP and TCP both (dnsmasq binds both).
fn free_dns_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// dnsmasq on a free port, answering from `hosts`; another port when the
/// one chosen was taken meanwhile (dnsmasq then exits at once).
async fn dnsmasq_answering(hosts: &std::path::Path) -> (Killed, SocketAddr) {
    for _ in 0..10 {
        let port = free_dns_port();
        let mut dns = dnsmasq(port, hosts);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let answered = within("dnsmasq to answer or exit", async {
            loop {
                if dns.0.try_wait().unwrap().is_some() {
                    return false;
                }
                let found = protobalance::config::lookup_at(addr, "node.test", Duration::from_millis(200)).await;
                if found.is_ok_and(|ips| !ips.is_empty()) {
                    return true;
                }
            }
        })
        .await;
        if answered {
            return (dns, addr);
        }
    }
    panic!("dnsmasq did not start on a free port in 10 tries");
}

/// A TCP port free on both 127.0.0.2 and 127.0.0.3.
fn port_free_on_both() -> u16 {
    for _ in 0..50 {
        let port = fastrand::u16(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.3", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no port free on 127.0.0.2 and 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_follows_its_name_to_a_new_address_and_keeps_the_last_when_dns_stops() {
    if !require_tools(&["dnsmasq"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.2 node.test\n").unwrap();
    let (dns, dns_addr) = dnsmasq_answering(&hosts).await;

    let port = port_free_on_both();
    let _two = Backend::start_on("two", Behaviour::Greet, SocketAddr::from(([127, 0, 0, 2], port))).await;
    let _three = Backend::start_on("three", Behaviour::Greet, SocketAddr::from(([127, 0, 0, 3], port))).await;
    let interval = Duration::from_millis(200);
    let config = ConfigText::one_service(
        Cluster::new("c")
            .key(&format!("resolve_interval = \"{}ms\"", interval.as_millis()))
            .node(Node::new("n", format!("node.test:{port}"))),
    )
    .top(&format!("resolver = \"{dns_addr}\""));
    let (server, addr) = config.start().await;
    // Resolved at load through the resolver: 127.0.0.2.
    let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut first = vec![0u8; 9];
    within("the node's greeting", open.read_exact(&mut first))
        .await
        .unwrap();
    assert_eq!(&first, b"220 two\r\n");

    std::fs::write(&hosts, "127.0.0.3 node.test\n").unwrap();
    // dnsmasq reads its hosts files again on SIGHUP.
    // SAFETY: kill with a child's own pid and a valid signal.
    unsafe { libc::kill(dns.0.id() as i32, libc::SIGHUP) };
    let moved = Instant::now();
    wait_until("new connections to follow the name", || async {
        greeting(addr).await == "220 three"
    })
    .await;
    // The reload of dnsmasq plus one interval, and a margin for a loaded machine.
    assert!(
        moved.elapsed() < interval * 2 + Duration::from_secs(3),
        "{:?}",
        moved.elapsed()
    );
    // The connection opened before stays where it is.
    open.write_all(b"more\n").await.unwrap();
    let mut echo = vec![0u8; 5];
    within("the open connection's echo", open.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"more\n");

    // The DNS server stops: the last good address keeps serving.
    drop(dns);
    let node = server.snapshot().clusters["c"].node("n").unwrap().figures.clone();
    let total = node.total_connections();
    tokio::time::sleep(interval * 3).await;
    for _ in 0..3 {
        assert_eq!(greeting(addr).await, "220 three");
    }
    assert_eq!(node.total_connections(), total + 3, "the node's figures carried over");
    drop(open);
    server.shutdown(PATIENCE).await;
}

#[test]
fn check_refuses_a_resolver_that_is_not_an_address() {
    let e = config_error(
        "resolver = \"dns.example\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\nresolve_interval = \"0s\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
    );
    assert!(e.contains(":1: resolver = \"dns.example\": expected IP:PORT"), "{e}");
    let e = config_error(
        "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\nresolve_interval = \"0s\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n",
    );
    assert!(
        e.contains(":7: cluster \"c\": resolve_interval = \"0s\": must be above zero"),
        "{e}"
    );
}
