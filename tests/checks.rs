//! Health that knows the service, with real sockets: active checks and what
//! they say (status, metrics), `on_unavailable`, health per destination port
//! for port-following nodes, slow start, drain deadlines and the maximum
//! connection age. The backends are small servers of the test's own, whose
//! answers a test switches at will; the same checks against nginx, exim,
//! dovecot and vsftpd are in tests/protocols/checks.rs.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use protobalance::config::{CheckConfig, CheckKind, ProxyHeader, Step};
use protobalance::health::check::check_once;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The check interval of these tests: short, so that a test takes seconds.
const INTERVAL: Duration = Duration::from_millis(200);

/// A mail-like server: greets `220 NAME` while `healthy`, else `421 …` and
/// closes, as a mail server that is up but refusing does.
async fn greeter(name: &'static str, healthy: Arc<AtomicBool>) -> SocketAddr {
    serve(move |mut s| {
        let healthy = healthy.clone();
        async move {
            if healthy.load(SeqCst) {
                let _ = s.write_all(format!("220 {name}\r\n").as_bytes()).await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            } else {
                let _ = s.write_all(b"421 Service not available\r\n").await;
            }
        }
    })
    .await
}

/// The first line a client reads through the balancer at `addr`.
async fn greeting(addr: SocketAddr) -> String {
    within("a greeting", async {
        let mut line = String::new();
        let stream = TcpStream::connect(addr).await.unwrap();
        BufReader::new(stream).read_line(&mut line).await.unwrap();
        line.trim_end().to_string()
    })
    .await
}

fn figures(server: &Server, cluster: &str, node: &str) -> Arc<NodeFigures> {
    server.snapshot().clusters[cluster].node(node).unwrap().figures.clone()
}

/// Waits until `node` of cluster "c" is available (or not); returns how long it took.
async fn until_health(server: &Server, node: &str, available: bool) -> Duration {
    let start = Instant::now();
    let f = figures(server, "c", node);
    wait_until(&format!("node {node} available = {available}"), || async {
        f.is_available() == available
    })
    .await;
    start.elapsed()
}

fn check_keys(check: &str) -> String {
    format!(
        "check = {{ {check}, interval = \"{}ms\", timeout = \"150ms\" }}",
        INTERVAL.as_millis()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_greeting_turns_421_is_checked_out_and_back() {
    let healthy = Arc::new(AtomicBool::new(true));
    let a = greeter("a", healthy.clone()).await;
    let b = greeter("b", Arc::new(AtomicBool::new(true))).await;
    let config = ConfigText::one_service(
        Cluster::new("c")
            .key(&check_keys("type = \"smtp\", rise = 2, fall = 3"))
            .node(Node::new("a", a))
            .node(Node::new("b", b)),
    )
    .admin_listen("127.0.0.1:0");
    let (server, admin, _file) = config.start_with_admin().await;
    let web = server.addr_of("svc").unwrap();
    // Passing: the verdict is there after one round of checks.
    wait_until("a's first check", || async {
        node_status(&status(&admin, None).await, "c", "a")["check"]["status"] == "passing"
    })
    .await;
    let mut seen = [greeting(web).await, greeting(web).await];
    seen.sort();
    assert_eq!(seen, ["220 a", "220 b"]);

    healthy.store(false, SeqCst);
    let out = until_health(&server, "a", false).await;
    // fall × interval, plus the interval it may have to wait for its turn,
    // plus a margin for a loaded machine.
    assert!(out < INTERVAL * 4 + Duration::from_secs(2), "taken out after {out:?}");
    let s = status(&admin, None).await;
    let check = &node_status(&s, "c", "a")["check"];
    assert_eq!(check["status"], "failing", "{check}");
    assert!(
        check["last_error"]
            .as_str()
            .unwrap()
            .starts_with("greeting \"421 Service not available"),
        "{check}"
    );
    assert!(check["since"].as_str().unwrap().ends_with('Z'), "{check}");
    assert_eq!(node_status(&s, "c", "a")["health"], "unavailable");
    for _ in 0..6 {
        assert_eq!(greeting(web).await, "220 b", "every client goes to b meanwhile");
    }
    let metrics = api(&admin, None, hyper::Method::GET, "/metrics", None).await.text();
    let failures: u64 = metrics
        .lines()
        .find(|l| l.starts_with("protobalance_node_check_failures_total{") && l.contains("node=\"a\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no check failures of a in:\n{metrics}"));
    assert!(failures >= 3, "{failures}");

    healthy.store(true, SeqCst);
    let back = until_health(&server, "a", true).await;
    assert!(back < INTERVAL * 3 + Duration::from_secs(2), "back after {back:?}");
    let check = node_status(&status(&admin, None).await, "c", "a")["check"].clone();
    assert_eq!(check["status"], "passing");
    assert!(check.get("last_error").is_none(), "{check}");
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn a_check_says_why_it_failed() {
    let check = |kind: CheckKind| CheckConfig {
        kind,
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(300),
        rise: 1,
        fall: 1,
        port: None,
    };
    let refused = dead_addr();
    assert_eq!(
        check_once(&check(CheckKind::Tcp), refused, ProxyHeader::None).await,
        Err("connection refused".to_string())
    );
    // Accepts and says nothing: a hung server.
    let silent = serve(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    assert_eq!(
        check_once(&check(CheckKind::Imap), silent, ProxyHeader::None).await,
        Err("timeout after 300ms".to_string())
    );
    assert_eq!(
        check_once(&check(CheckKind::Tcp), silent, ProxyHeader::None).await,
        Ok(())
    );
    let http = |status: &'static str| {
        serve(move |mut s| async move {
            let mut request = vec![0u8; 1024];
            let n = s.read(&mut request).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&request[..n]).to_string();
            // The request names the path and a Host.
            let answer = if head.starts_with("GET /healthz HTTP/1.1\r\n") && head.contains("\r\nHost: ") {
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")
            } else {
                "HTTP/1.1 400 Bad Request\r\n\r\n".to_string()
            };
            let _ = s.write_all(answer.as_bytes()).await;
        })
    };
    let http_check = check(CheckKind::Http {
        path: "/healthz".into(),
        host: None,
        expect_status: (200, 399),
    });
    let ok = http("204 No Content").await;
    assert_eq!(check_once(&http_check, ok, ProxyHeader::None).await, Ok(()));
    let failing = http("503 Service Unavailable").await;
    assert_eq!(
        check_once(&http_check, failing, ProxyHeader::None).await,
        Err("status 503".to_string())
    );
    let pong = |answer: &'static [u8]| {
        serve(move |mut s| async move {
            let mut line = vec![0u8; 64];
            if let Ok(n) = s.read(&mut line).await
                && &line[..n] == b"PING\r\n"
            {
                // Two writes: an expect must find text split over reads.
                let (first, rest) = answer.split_at(2);
                let _ = s.write_all(first).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = s.write_all(rest).await;
            }
        })
    };
    let send_expect = check(CheckKind::SendExpect(vec![
        Step::Send(b"PING\r\n".to_vec()),
        Step::Expect(b"+PONG".to_vec()),
    ]));
    assert_eq!(
        check_once(&send_expect, pong(b"+PONG\r\n").await, ProxyHeader::None).await,
        Ok(())
    );
    let err = check_once(&send_expect, pong(b"-ERR no\r\n").await, ProxyHeader::None)
        .await
        .unwrap_err();
    assert_eq!(err, "expected \"+PONG\", the node closed after \"-ERR no\\r\\n\"");
}

/// A node whose checked port (`port`) is a listener of its own, which a test
/// closes while the node's service port keeps serving.
async fn cut_or_keep(on_unavailable: &str) -> (bool, Server) {
    let node = echo_backend().await;
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = health.local_addr().unwrap().port();
    let config = ConfigText::one_service(
        Cluster::new("c")
            .key(&format!("on_unavailable = \"{on_unavailable}\""))
            .key(&check_keys(&format!(
                "type = \"tcp\", port = {port}, rise = 1, fall = 1"
            )))
            .node(Node::new("a", node)),
    );
    let (server, web) = config.start().await;
    let mut open = TcpStream::connect(web).await.unwrap();
    open.write_all(b"one").await.unwrap();
    let mut echo = [0u8; 3];
    within("the echo", open.read_exact(&mut echo)).await.unwrap();
    drop(health);
    until_health(&server, "a", false).await;
    // Does the connection opened before still carry bytes?
    let alive = within("the connection's fate", async {
        if open.write_all(b"two").await.is_err() {
            return false;
        }
        open.read_exact(&mut echo).await.is_ok() && &echo == b"two"
    })
    .await;
    (alive, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_unavailable_cut_ends_the_open_connections_and_keep_leaves_them() {
    let (alive, server) = cut_or_keep("keep").await;
    assert!(alive, "keep: the open connection carries on");
    server.shutdown(PATIENCE).await;
    let (alive, server) = cut_or_keep("cut").await;
    assert!(!alive, "cut: the open connection is ended");
    server.shutdown(PATIENCE).await;
}

/// A balancer on two ports of 127.0.0.1 whose one node, "127.0.0.2", takes
/// each client's port; the node listens on the first port only.
async fn port_following() -> (Server, u16, u16, Backend) {
    for _ in 0..20 {
        let first = fastrand::u16(20_000..32_000);
        let second = first + 1;
        let Ok(node) = tokio::net::TcpListener::bind(("127.0.0.2", first)).await else {
            continue;
        };
        drop(node);
        let config = ConfigText::new()
            .service(Service::new("svc", "c").listen(&[&format!("127.0.0.1:{first}-{second}")]))
            .cluster(
                Cluster::new("c")
                    .key("retry_interval = \"100ms\"")
                    .node(Node::new("n", "127.0.0.2")),
            );
        let Ok(server) = config.try_start().await else { continue };
        let backend = Backend::start_on("n", Behaviour::Name, SocketAddr::from(([127, 0, 0, 2], first))).await;
        return (server, first, second, backend);
    }
    panic!("no two free ports found in 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_of_a_port_following_node_leaves_its_other_ports_in_service() {
    let (server, first, second, _backend) = port_following().await;
    let to = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(read_all(to(first)).await, "n");
    // Nothing listens on the node's second port: refused, and the client is closed.
    assert_eq!(read_all(to(second)).await, "");
    let f = figures(&server, "c", "n");
    assert_eq!(f.down_ports(), vec![second]);
    assert!(f.is_available(), "one refused port says nothing about the others");
    for _ in 0..3 {
        assert_eq!(read_all(to(first)).await, "n", "the first port still serves");
    }
    // The node opens the port: the probe brings it back.
    let _late = Backend::start_on("n", Behaviour::Name, SocketAddr::from(([127, 0, 0, 2], second))).await;
    wait_until("the second port back", || async { f.down_ports().is_empty() }).await;
    assert_eq!(read_all(to(second)).await, "n");
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_scan_marks_ports_down_but_never_the_node() {
    let (server, first, second, _backend) = port_following().await;
    let to = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..5 {
        assert_eq!(read_all(to(second)).await, "");
    }
    let f = figures(&server, "c", "n");
    assert!(f.is_available());
    assert_eq!(f.health_transitions(), 0);
    assert_eq!(read_all(to(first)).await, "n");
    server.shutdown(PATIENCE).await;
}

/// Who serves `n` new connections to `web`: how many went to `b`.
async fn count_b(web: SocketAddr, n: usize) -> usize {
    let mut to_b = 0;
    for _ in 0..n {
        if read_all(web).await == "b" {
            to_b += 1;
        }
    }
    to_b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_returning_node_up_over_its_window() {
    let a = name_backend("a").await;
    let b = name_backend("b").await;
    let config = ConfigText::one_service(
        Cluster::new("c")
            .key("slow_start = \"10s\"")
            .node(Node::new("a", a))
            .node(Node::new("b", b)),
    );
    let (server, web) = config.start().await;
    // The first start's nodes share alike at once.
    let to_b = count_b(web, 100).await;
    assert_eq!(to_b, 50, "round robin, no ramp at start");
    server.set_node_state("c", "b", NodeState::Red).unwrap();
    assert_eq!(count_b(web, 20).await, 0);
    server.set_node_state("c", "b", NodeState::Green).unwrap();
    let early = count_b(web, 500).await;
    // Its weight's share is 250 of 500; its ramp starts at a twentieth.
    assert!(early < 125, "{early} of the first 500 connections went to b");
    assert!(early > 0, "b gets a share from the start");
    let f = figures(&server, "c", "b");
    wait_until("the end of b's ramp", || async { f.ramp_permille() == 1000 }).await;
    let late = count_b(web, 200).await;
    assert!((90..=110).contains(&late), "{late} of 200 after the ramp");
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_turns_the_node_red_and_cuts_what_it_still_holds() {
    let clock = WallClock::manual(1_000_000_000);
    let a = echo_backend().await;
    let b = echo_backend().await;
    let config = ConfigText::one_service(Cluster::new("c").node(Node::new("a", a)).node(Node::new("b", b)));
    let (server, web) = config
        .start_with(Options {
            wall_clock: clock.clone(),
            ..Default::default()
        })
        .await;
    // One connection on a (round robin's first pick).
    let mut held = TcpStream::connect(web).await.unwrap();
    held.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 1];
    within("the echo", held.read_exact(&mut echo)).await.unwrap();
    assert_eq!(figures(&server, "c", "a").active_connections(), 1);

    server.drain_until("c", "a", Duration::from_secs(600)).unwrap();
    let f = figures(&server, "c", "a");
    assert_eq!(f.state(), NodeState::Yellow);
    held.write_all(b"y").await.unwrap();
    within("the echo while draining", held.read_exact(&mut echo))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(599));
    // Not yet: a tick of the deadline task passes, and a stays yellow.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(f.state(), NodeState::Yellow);
    clock.advance(Duration::from_secs(1));
    wait_until("a red at its deadline", || async { f.state() == NodeState::Red }).await;
    let mut rest = Vec::new();
    let ended = within("the cut", held.read_to_end(&mut rest)).await;
    assert!(
        ended.is_err() || rest.is_empty(),
        "the drained connection is cut: {ended:?} {rest:?}"
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_a_drain_deadline_and_refuses_a_bad_one() {
    let a = echo_backend().await;
    let config = ConfigText::one_service(Cluster::new("c").node(Node::new("a", a))).admin_listen("127.0.0.1:0");
    let (server, admin, _file) = config.start_with_admin().await;
    let put = |body: &'static str| {
        let admin = admin.clone();
        async move {
            api(
                &admin,
                None,
                hyper::Method::PUT,
                "/api/v1/clusters/c/nodes/a/state",
                Some(body),
            )
            .await
        }
    };
    for bad in [
        r#"{"state":"red","deadline":"10m"}"#,
        r#"{"state":"yellow","deadline":"soon"}"#,
        r#"{"state":"yellow","deadline":"0s"}"#,
    ] {
        let reply = put(bad).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.text());
        assert!(
            reply.json()["error"].as_str().unwrap().contains("deadline"),
            "{}",
            reply.text()
        );
        let s = status(&admin, None).await;
        assert_eq!(node_status(&s, "c", "a")["state"], "green", "{bad} changed nothing");
        assert!(node_status(&s, "c", "a").get("deadline").is_none());
    }
    let reply = put(r#"{"state":"yellow","deadline":"10m"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let s = status(&admin, None).await;
    let node = node_status(&s, "c", "a");
    assert_eq!(node["state"], "yellow");
    let deadline = humantime::parse_rfc3339(node["deadline"].as_str().unwrap()).unwrap();
    let left = deadline.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(590) && left <= Duration::from_secs(600),
        "{left:?}"
    );
    // Set green again: the drain and its deadline are gone.
    assert_eq!(put(r#"{"state":"green"}"#).await.status, 200);
    assert!(
        node_status(&status(&admin, None).await, "c", "a")
            .get("deadline")
            .is_none()
    );
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reach_their_maximum_age_each_at_its_own_moment_and_close_with_a_fin() {
    let node = echo_backend().await;
    let max = Duration::from_millis(1500);
    let config = ConfigText::new()
        .service(Service::new("svc", "c").key(&format!("max_connection_age = \"{}ms\"", max.as_millis())))
        .cluster(Cluster::new("c").node(Node::new("a", node)));
    let (server, web) = config.start().await;
    let opened = Instant::now();
    let mut clients = Vec::new();
    for i in 0..20u8 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut echo = [0u8; 1];
        within("the echo", s.read_exact(&mut echo)).await.unwrap();
        clients.push(s);
    }
    let mut ends = Vec::new();
    for mut s in clients {
        let mut rest = Vec::new();
        // A FIN, not a reset: the read ends cleanly.
        within("the close", s.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
        ends.push(opened.elapsed());
    }
    let (first, last) = (ends.iter().min().unwrap(), ends.iter().max().unwrap());
    assert!(
        *first >= max - max / 10,
        "closed before the last tenth of its age: {first:?}"
    );
    assert!(last > first, "not all at once: {ends:?}");
    let service = &server.snapshot().services["svc"];
    assert_eq!(service.figures.aged_out(), 20);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn the_node_of_a_single_node_cluster_that_refused_once_serves_the_next_client() {
    let node = Backend::start("a", Behaviour::Name).await;
    let addr = node.kill().await;
    let config = ConfigText::one_service(Cluster::new("c").node(Node::new("a", addr)));
    let (server, web) = config.start().await;
    assert_eq!(read_all(web).await, "", "refused: the node is down");
    assert!(!figures(&server, "c", "a").is_available());
    let _back = Backend::start_on("a", Behaviour::Name, addr).await;
    assert_eq!(read_all(web).await, "a", "the next client is served at once");
    server.shutdown(PATIENCE).await;
}

/// Not a test of the checks' timing: that nodes are not all checked at the
/// same instant. Ten nodes, one interval: their first checks are spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_spread_over_the_interval() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let tx = Arc::new(tx);
    let mut cluster = Cluster::new("c").key("check = { type = \"tcp\", interval = \"1s\", timeout = \"500ms\" }");
    for i in 0..10 {
        let tx = tx.clone();
        let addr = serve(move |_s| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now());
            }
        })
        .await;
        cluster = cluster.node(Node::new(&format!("n{i}"), addr));
    }
    let (server, _web) = ConfigText::one_service(cluster).start().await;
    let mut at = Vec::new();
    while at.len() < 10 {
        at.push(within("a check", rx.recv()).await.unwrap());
    }
    let spread = *at.iter().max().unwrap() - *at.iter().min().unwrap();
    assert!(
        spread >= Duration::from_millis(500),
        "ten first checks within {spread:?}"
    );
    server.shutdown(PATIENCE).await;
}
