//! Twins sharing their state through a real Redis (`[shared]`): pins that
//! follow a client from one instance to the other, run-time states and
//! redirects that every instance applies, and the store's faults — killed,
//! restarted empty, or accepting and never answering — that cost no client.
//!
//! Each test starts its own `redis-server` (Debian's, from
//! scripts/test-deps.txt) on a free loopback port, with persistence off, and
//! its balancers from the library, each with a name of its own.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

/// A `redis-server` of the test's own, killed when dropped.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start(port: u16) -> Redis {
        Redis::start_with(port, None, &[])
    }

    /// A `redis-server` reading `file` first, with `extra` arguments after the test's own.
    fn start_with(port: u16, file: Option<&std::path::Path>, extra: &[&str]) -> Redis {
        let child = Command::new(tool("redis-server"))
            .args(file)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let redis = Redis { port, child };
        wait_until_blocking("redis-server to answer", || redis.query(&["PING"]).is_some());
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One command, answered as text (`None`: no answer).
    fn query(&self, args: &[&str]) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(1)).ok()?;
        let mut command = redis::cmd(args[0]);
        for a in &args[1..] {
            command.arg(*a);
        }
        command
            .query::<redis::Value>(&mut connection)
            .ok()
            .map(|v| format!("{v:?}"))
    }

    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A twin named `instance` on `store`, round robin over `nodes` with
/// affinity. Its lookup budget is generous: these tests run many balancers,
/// stores and clients at once on two loaded CPUs, and check what is shared,
/// not how fast (a store past the budget: the never-answering store's test).
fn twin(instance: &str, store: &str, nodes: &[(&str, SocketAddr)]) -> ConfigText {
    ConfigText::one_service(Cluster::of("c", nodes).key("affinity = true"))
        .top(&format!(
            "shared = {{ store = {store:?}, instance = {instance:?}, lookup_budget = \"500ms\" }}"
        ))
        .admin_listen("127.0.0.1:0")
}

async fn three_nodes() -> Vec<(&'static str, SocketAddr)> {
    vec![
        ("n1", name_backend("n1").await),
        ("n2", name_backend("n2").await),
        ("n3", name_backend("n3").await),
    ]
}

/// Twins east and west on `redis`, over three nodes, each with the store up.
async fn twins(redis: &Redis) -> ((Server, SocketAddr), (Server, SocketAddr)) {
    let nodes = three_nodes().await;
    let east = twin("east", &redis.url(), &nodes).start().await;
    let west = twin("west", &redis.url(), &nodes).start().await;
    until_store_up(&east.0).await;
    until_store_up(&west.0).await;
    (east, west)
}

async fn until_store_up(server: &Server) {
    let figures = server.control().live().store_figures.clone();
    wait_until("the store up", || async { figures.is_up() }).await;
}

/// New clients one after the other through both twins, each from its own
/// source address (127.`octet`.x.y), until stopped.
struct ClientStream {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ClientStream {
    fn start(octet: u8, east: SocketAddr, west: SocketAddr) -> ClientStream {
        let stop = Arc::new(AtomicBool::new(false));
        let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(SeqCst) && n < 20_000 {
                    let from = ip(octet, (n / 250) as u8, (n % 250) as u8 + 1);
                    let to = if n.is_multiple_of(2) { east } else { west };
                    if read_from(from, to).await.starts_with('n') {
                        served.fetch_add(1, SeqCst);
                    } else {
                        failed.fetch_add(1, SeqCst);
                    }
                    n += 1;
                }
            })
        };
        ClientStream {
            stop,
            served,
            failed,
            task,
        }
    }

    /// Stops the stream; fails the test if any client failed.
    async fn stop_and_check(self) {
        self.stop.store(true, SeqCst);
        self.task.await.unwrap();
        assert_eq!(
            self.failed.load(SeqCst),
            0,
            "no client failed ({} served)",
            self.served.load(SeqCst)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_its_node_whichever_twin_it_reaches() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = Redis::start(free_port());
    let ((east, east_addr), (west, west_addr)) = twins(&redis).await;
    for client in 1..=50u8 {
        let from = ip(0, 3, client);
        let mut seen = Vec::new();
        for round in 0..6 {
            let to = if round % 2 == 0 { east_addr } else { west_addr };
            seen.push(read_from(from, to).await);
        }
        let timeouts = |s: &Server| s.control().live().store_figures.lookup_timeouts();
        assert!(
            seen.iter().all(|n| *n == seen[0]),
            "client {from}: {seen:?}; lookups past the budget: east {}, west {}",
            timeouts(&east),
            timeouts(&west)
        );
    }
    // And the pins are in the store, under the prefix, with their node.
    let held = redis.query(&["GET", "protobalance:pin:c:127.0.3.7"]).unwrap();
    assert!(
        held.contains("n1|") || held.contains("n2|") || held.contains("n3|"),
        "{held}"
    );
    east.shutdown(PATIENCE).await;
    west.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_set_on_one_twin_and_a_redirect_on_the_other_reach_every_twin() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = Redis::start(free_port());
    let nodes = three_nodes().await;
    let other = name_backend("g1").await;
    let with_green = |name: &str| twin(name, &redis.url(), &nodes).cluster(Cluster::of("green", &[("g1", other)]));
    let (east, east_addr) = with_green("east").start().await;
    let (west, west_addr) = with_green("west").start().await;
    until_store_up(&east).await;
    until_store_up(&west).await;

    let started = Instant::now();
    east.set_node_state("c", "n2", NodeState::Yellow).unwrap();
    let n2 = west.snapshot().clusters["c"].node("n2").unwrap().figures.clone();
    wait_until("west to drain n2", || async { n2.state() == NodeState::Yellow }).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "west followed after {took:?}");
    for i in 0..9u8 {
        assert_ne!(
            read_from(ip(0, 4, i), west_addr).await,
            "n2",
            "west sends no new client to n2"
        );
    }
    let origin = west.control().state().overrides.node_states[&("c".to_string(), "n2".to_string())]
        .origin
        .clone();
    assert_eq!(origin.instance.as_deref(), Some("east"), "west says who set it");

    west.control().set_service_cluster("svc", "green").unwrap();
    wait_until("east to follow the redirect", || async {
        east.snapshot().services["svc"].cluster == "green"
    })
    .await;
    assert_eq!(read_all(east_addr).await, "g1");

    // A third instance started later takes the current overrides at start.
    let (north, _) = with_green("north").start().await;
    until_store_up(&north).await;
    wait_until("north to apply what is in force", || async {
        let s = north.snapshot();
        s.services["svc"].cluster == "green" && s.clusters["c"].node("n2").unwrap().figures.state() == NodeState::Yellow
    })
    .await;
    for s in [east, west, north] {
        s.shutdown(PATIENCE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_costs_no_client_and_gets_its_pins_back() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = Redis::start(free_port());
    let ((east, east_addr), (west, west_addr)) = twins(&redis).await;

    let stream = ClientStream::start(1, east_addr, west_addr);
    let served = stream.served.clone();
    wait_until("some clients served", || async { served.load(SeqCst) > 50 }).await;
    let port = redis.kill();
    let figures = east.control().live().store_figures.clone();
    wait_until("east to see the store down", || async { !figures.is_up() }).await;
    let before = served.load(SeqCst);
    wait_until("clients served while the store is down", || async {
        served.load(SeqCst) > before + 100
    })
    .await;
    // A client pinned during the outage, through east.
    let outage_client = ip(2, 0, 1);
    let node = read_from(outage_client, east_addr).await;
    let redis = Redis::start(port);
    wait_until("east to see the store back", || async { figures.is_up() }).await;
    let key = "protobalance:pin:c:127.2.0.1";
    wait_until_blocking("the outage's pin written back", || {
        redis
            .query(&["GET", key])
            .is_some_and(|v| v.contains(&format!("{node}|")))
    });
    stream.stop_and_check().await;
    east.shutdown(PATIENCE).await;
    west.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_accepts_and_never_answers_costs_no_client() {
    // A bare listener: connections are accepted by the kernel, never answered;
    // as the store itself, and as the sentinel asked for the primary.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = silent.local_addr().unwrap();
    let nodes = three_nodes().await;
    for url in [format!("redis://{at}/0"), format!("redis+sentinel://{at}/store")] {
        let (east, east_addr) = twin("east", &url, &nodes).start().await;
        for client in 0..30u8 {
            let node = within("a client", read_from(ip(0, 6, client), east_addr)).await;
            assert!(node.starts_with('n'), "{url}: client {client} served: {node:?}");
        }
        assert!(!east.control().live().store_figures.is_up(), "{url}");
        east.shutdown(PATIENCE).await;
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_hangs_costs_a_few_clients_their_budget_then_none_until_it_answers() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = Redis::start(free_port());
    let nodes = three_nodes().await;
    let config = ConfigText::one_service(Cluster::of("c", &nodes).key("affinity = true"))
        .top(&format!(
            "shared = {{ store = {:?}, instance = \"east\", lookup_budget = \"50ms\" }}",
            redis.url()
        ))
        .admin_listen("127.0.0.1:0");
    let (east, east_addr) = config.start().await;
    until_store_up(&east).await;
    let figures = east.control().live().store_figures.clone();

    // Stopped, Redis keeps its connections and answers nothing.
    let signal = |sig: i32| {
        // SAFETY: kill(2) on the redis-server this test started.
        assert_eq!(unsafe { libc::kill(redis.child.id() as i32, sig) }, 0);
    };
    signal(libc::SIGSTOP);
    for client in 0..12u8 {
        let node = read_from(ip(10, 0, client), east_addr).await;
        assert!(node.starts_with('n'), "client {client} served: {node:?}");
    }
    assert!(figures.is_slow(), "the store counts as slow");
    assert_eq!(
        figures.lookup_timeouts(),
        u64::from(protobalance::model::SLOW_AFTER),
        "only the first clients waited for the hung store"
    );

    signal(libc::SIGCONT);
    wait_until("the store asked again", || async { figures.is_answering() }).await;
    let node = read_from(ip(10, 1, 1), east_addr).await;
    wait_until_blocking("a new client's pin in the store again", || {
        redis
            .query(&["GET", "protobalance:pin:c:127.10.1.1"])
            .is_some_and(|v| v.contains(&format!("{node}|")))
    });
    east.shutdown(PATIENCE).await;
}

#[test]
fn check_refuses_a_bad_store_url_without_quoting_its_password() {
    let text = |store: &str| {
        format!(
            "shared = {{ store = {store:?} }}\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n"
        )
    };
    let e = parse_offline(&text("http://:hunter2@10.0.0.5:6379"), "t.toml").unwrap_err();
    assert!(
        e.to_string()
            .contains("must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL"),
        "{e}"
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(e.line, Some(1));
    let ok = parse_offline(&text("redis://:hunter2@10.0.0.5:6379/0"), "t.toml").unwrap();
    let shared = ok.shared.unwrap();
    assert_eq!(shared.display_url(), "redis://10.0.0.5:6379/0");
    assert!(!format!("{shared:?}").contains("hunter2"));
    assert_eq!(shared.lookup_budget, Duration::from_millis(5));

    let e = parse_offline(&text("redis+sentinel://:hunter2@10.0.0.5,10.0.0.6"), "t.toml").unwrap_err();
    assert!(e.to_string().contains("must name the primary"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let ok = parse_offline(
        &text("redis+sentinel://:hunter2@10.0.0.5,10.0.0.6:26380/store/1"),
        "t.toml",
    )
    .unwrap();
    let shared = ok.shared.unwrap();
    assert_eq!(shared.display_url(), "redis+sentinel://10.0.0.5,10.0.0.6:26380/store/1");
    assert!(!format!("{shared:?}").contains("hunter2"));
    let sentinel = shared.sentinel.unwrap();
    assert_eq!(sentinel.sentinels, ["redis://10.0.0.5:26379", "redis://10.0.0.6:26380"]);
    assert_eq!((sentinel.primary.as_str(), sentinel.db), ("store", 1));
}

/// A primary, its replica and one sentinel watching them as `store`, each
/// of the test's own; the sentinel's file (which it rewrites) is in `dir`.
/// Returns once the sentinel knows the replica, which it fails over to.
fn primary_replica_sentinel(dir: &std::path::Path) -> (Redis, Redis, Redis) {
    let primary = Redis::start(free_port());
    let primary_port = primary.port.to_string();
    let replica = Redis::start_with(free_port(), None, &["--replicaof", "127.0.0.1", &primary_port]);
    let file = dir.join("sentinel.conf");
    std::fs::write(
        &file,
        format!(
            "sentinel monitor store 127.0.0.1 {primary_port} 1\n\
             sentinel down-after-milliseconds store 500\n\
             sentinel failover-timeout store 5000\n"
        ),
    )
    .unwrap();
    let sentinel = Redis::start_with(free_port(), Some(&file), &["--sentinel"]);
    let replica_port = replica.port.to_string();
    wait_until_blocking("the sentinel to know the replica", || {
        sentinel
            .query(&["SENTINEL", "REPLICAS", "store"])
            .is_some_and(|v| v.contains(&replica_port))
    });
    (primary, replica, sentinel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_follow_the_primary_the_sentinels_fail_over_to() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (primary, replica, sentinel) = primary_replica_sentinel(dir.path());
    let url = format!("redis+sentinel://127.0.0.1:{}/store", sentinel.port);
    let nodes = three_nodes().await;
    let (east, east_addr) = twin("east", &url, &nodes).start().await;
    let (west, west_addr) = twin("west", &url, &nodes).start().await;
    until_store_up(&east).await;
    until_store_up(&west).await;

    // Shared through the primary the sentinel names.
    let first = read_from(ip(7, 0, 1), east_addr).await;
    assert_eq!(read_from(ip(7, 0, 1), west_addr).await, first);
    wait_until_blocking("the pin in the primary", || {
        primary
            .query(&["GET", "protobalance:pin:c:127.7.0.1"])
            .is_some_and(|v| v.contains(&format!("{first}|")))
    });

    // A steady stream of new clients through both twins while the primary dies.
    let stream = ClientStream::start(8, east_addr, west_addr);
    let served = stream.served.clone();
    wait_until("some clients served", || async { served.load(SeqCst) > 20 }).await;
    drop(primary);
    let replica_port = replica.port.to_string();
    wait_until_blocking("the sentinel to promote the replica", || {
        sentinel
            .query(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "store"])
            .is_some_and(|v| v.contains(&replica_port))
    });

    // The new primary gets the pins made from now on, and carries the
    // run-time state from one twin to the other.
    let later = read_from(ip(9, 0, 1), east_addr).await;
    wait_until_blocking("a pin made after the fall-over in the new primary", || {
        replica
            .query(&["GET", "protobalance:pin:c:127.9.0.1"])
            .is_some_and(|v| v.contains(&format!("{later}|")))
    });
    assert_eq!(read_from(ip(9, 0, 1), west_addr).await, later);
    east.set_node_state("c", "n2", NodeState::Yellow).unwrap();
    let n2 = west.snapshot().clusters["c"].node("n2").unwrap().figures.clone();
    wait_until("west to drain n2 through the new primary", || async {
        n2.state() == NodeState::Yellow
    })
    .await;

    stream.stop_and_check().await;
    east.shutdown(PATIENCE).await;
    west.shutdown(PATIENCE).await;
}

/// A TLS-only `redis-server` with a password and a self-signed certificate
/// for 127.0.0.1 (made here with `openssl`); returns it, its port and the
/// certificate's path.
fn redis_over_tls(dir: &std::path::Path, password: &str) -> (Redis, u16, std::path::PathBuf) {
    let (cert, key) = self_signed(dir, "127.0.0.1", &["IP:127.0.0.1"]);
    let port = free_port();
    let child = Command::new(tool("redis-server"))
        .args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port.to_string()])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .args(["--tls-auth-clients", "no", "--requirepass", password])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed when dropped, also when the test panics.
    let redis = Redis { port, child };
    wait_until_blocking("redis-server to listen for TLS", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (redis, port, cert)
}

#[test]
fn a_store_over_tls_with_a_password_from_a_file_is_reached_and_the_password_never_logged() {
    if !require_tools(&["redis-server", "openssl"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let password = "pw-that-must-not-leak-7f3a";
    let (redis, port, cert) = redis_over_tls(dir.path(), password);
    let password_file = dir.path().join("redis.password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let node = blocking(name_backend("n1"));
    let config = |url: &str| {
        ConfigText::one_service(Cluster::of("c", &[("n1", node)]).key("affinity = true"))
            .admin_listen("127.0.0.1:0")
            .top(&format!(
                "shared = {{ store = {url:?}, instance = \"east\", password_file = {:?} }}",
                password_file.display().to_string()
            ))
    };
    let url = format!("rediss://127.0.0.1:{port}/0");
    // The certificate is trusted (SSL_CERT_FILE names it as the roots).
    let trusted = Running::run_with(&config(&url), &[], |c| {
        c.env("SSL_CERT_FILE", &cert);
    });
    let admin = trusted.admin_addr();
    wait_until_blocking("the store up over TLS", || {
        blocking(api(&admin, None, hyper::Method::GET, "/metrics", None))
            .text()
            .contains("protobalance_store_up 1")
    });
    assert_eq!(read_all_blocking(trusted.listen_addr()), "n1");
    // Not trusted: the store is unreachable, said once, and clients are served all the same.
    let untrusted = Running::run_with(&config(&url), &[], |c| {
        c.env("SSL_CERT_FILE", "/nonexistent");
    });
    untrusted.wait_for("shared state store unreachable");
    assert_eq!(read_all_blocking(untrusted.listen_addr()), "n1");
    for mut process in [trusted, untrusted] {
        // Stopped first: its whole output is there once it has exited.
        process.signal(libc::SIGTERM);
        process.wait_exit();
        let output = process.all_output().join("\n");
        assert!(!output.contains(password), "the password reached the log:\n{output}");
    }
    drop(redis);
}

fn read_all_blocking(addr: SocketAddr) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_store_lies_with_change_nothing() {
    if !require_tools(&["redis-server"]) {
        return;
    }
    let redis = Redis::start(free_port());
    let nodes = three_nodes().await;
    let (east, _) = twin("east", &redis.url(), &nodes).start().await;
    until_store_up(&east).await;
    let n2 = east.snapshot().clusters["c"].node("n2").unwrap().figures.clone();
    let far_future = "99999999999999";
    // Each under a field of its own, so that none overwrites another before it is read.
    for (field, record) in [
        // An instance name that would write a line of its own into the log.
        (
            "lie1",
            format!(
                r#"{{"key":{{"kind":"node_state","cluster":"c","node":"n2"}},"value":"red","instance":"x\nFORGED","at_ms":{far_future}}}"#
            ),
        ),
        // Dated far ahead: it would win over every real change to come.
        (
            "lie2",
            format!(
                r#"{{"key":{{"kind":"node_state","cluster":"c","node":"n2"}},"value":"red","instance":"west","at_ms":{far_future}}}"#
            ),
        ),
        // A state that is none.
        (
            "lie3",
            format!(
                r#"{{"key":{{"kind":"node_state","cluster":"c","node":"n2"}},"value":"purple","instance":"west","at_ms":{far_future}}}"#
            ),
        ),
        // A node this file does not have.
        (
            "lie4",
            format!(
                r#"{{"key":{{"kind":"node_state","cluster":"c","node":"n9"}},"value":"red","instance":"west","at_ms":{far_future}}}"#
            ),
        ),
        // Not a record at all.
        ("node/c/n2", "{{{not json".to_string()),
    ] {
        redis
            .query(&["HSET", "protobalance:overrides", field, &record])
            .unwrap();
        redis.query(&["PUBLISH", "protobalance:overrides", field]).unwrap();
    }
    // A well-formed record after them, as the sign that they were all read.
    let good =
        r#"{"key":{"kind":"node_state","cluster":"c","node":"n3"},"value":"yellow","instance":"west","at_ms":1}"#;
    redis
        .query(&["HSET", "protobalance:overrides", "node/c/n3", good])
        .unwrap();
    redis
        .query(&["PUBLISH", "protobalance:overrides", "node/c/n3"])
        .unwrap();
    let n3 = east.snapshot().clusters["c"].node("n3").unwrap().figures.clone();
    wait_until("the good record applied", || async { n3.state() == NodeState::Yellow }).await;
    assert_eq!(n2.state(), NodeState::Green, "no lying record changed n2");
    assert!(
        east.control().state().overrides.node_states.len() == 1,
        "only n3's override is in force"
    );
    east.shutdown(PATIENCE).await;
}
