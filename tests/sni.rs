//! Routing by the ClientHello's server name with real sockets, at the edges
//! curl never reaches: a ClientHello sent one byte at a time, a plain-text
//! client on the TLS port, and hostile ClientHellos (truncated, lying
//! lengths, a hundred extensions, random bytes after a record header) that
//! must route or close cleanly while a good client carries on. The nginx
//! end-to-end test is tests/protocols/tls.rs.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A backend that reads `expect.len()` bytes, then answers its name and
/// whether they were exactly `expect`.
async fn checking_backend(name: &'static str, expect: Vec<u8>) -> SocketAddr {
    let expect = std::sync::Arc::new(expect);
    serve(move |mut s| {
        let expect = expect.clone();
        async move {
            let mut got = vec![0u8; expect.len()];
            let verdict = match s.read_exact(&mut got).await {
                Ok(_) if got == *expect => "same",
                Ok(_) => "changed",
                Err(_) => "short",
            };
            let _ = s.write_all(format!("{name} {verdict}").as_bytes()).await;
        }
    })
    .await
}

fn routed(a: SocketAddr, fallback: SocketAddr) -> ConfigText {
    ConfigText::new()
        .service(Service::new("tls", "default").key("[[service.route]]\nsni = [\"a.test\"]\ncluster = \"a\""))
        .cluster(Cluster::new("a").node(Node::new("a", a)))
        .cluster(Cluster::new("default").node(Node::new("d", fallback)))
}

async fn answer(mut s: TcpStream) -> String {
    let mut out = String::new();
    within("the answer", s.read_to_string(&mut out)).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_one_byte_at_a_time_is_routed_and_reaches_the_node_unchanged() {
    let hello = client_hello(Some("a.test"), 3);
    let a = checking_backend("a", hello.clone()).await;
    let d = checking_backend("default", hello.clone()).await;
    let (server, addr) = routed(a, d).start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for byte in &hello {
        s.write_all(std::slice::from_ref(byte)).await.unwrap();
        // Paced, so that the bytes arrive as segments of their own.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(answer(s).await, "a same");
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_and_unnamed_clients_go_to_the_services_cluster_unchanged() {
    let text = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec();
    let a = checking_backend("a", text.clone()).await;
    let d = checking_backend("default", text.clone()).await;
    let (server, addr) = routed(a, d).start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&text).await.unwrap();
    assert_eq!(answer(s).await, "default same");
    server.shutdown(PATIENCE).await;

    let unnamed = client_hello(None, 0);
    let other = client_hello(Some("b.test"), 0);
    for (hello, to) in [(unnamed, "default"), (other, "default")] {
        let a = checking_backend("a", hello.clone()).await;
        let d = checking_backend("default", hello.clone()).await;
        let (server, addr) = routed(a, d).start().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        assert_eq!(answer(s).await, format!("{to} same"));
        server.shutdown(PATIENCE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_client_hellos_route_or_close_and_a_good_client_carries_on() {
    let good = client_hello(Some("a.test"), 100);
    let a = checking_backend("a", good.clone()).await;
    // The default node just drains and closes: hostile bytes end there.
    let d = serve(|mut s| async move {
        let mut sink = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut sink)).await;
    })
    .await;
    let (server, addr) = routed(a, d).start().await;
    let mut rng = fastrand::Rng::with_seed(0x5e1_7e57);
    let mut hostile = Vec::new();
    let base = client_hello(Some("a.test"), 2);
    for i in 0..300 {
        let mut bytes = match i % 4 {
            // Truncated.
            0 => base[..rng.usize(0..base.len())].to_vec(),
            // A length somewhere made to lie.
            1 => {
                let mut b = base.clone();
                let at = rng.usize(3..b.len());
                b[at] = rng.u8(..);
                b
            }
            // Random bytes after a record header.
            2 => {
                let mut b = vec![22, 3, 1, rng.u8(..), rng.u8(..)];
                b.extend((0..rng.usize(0..2000)).map(|_| rng.u8(..)));
                b
            }
            // A hundred extensions and an oversized name.
            _ => client_hello(Some(&"x".repeat(rng.usize(200..300))), 100),
        };
        bytes.truncate(20_000);
        hostile.push(bytes);
    }
    let attacks = hostile.into_iter().map(|bytes| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            // Routed or closed, within the hello timeout: never left hanging.
            within("a hostile client's end", s.read_to_end(&mut sink)).await.ok();
        })
    });
    let attacks: Vec<_> = attacks.collect();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&good).await.unwrap();
        assert_eq!(answer(s).await, "a same", "the good client is routed as ever");
    }
    for attack in attacks {
        attack.await.unwrap();
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&good).await.unwrap();
    assert_eq!(answer(s).await, "a same", "and after them");
    server.shutdown(PATIENCE).await;
}

#[test]
fn check_refuses_duplicate_names_bad_wildcards_and_unknown_clusters_with_the_line() {
    let text = |routes: &str| {
        format!(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n{routes}\n\
             [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n"
        )
    };
    for (routes, line, says) in [
        (
            "[[service.route]]\nsni = [\"a.test\"]\ncluster = \"c\"\n[[service.route]]\nsni = [\"A.test\"]\ncluster = \"c\"",
            9,
            "this name is in another route already",
        ),
        (
            "[[service.route]]\nsni = [\"a.*.test\"]\ncluster = \"c\"",
            6,
            "only \"*.\" at the start",
        ),
        (
            "[[service.route]]\nsni = [\"*.test\"]\ncluster = \"c\"",
            6,
            "at least two labels",
        ),
        (
            "[[service.route]]\nsni = [\"a.test\"]\ncluster = \"nope\"",
            7,
            "no [[cluster]] has this name",
        ),
        (
            "[[service.route]]\nsni = []\ncluster = \"c\"",
            6,
            "needs at least one name",
        ),
    ] {
        let e = parse_offline(&text(routes), "t.toml").unwrap_err();
        assert!(e.message.contains(says), "{routes}: {e}");
        assert_eq!(e.line, Some(line), "{routes}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_client_falls_over_with_its_client_hello_replayed() {
    let hello = client_hello(Some("a.test"), 3);
    // a1 reads the ClientHello and hangs up without a word.
    let a1 = Backend::start("a1", Behaviour::ReadAndClose).await;
    let a2 = checking_backend("a2", hello.clone()).await;
    let d = checking_backend("default", hello.clone()).await;
    let config = ConfigText::new()
        .service(Service::new("tls", "default").key("[[service.route]]\nsni = [\"a.test\"]\ncluster = \"a\""))
        .cluster(
            Cluster::new("a")
                .node(Node::new("a1", a1.addr).fallover("a2"))
                .node(Node::new("a2", a2)),
        )
        .cluster(Cluster::new("default").node(Node::new("d", d)));
    let (server, addr) = config.start().await;
    // Round robin: one of the two clients is offered to a1 first.
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        assert_eq!(answer(s).await, "a2 same", "the ClientHello replayed byte for byte");
    }
    let a1_figures = server.snapshot().clusters["a"].node("a1").unwrap().figures.clone();
    assert!(a1_figures.connect_failures() >= 1, "a1 was tried and failed");
    server.shutdown(PATIENCE).await;
}
