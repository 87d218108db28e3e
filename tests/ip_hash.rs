//! ip-hash across processes: two balancer processes started separately with
//! the same config choose the same node for each of 1,000 client addresses,
//! and a third one whose config lacks one of the 4 nodes moves only that
//! node's clients.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(30);
const CLIENTS: usize = 1_000;

/// A node that answers every connection with its name, then closes.
fn name_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = std::io::Write::write_all(&mut stream, name.as_bytes());
        }
    });
    addr
}

/// A balancer process; killed when dropped.
struct Balancer {
    child: Child,
    addr: SocketAddr,
}

impl Balancer {
    fn start(config: &std::path::Path) -> Balancer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_protobalance"))
            .args(["--log-level", "info,protobalance::access=off", "run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads stderr to the end, so the pipe never fills; hands over the
        // address from "listening on ADDR".
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.parse::<SocketAddr>());
                }
            }
        });
        let addr = rx
            .recv_timeout(TIMEOUT)
            .expect("the balancer logs its listening address")
            .expect("a socket address");
        Balancer { child, addr }
    }

    /// The node name that answers a client connecting from `source`.
    fn node_for(&self, source: Ipv4Addr) -> String {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
        socket.connect_timeout(&self.addr.into(), TIMEOUT).unwrap();
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut name = String::new();
        stream.read_to_string(&mut name).unwrap();
        name
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &tempfile::TempDir, file: &str, nodes: &[(&str, SocketAddr)]) -> std::path::PathBuf {
    let mut text = String::from(
        "state_dir = \"\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
         [[cluster]]\nname = \"c\"\nalgorithm = \"ip-hash\"\nhash_key = \"shared secret of both instances\"\n",
    );
    for (name, addr) in nodes {
        text.push_str(&format!("[[cluster.node]]\nname = \"{name}\"\naddress = \"{addr}\"\n"));
    }
    let path = dir.path().join(file);
    std::fs::write(&path, text).unwrap();
    path
}

fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1 + (i / 250) as u8, (i % 250) as u8, 1 + (i % 7) as u8)
}

#[test]
fn two_instances_agree_and_removing_a_node_moves_only_its_clients() {
    let nodes: Vec<(&str, SocketAddr)> = ["a", "b", "c", "d"].into_iter().map(|n| (n, name_backend(n))).collect();
    let dir = tempfile::tempdir().unwrap();
    let four = config(&dir, "four.toml", &nodes);
    let three = config(&dir, "three.toml", &nodes[..3]);
    let (first, second, without_d) = (Balancer::start(&four), Balancer::start(&four), Balancer::start(&three));

    let chosen: Vec<String> = (0..CLIENTS).map(|i| first.node_for(client(i))).collect();
    // The other instance is asked in reverse order: agreeing must come from
    // the client's address, not from the order of arrival.
    for i in (0..CLIENTS).rev() {
        let ip = client(i);
        assert_eq!(second.node_for(ip), chosen[i], "the instances disagree on client {ip}");
    }
    let mut per_node = std::collections::HashMap::new();
    let mut moved = 0;
    for (i, chosen) in chosen.into_iter().enumerate() {
        let ip = client(i);
        let after = without_d.node_for(ip);
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
