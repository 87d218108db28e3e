//! Client identity at the node, on real sockets: the PROXY header a node
//! gets (`send_proxy`, byte for byte, again for each fall-over candidate),
//! the header read from an upstream balancer (`accept_proxy_from`: what it
//! carries becomes the client; hostile headers close only their own
//! connection), and the source address of node connections (`source`).
//! The real servers (nginx, HAProxy) are in tests/protocols/http.rs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use common::{
    Cluster, ConfigText, Node, PATIENCE, Refusal, Service, connect_from, echo_backend, ip, random_bytes, serve,
    skip_or_fail, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a recording node saw: each connection's peer and bytes.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A node that records every connection's peer and the bytes it received
/// (until the client half-closes), then answers "ok" and closes.
async fn recording_node() -> (SocketAddr, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = serve(move |mut s| {
        let log = log.clone();
        async move {
            let peer = s.peer_addr().unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            log.lock().unwrap().push((peer, got));
            let _ = s.write_all(b"ok").await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, seen)
}

/// Sends `bytes`, half-closes, reads the answer to the end.
async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    within("an exchange through the balancer", async {
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        answer
    })
    .await
}

fn v1(client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        client.ip(),
        to.ip(),
        client.port(),
        to.port()
    )
    .into_bytes()
}

/// A v2 header written by hand (the spec's layout), with `tlvs` appended.
fn v2(client: SocketAddr, to: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(c), IpAddr::V4(t)) = (client.ip(), to.ip()) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
    h.extend_from_slice(&c.octets());
    h.extend_from_slice(&t.octets());
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&to.port().to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_puts_the_client_first_and_a_node_may_say_none() {
    let (with_v1, seen_v1) = recording_node().await;
    let (with_v2, seen_v2) = recording_node().await;
    let (without, seen_none) = recording_node().await;
    let cluster = Cluster::new("c")
        .key("send_proxy = \"v1\"")
        .node(Node::new("a", with_v1))
        .node(Node::new("b", with_v2).key("send_proxy = \"v2\""))
        .node(Node::new("n", without).key("send_proxy = \"none\""));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let payload = random_bytes(3000);
    for _ in 0..3 {
        let mut s = connect_from(ip(0, 0, 21), addr).await;
        assert_eq!(exchange(&mut s, &payload).await, b"ok");
    }
    let client_of = |seen: &Seen| seen.lock().unwrap()[0].1.clone();
    let got = client_of(&seen_v1);
    let line_end = got.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let line = String::from_utf8(got[..line_end].to_vec()).unwrap();
    assert!(
        line.starts_with("PROXY TCP4 127.0.0.21 127.0.0.1 ") && line.ends_with(&format!(" {}\r\n", addr.port())),
        "{line:?}"
    );
    assert_eq!(
        &got[line_end..],
        &payload[..],
        "the client's bytes follow the header unchanged"
    );
    let got = client_of(&seen_v2);
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
    assert_eq!(&got[16..20], &[127, 0, 0, 21], "the client's address in the v2 header");
    assert_eq!(&got[28..], &payload[..]);
    assert_eq!(
        client_of(&seen_none),
        payload,
        "send_proxy = \"none\" on the node: no header"
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fall_over_candidate_gets_a_fresh_header_and_the_same_bytes() {
    // `first` takes the header and the request, then closes without a word.
    let first_got = Arc::new(Mutex::new(Vec::new()));
    let log = first_got.clone();
    let first = serve(move |mut s| {
        let log = log.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            // The header and the 500 request bytes, then hang up.
            while got.len() < 500 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            log.lock().unwrap().push(got);
        }
    })
    .await;
    // `second` answers once it has the header line and the 500 bytes.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let second = serve(move |mut s| {
        let log = log.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            let complete = |got: &[u8]| {
                got.windows(2)
                    .position(|w| w == b"\r\n")
                    .is_some_and(|end| got.len() >= end + 2 + 500)
            };
            while !complete(&got) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            log.lock().unwrap().push(got);
            let _ = s.write_all(b"ok").await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let cluster = Cluster::new("c")
        .key("send_proxy = \"v1\"")
        .node(Node::new("first", first).fallover("second"))
        .node(Node::new("second", second));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let request = random_bytes(500);
    let mut s = connect_from(ip(0, 0, 22), addr).await;
    let client = s.local_addr().unwrap();
    s.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    within("the answer of the fall-over node", s.read_to_end(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, b"ok");
    drop(s);
    let mut expected = v1(client, addr);
    expected.extend_from_slice(&request);
    assert_eq!(
        first_got.lock().unwrap()[0],
        expected,
        "the first node got header + request"
    );
    assert_eq!(
        seen.lock().unwrap()[0],
        expected,
        "the fall-over node got the same, byte for byte"
    );
    server.shutdown(PATIENCE).await;
}

/// A service whose clients from 127.0.0.0/8 are upstream balancers, in
/// front of an echo node; `deny` refuses one carried address.
async fn behind_upstream(extra: &str) -> (common::Server, SocketAddr) {
    let echo = echo_backend().await;
    ConfigText::new()
        .service(
            Service::new("svc", "c")
                .key("accept_proxy_from = [\"127.0.0.0/8\"]")
                .key("accept_proxy_timeout = \"500ms\"")
                .key("deny = [\"192.0.2.66\"]")
                .key(extra),
        )
        .cluster(Cluster::new("c").node(Node::new("echo", echo)))
        .start()
        .await
}

/// Whether the balancer closed `s` without passing anything on.
async fn closed_unanswered(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(within("the balancer's close", s.read(&mut buf)).await, Ok(0) | Err(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_header_becomes_the_client_however_it_is_split() {
    let (server, addr) = behind_upstream("").await;
    let carried = "198.51.100.7:5555".parse().unwrap();
    let to = "203.0.113.1:443".parse().unwrap();
    let tlvs = [0x04, 0x00, 0x03, b'a', b'b', b'c']; // a NOOP TLV, skipped
    for header in [v1(carried, to), v2(carried, to, &[]), v2(carried, to, &tlvs)] {
        let mut s = connect_from(ip(0, 0, 30), addr).await;
        // One byte at a time, then the payload in the same write as the last byte.
        for b in &header[..header.len() - 1] {
            s.write_all(&[*b]).await.unwrap();
            s.flush().await.unwrap();
        }
        let mut last = vec![*header.last().unwrap()];
        last.extend_from_slice(b"hello after the header");
        assert_eq!(exchange(&mut s, &last).await, b"hello after the header");
    }
    let figures = server.snapshot().clusters["c"].node("echo").unwrap().figures.clone();
    assert_eq!(figures.total_connections(), 3);
    // The carried address is the client's for the access lists: denied.
    let mut s = connect_from(ip(0, 0, 31), addr).await;
    s.write_all(&v1("192.0.2.66:1".parse().unwrap(), to)).await.unwrap();
    assert!(closed_unanswered(&mut s).await, "deny applies to the carried address");
    let refused = server.snapshot().services["svc"].figures.clone();
    assert_eq!(refused.refused(Refusal::Denied), 1);
    // LOCAL (v2): the upstream's own connection, served as itself.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    local.extend_from_slice(b"ping");
    let mut s = connect_from(ip(0, 0, 32), addr).await;
    assert_eq!(exchange(&mut s, &local).await, b"ping");
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_close_their_own_connection_only() {
    let (server, addr) = behind_upstream("").await;
    let to = "203.0.113.1:443".parse().unwrap();
    let good = v2("198.51.100.7:5555".parse().unwrap(), to, &[]);
    let mut hostile: Vec<(String, Vec<u8>)> = vec![
        ("no header at all".into(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "a v1 line that never ends".into(),
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
        ),
        (
            "a v1 header with a bad address".into(),
            b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n".to_vec(),
        ),
        ("100 KB of v2 TLVs".into(), {
            let mut h = good[..14].to_vec();
            h.extend_from_slice(&u16::MAX.to_be_bytes());
            h.extend_from_slice(&vec![0u8; 100 * 1024]);
            h
        }),
        (
            "a v2 version nobody has".into(),
            [&good[..12], &[0x31, 0x11, 0, 12], &good[16..]].concat(),
        ),
        (
            "a v2 length shorter than its addresses".into(),
            [&good[..14], &[0, 4], &good[16..20]].concat(),
        ),
        ("random bytes".into(), random_bytes(300)),
    ];
    for cut in [1, 5, 12, 15, 20] {
        hostile.push((format!("a v2 header cut after {cut} bytes"), good[..cut].to_vec()));
    }
    for (what, bytes) in &hostile {
        let mut s = connect_from(ip(0, 0, 40), addr).await;
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await; // also what a truncated header ends with
        assert!(closed_unanswered(&mut s).await, "{what}: closed, nothing passed on");
    }
    // Silence: closed once accept_proxy_timeout has passed.
    let mut s = connect_from(ip(0, 0, 41), addr).await;
    assert!(closed_unanswered(&mut s).await, "a header that never comes");
    // Other clients are served meanwhile and after.
    let mut s = connect_from(ip(0, 0, 42), addr).await;
    assert_eq!(
        exchange(&mut s, &[good.as_slice(), b"still served"].concat()).await,
        b"still served"
    );
    let figures = server.snapshot().services["svc"].figures.clone();
    assert_eq!(figures.refused(Refusal::ProxyHeader), hostile.len() as u64 + 1);
    let node = server.snapshot().clusters["c"].node("echo").unwrap().figures.clone();
    assert_eq!(node.total_connections(), 1, "no hostile connection reached the node");
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_from_other_networks_are_never_parsed() {
    let echo = echo_backend().await;
    let (server, addr) = ConfigText::new()
        .service(Service::new("svc", "c").key("accept_proxy_from = [\"127.0.0.200/32\"]"))
        .cluster(Cluster::new("c").node(Node::new("echo", echo)))
        .start()
        .await;
    let header = v1("198.51.100.7:5555".parse().unwrap(), addr);
    let bytes = [header.as_slice(), b"rest"].concat();
    let mut s = connect_from(ip(0, 0, 50), addr).await;
    assert_eq!(
        exchange(&mut s, &bytes).await,
        bytes,
        "passed unchanged, header and all"
    );
    server.shutdown(PATIENCE).await;
}

/// Whether this process may bind transparently (root with CAP_NET_ADMIN).
fn may_be_transparent() -> bool {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_ip_transparent_v4(true).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_binds_node_connections_to_a_fixed_or_the_clients_address() {
    let (fixed, seen_fixed) = recording_node().await;
    let cluster = Cluster::new("c")
        .key("source = \"127.0.0.9\"")
        .node(Node::new("n", fixed));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    let mut s = connect_from(ip(0, 0, 60), addr).await;
    assert_eq!(exchange(&mut s, b"x").await, b"ok");
    assert_eq!(seen_fixed.lock().unwrap()[0].0.ip(), ip(0, 0, 9));
    server.shutdown(PATIENCE).await;

    if !may_be_transparent() {
        return skip_or_fail("source = \"client\" needs CAP_NET_ADMIN: run as root (as scripts/test does in CI)");
    }
    // On loopback every 127/8 address is local, so no routing is needed for
    // the replies: the node sees the client's own address.
    let (node, seen) = recording_node().await;
    let cluster = Cluster::new("c").key("source = \"client\"").node(Node::new("n", node));
    let (server, addr) = ConfigText::one_service(cluster).start().await;
    for last in [61, 62] {
        let mut s = connect_from(ip(0, 0, last), addr).await;
        assert_eq!(exchange(&mut s, b"x").await, b"ok");
    }
    let peers: Vec<IpAddr> = seen.lock().unwrap().iter().map(|(p, _)| p.ip()).collect();
    assert_eq!(peers, [ip(0, 0, 61), ip(0, 0, 62)]);
    server.shutdown(PATIENCE).await;
}

/// Three network namespaces (client, balancer, node) joined by veth pairs,
/// with the node's default route via the balancer and, in the balancer's,
/// the policy routing of docs/deployments.md "Transparent source". Gone
/// (with their links) when dropped.
struct Namespaces(String);

const NAMESPACES: &str = r#"
set -e
P=$1
for n in cl lb nd; do ip netns add $P-$n; ip -n $P-$n link set lo up; done
ip link add $P-c0 netns $P-cl type veth peer name $P-c1 netns $P-lb
ip link add $P-n0 netns $P-nd type veth peer name $P-n1 netns $P-lb
ip -n $P-cl addr add 10.71.1.2/24 dev $P-c0; ip -n $P-cl link set $P-c0 up
ip -n $P-lb addr add 10.71.1.1/24 dev $P-c1; ip -n $P-lb link set $P-c1 up
ip -n $P-lb addr add 10.71.2.1/24 dev $P-n1; ip -n $P-lb link set $P-n1 up
ip -n $P-nd addr add 10.71.2.2/24 dev $P-n0; ip -n $P-nd link set $P-n0 up
ip -n $P-cl route add default via 10.71.1.1
ip -n $P-nd route add default via 10.71.2.1
ip netns exec $P-lb sysctl -q -w net.ipv4.ip_forward=1
ip netns exec $P-lb iptables -t mangle -N DIVERT
ip netns exec $P-lb iptables -t mangle -A PREROUTING -p tcp -m socket --transparent -j DIVERT
ip netns exec $P-lb iptables -t mangle -A DIVERT -j MARK --set-mark 1
ip netns exec $P-lb iptables -t mangle -A DIVERT -j ACCEPT
ip -n $P-lb rule add fwmark 1 lookup 100
ip -n $P-lb route add local 0.0.0.0/0 dev lo table 100
"#;

impl Namespaces {
    /// `None` (with the reason) where this machine cannot make them.
    fn create() -> Result<Namespaces, String> {
        let prefix = format!("pb{}", std::process::id());
        let ns = Namespaces(prefix.clone());
        let out = std::process::Command::new("sh")
            .args(["-c", NAMESPACES, "sh", &prefix])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(ns)
    }

    fn exec(&self, ns: &str) -> std::process::Command {
        let mut c = std::process::Command::new(common::tool("ip"));
        c.args(["netns", "exec", &format!("{}-{ns}", self.0)]);
        c
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in ["cl", "lb", "nd"] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &format!("{}-{n}", self.0)])
                .status();
        }
    }
}

#[test]
fn a_transparent_source_shows_the_client_to_a_node_on_another_network() {
    if !common::require_tools(&["ip", "iptables", "python3"]) {
        return;
    }
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(why) => return common::skip_counted(&format!("cannot create network namespaces here: {why}")),
    };
    // The node answers each connection with the address it came from.
    let mut node = ns.exec("nd");
    node.args([
        "python3",
        "-c",
        "import socket\ns=socket.create_server(('10.71.2.2',7000))\nprint('ready',flush=True)\n\
         while True:\n c,a=s.accept(); c.sendall(a[0].encode()); c.close()",
    ]);
    let node = common::Running::start(node);
    node.wait_for("ready");
    let config = ConfigText::new()
        .service(Service::new("s", "c").listen(&["10.71.1.1:7000"]))
        .cluster(
            Cluster::new("c")
                .key("source = \"client\"")
                .node(Node::new("n", "10.71.2.2:7000")),
        );
    let file = config.file();
    let mut balancer = ns.exec("lb");
    balancer.arg(common::BIN).arg("run").arg("--config").arg(file.path());
    let balancer = common::Running::start(balancer);
    balancer.ready();
    let client = ns
        .exec("cl")
        .args([
            "python3",
            "-c",
            "import socket\ns=socket.create_connection(('10.71.1.1',7000),timeout=10)\nprint(s.recv(100).decode())",
        ])
        .output()
        .unwrap();
    assert!(client.status.success(), "{}", String::from_utf8_lossy(&client.stderr));
    assert_eq!(
        String::from_utf8_lossy(&client.stdout).trim(),
        "10.71.1.2",
        "the node's peer is the client in the client's namespace"
    );
    drop((balancer, node));

    // A node the balancer has no route to: `check` says so.
    let unroutable = ConfigText::new()
        .service(Service::new("s", "c").listen(&["10.71.1.1:7001"]))
        .cluster(
            Cluster::new("c")
                .key("source = \"client\"")
                .node(Node::new("far", "10.99.0.1:7000")),
        );
    let file = unroutable.file();
    let out = ns
        .exec("lb")
        .arg(common::BIN)
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("node \"far\": no route from the balancer to 10.99.0.1"),
        "{said}"
    );
}

#[test]
fn check_refuses_bad_identity_keys_with_key_and_line() {
    let base = |cluster_key: &str, service_key: &str| {
        format!(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n{service_key}\n\
             [[cluster]]\nname = \"c\"\n{cluster_key}\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n"
        )
    };
    for (cluster_key, service_key, needle, line) in [
        (
            "send_proxy = \"v3\"",
            "",
            "send_proxy = \"v3\": expected \"v1\", \"v2\" or \"none\"",
            8,
        ),
        (
            "source = \"somewhere\"",
            "",
            "source = \"somewhere\": expected \"client\"",
            8,
        ),
        (
            "",
            "accept_proxy_from = [\"10.0.0.0/33\"]",
            "accept_proxy_from = \"10.0.0.0/33\"",
            5,
        ),
        ("", "accept_proxy_timeout = \"0s\"", "accept_proxy_timeout = \"0s\"", 5),
    ] {
        let e = common::config_error(&base(cluster_key, service_key));
        assert!(e.contains(needle) && e.contains(&format!(":{line}:")), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_of_a_v2_node_says_the_connection_is_the_balancers_own() {
    let (node, seen) = recording_node().await;
    let cluster = Cluster::new("c")
        .key("send_proxy = \"v2\"")
        .key("retry_interval = \"50ms\"")
        .node(Node::new("n", node));
    let (server, _) = ConfigText::one_service(cluster).start().await;
    let figures = server.snapshot().clusters["c"].node("n").unwrap().figures.clone();
    figures.mark_available(false);
    common::wait_until("the probe has been and gone", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        seen.lock().unwrap()[0].1,
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00",
        "a v2 LOCAL header, nothing else"
    );
    assert!(figures.is_available());
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mutations_of_headers_are_served_or_closed_never_more() {
    use rand::RngExt;
    let (server, addr) = behind_upstream("").await;
    let to = "203.0.113.1:443".parse().unwrap();
    let from = "198.51.100.7:5555".parse().unwrap();
    let valid = [v1(from, to), v2(from, to, &[]), v2(from, to, &[0x04, 0, 2, 9, 9])];
    const TRIES: u64 = 150;
    for n in 0..TRIES {
        let (mut header, cut, flips, chunk) = {
            let mut rng = rand::rng();
            let header = valid[rng.random_range(0..valid.len())].clone();
            let cut = rng.random_range(1..=header.len());
            (header, cut, rng.random_range(0..3), rng.random_range(1..8))
        };
        for _ in 0..flips {
            let i = rand::rng().random_range(0..header.len());
            header[i] = rand::rng().random();
        }
        header.truncate(cut);
        let mut s = connect_from(ip(0, 1, (n % 200) as u8 + 1), addr).await;
        for piece in header.chunks(chunk) {
            if s.write_all(piece).await.is_err() {
                break;
            }
        }
        let _ = s.write_all(b"payload").await;
        let _ = s.shutdown().await;
        let mut answer = Vec::new();
        let _ = within("the balancer's answer or close", s.read_to_end(&mut answer)).await;
        // Served: the node echoed exactly what followed the header (a suffix
        // of what was sent, shorter by the header); else nothing came back.
        let sent = [header.as_slice(), b"payload"].concat();
        assert!(
            answer.is_empty() || (answer.len() < sent.len() && sent.ends_with(&answer)),
            "{header:?} -> {answer:?}"
        );
    }
    let figures = server.snapshot().services["svc"].figures.clone();
    let refused: u64 = Refusal::ALL.iter().map(|r| figures.refused(*r)).sum();
    wait_until_all_done(&figures).await;
    assert_eq!(
        figures.accepted() + refused,
        TRIES,
        "each connection served or refused, once"
    );
    let mut s = connect_from(ip(0, 0, 43), addr).await;
    assert_eq!(exchange(&mut s, &[valid[1].as_slice(), b"ok"].concat()).await, b"ok");
    server.shutdown(PATIENCE).await;
}

async fn wait_until_all_done(figures: &std::sync::Arc<protobalance::model::ServiceFigures>) {
    common::wait_until("every connection is over", || async {
        figures.active_connections() == 0
    })
    .await;
}
