//! Faults and hostile peers, each next to a well-behaved client that must not
//! notice. One test runs every scenario in turn and produces the table of
//! docs/robustness.md: `UPDATE_DOCS=1 cargo test --test robustness` rewrites
//! it; otherwise the test fails if the document no longer says what happens.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A row of the report: the fault, what the balancer did, what the others saw.
struct Row {
    fault: &'static str,
    outcome: String,
}

/// The well-behaved client: 1 MB through an echo node, byte-exact.
async fn bystander(addr: SocketAddr) -> &'static str {
    let data = random_bytes(1 << 20);
    let got = within("bystander", async {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(send, r.read_to_end(&mut got));
        read.unwrap();
        got
    })
    .await;
    assert!(got == data, "the bystander's bytes came back changed");
    "a bystander's 1 MB echo stayed byte-exact"
}

/// A balancer with two services: `faulty` on the node under test, `calm` on an echo node.
async fn two_services(faulty_node: SocketAddr, faulty_keys: &str) -> (Server, SocketAddr, SocketAddr) {
    let echo = echo_backend().await;
    let (server, faulty) = ConfigText::new()
        .service(Service::new("faulty", "f").key(faulty_keys))
        .service(Service::new("calm", "c"))
        .cluster(Cluster::of("f", &[("n", faulty_node)]))
        .cluster(Cluster::of("c", &[("echo", echo)]))
        .start()
        .await;
    let calm = server.addr_of("calm").unwrap();
    (server, faulty, calm)
}

async fn node_resets_mid_stream() -> Row {
    // The node streams 64 KiB, waits for the client's go-ahead (so the bytes
    // are known to have arrived), then resets.
    let node = serve(|mut s| async move {
        let _ = s.write_all(&[7u8; 64 * 1024]).await;
        let mut go = [0u8; 1];
        let _ = s.read(&mut go).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let (server, faulty, calm) = two_services(node, "").await;
    let mut s = TcpStream::connect(faulty).await.unwrap();
    let mut got = vec![0u8; 64 * 1024];
    within("the stream", s.read_exact(&mut got)).await.unwrap();
    assert!(got.iter().all(|&b| b == 7), "bytes before the reset arrive unchanged");
    s.write_all(b"!").await.unwrap();
    let mut rest = Vec::new();
    let seen = match within("reset reaches the client", s.read_to_end(&mut rest)).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "the client got a reset",
        Ok(_) => "the client got EOF",
        Err(_) => "the client got an error",
    };
    let other = bystander(calm).await;
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "node resets mid-stream",
        outcome: format!("the 64 KiB sent before the reset arrived, then {seen}; {other}"),
    }
}

async fn node_accepts_and_says_nothing() -> Row {
    let node = serve(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let (server, faulty, calm) = two_services(node, "idle_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(faulty).await.unwrap();
    let other = bystander(calm).await;
    let mut rest = Vec::new();
    let n = within("idle close", s.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(n, 0);
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "node accepts, then never answers",
        outcome: format!("closed by idle_timeout (the client got EOF); {other}"),
    }
}

async fn client_vanishes() -> Row {
    let (tx, rx) = tokio::sync::oneshot::channel::<usize>();
    let tx = std::sync::Mutex::new(Some(tx));
    let node = serve(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got).await;
            if let Some(tx) = tx {
                let _ = tx.send(got.len());
            }
        }
    })
    .await;
    let (server, faulty, calm) = two_services(node, "idle_timeout = \"1s\"").await;
    // The client sends a little and then neither speaks nor closes: from the
    // balancer's side, exactly what a vanished (half-open) client looks like.
    let mut s = TcpStream::connect(faulty).await.unwrap();
    s.write_all(b"last words").await.unwrap();
    let other = bystander(calm).await;
    let node_got = within("the node is released", rx).await.unwrap();
    assert_eq!(node_got, 10);
    drop(s);
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "client vanishes without FIN or RST (half-open)",
        outcome: format!("idle_timeout closed both sides; the node got the client's bytes, then EOF; {other}"),
    }
}

async fn slowloris() -> Row {
    let node = serve(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let keys = "max_connections_per_client = 20\nidle_timeout = \"2s\"";
    let (server, faulty, calm) = two_services(node, keys).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = connect_from(ip(0, 0, 66), faulty).await;
        // The balancer may already have closed a refused one.
        let _ = s.write_all(b"G").await;
        held.push(s);
    }
    let other = bystander(calm).await;
    let figures = server.snapshot().services["faulty"].figures.clone();
    let refused = || figures.refused(Refusal::MaxConnectionsPerClient);
    wait_until("the refusals to be counted", || async { refused() >= 180 }).await;
    let refused = refused();
    assert_eq!(refused, 180, "all but max_connections_per_client refused");
    wait_until("the held ones to time out", || async {
        figures.active_connections() == 0
    })
    .await;
    drop(held);
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "slowloris: 200 connections from one IP, one byte each, then silence",
        outcome: format!(
            "20 held (max_connections_per_client), {refused} closed at once and counted; the held ones end at idle_timeout; {other}"
        ),
    }
}

async fn node_trickles() -> Row {
    let node = serve(|mut s| async move {
        for b in b"abc" {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let (server, faulty, calm) = two_services(node, "").await;
    let mut s = TcpStream::connect(faulty).await.unwrap();
    let mut first = [0u8; 1];
    within("first byte", s.read_exact(&mut first)).await.unwrap();
    let other = bystander(calm).await;
    let mut rest = String::new();
    within("the rest", s.read_to_string(&mut rest)).await.unwrap();
    assert_eq!(format!("{}{rest}", first[0] as char), "abc");
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "node trickles one byte per second",
        outcome: format!("each byte was forwarded as it came (\"abc\" complete, in order); {other}"),
    }
}

async fn garbage_from_client() -> Row {
    let (server, faulty, calm) = two_services(echo_backend().await, "").await;
    let garbage = random_bytes(100_000);
    let mut s = TcpStream::connect(faulty).await.unwrap();
    s.write_all(&garbage).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    within("echo", s.read_to_end(&mut back)).await.unwrap();
    assert!(back == garbage);
    let other = bystander(calm).await;
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "client sends 100 kB of random binary",
        outcome: format!("forwarded unchanged both ways (nothing is parsed); {other}"),
    }
}

async fn connection_flood() -> Row {
    let node = name_backend("n").await;
    let (server, faulty, calm) = two_services(node, "").await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            for _ in 0..250 {
                // Connect and drop at once: many never wait for the node.
                drop(TcpStream::connect(faulty).await.unwrap());
            }
        }));
    }
    for t in tasks {
        within("flood", t).await.unwrap();
    }
    let other = bystander(calm).await;
    let figures = server.snapshot().services["faulty"].figures.clone();
    wait_until("every connection to be accounted for", || async {
        figures.accepted() >= 2000 && figures.active_connections() == 0
    })
    .await;
    server.shutdown(Duration::ZERO).await;
    Row {
        fault: "flood: 2,000 connections opened and dropped at once",
        outcome: format!("all 2000 accepted and finished, none left open; {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_leave_other_clients_unaffected() {
    let rows = vec![
        node_resets_mid_stream().await,
        node_accepts_and_says_nothing().await,
        client_vanishes().await,
        slowloris().await,
        node_trickles().await,
        garbage_from_client().await,
        connection_flood().await,
    ];
    let mut table = String::from("| fault | what happened |\n| --- | --- |\n");
    for r in &rows {
        table.push_str(&format!("| {} | {} |\n", r.fault, r.outcome));
    }
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/robustness.md");
    let doc = std::fs::read_to_string(doc_path).unwrap_or_default();
    let (begin, end) = ("<!-- faults: begin -->\n", "<!-- faults: end -->");
    let (Some(b), Some(e)) = (doc.find(begin), doc.find(end)) else {
        panic!("docs/robustness.md lacks the fault table markers");
    };
    let current = &doc[b + begin.len()..e];
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(doc_path, format!("{}{table}{}", &doc[..b + begin.len()], &doc[e..])).unwrap();
    } else {
        assert_eq!(
            current, table,
            "docs/robustness.md is out of date: run UPDATE_DOCS=1 cargo test --test robustness"
        );
    }
}
