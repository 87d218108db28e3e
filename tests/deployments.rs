//! The deployment scenarios of docs/deployments.md, each run from its example
//! file under examples/: the test loads the file, swaps its placeholder
//! addresses for loopback ones, and runs the balancer binary on it.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// `protobalance check` on `file`: passes, or fails the test with its output.
fn check(file: &Path) {
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "protobalance check {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_example_passes_check() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "cluster-fallover.toml",
            "controller.toml",
            "single-port-forward.toml",
            "twin.toml"
        ],
        "the examples this test knows"
    );
    for file in &files {
        check(file);
    }
}

/// The example `name` with each placeholder replaced (each must occur in the
/// file, so an edited example cannot silently escape the test), its state
/// directory moved to `dir`, written to `dir` and checked.
fn example(name: &str, dir: &Path, replace: &[(&str, String)]) -> PathBuf {
    let mut text = std::fs::read_to_string(examples_dir().join(name)).unwrap();
    let state = format!("\"{}\"", dir.join("state").display());
    for (placeholder, value) in [("\"/var/lib/protobalance\"", state)].iter().chain(replace) {
        assert!(text.contains(placeholder), "{name} has no {placeholder}");
        text = text.replace(placeholder, value);
    }
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    check(&file);
    file
}

/// The balancer binary running `file`; returns it and its service address.
fn run(file: &Path) -> (Running, SocketAddr) {
    let balancer = Running::spawn(&["run", "--config", file.to_str().unwrap()]);
    let addr = balancer.listen_addr();
    (balancer, addr)
}

#[tokio::test]
async fn single_port_forward() {
    let dir = tempfile::tempdir().unwrap();
    let node = echo_backend().await;
    let file = example(
        "single-port-forward.toml",
        dir.path(),
        &[
            ("0.0.0.0:8080", "127.0.0.1:0".into()),
            ("192.0.2.10:8080", node.to_string()),
            ("127.0.0.1:9900", "127.0.0.1:0".into()),
        ],
    );
    let (_balancer, addr) = run(&file);
    let sent = random_bytes(1024 * 1024);
    let got = within("1 MB through the forward", async {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let (_, got) = tokio::join!(
            async {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        got
    })
    .await;
    assert!(
        got == sent,
        "bytes through the forward differ ({} of {})",
        got.len(),
        sent.len()
    );
}

#[tokio::test]
async fn cluster_with_fallover_serves_every_client_when_a_node_dies() {
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a", Behaviour::Name).await;
    let (b, c) = (
        Backend::start("b", Behaviour::Name).await,
        Backend::start("c", Behaviour::Name).await,
    );
    let file = example(
        "cluster-fallover.toml",
        dir.path(),
        &[
            ("0.0.0.0:8080", "127.0.0.1:0".into()),
            ("192.0.2.11:8080", a.addr.to_string()),
            ("192.0.2.12:8080", b.addr.to_string()),
            ("192.0.2.13:8080", c.addr.to_string()),
            ("127.0.0.1:9900", "127.0.0.1:0".into()),
        ],
    );
    let (_balancer, addr) = run(&file);
    let mut before = Vec::new();
    for _ in 0..3 {
        before.push(read_all(addr).await);
    }
    before.sort();
    assert_eq!(before, ["a", "b", "c"], "round robin over the three nodes");

    // Node a dies: nothing listens on its port any more.
    let a = a.kill().await;
    assert!(std::net::TcpStream::connect(a).is_err(), "node a no longer accepts");
    let mut after = Vec::new();
    for _ in 0..12 {
        let name = read_all(addr).await;
        assert!(
            name == "b" || name == "c",
            "after a died every client is served by b or c, got {name:?}"
        );
        after.push(name);
    }
    assert!(
        after.iter().any(|n| n == "b") && after.iter().any(|n| n == "c"),
        "b and c both serve: {after:?}"
    );
}

#[tokio::test]
async fn twin_balancers_choose_the_same_node_for_each_client() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = name_backend("n1").await;
    let n2 = name_backend("n2").await;
    let n3 = name_backend("n3").await;
    let mut twins = Vec::new();
    for twin in ["east", "west"] {
        let twin_dir = dir.path().join(twin);
        std::fs::create_dir_all(&twin_dir).unwrap();
        let file = example(
            "twin.toml",
            &twin_dir,
            &[
                ("0.0.0.0:8443", "127.0.0.1:0".into()),
                ("192.0.2.21:8443", n1.to_string()),
                ("192.0.2.22:8443", n2.to_string()),
                ("192.0.2.23:8443", n3.to_string()),
                ("127.0.0.1:9900", "127.0.0.1:0".into()),
            ],
        );
        twins.push(run(&file));
    }
    let (east, west) = (twins[0].1, twins[1].1);
    let mut chosen = std::collections::BTreeSet::new();
    for client in 10..40u8 {
        let from = IpAddr::from([127, 0, 1, client]);
        let via_east = read_from(from, east).await;
        let via_west = read_from(from, west).await;
        assert_eq!(via_east, via_west, "client {from}: both twins choose the same node");
        assert_eq!(
            read_from(from, east).await,
            via_east,
            "client {from}: the choice is stable"
        );
        chosen.insert(via_east);
    }
    assert_eq!(chosen.len(), 3, "the clients spread over all nodes: {chosen:?}");
}

/// Client load for the controller test: connections opened one after another,
/// a few milliseconds apart, until `stop` (or a minute, or 10 000 connections);
/// every one must be served. The name of each serving node is appended to `seen`.
async fn load(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Mutex<Vec<String>>>) -> usize {
    let started = std::time::Instant::now();
    let mut served = 0;
    while !stop.load(Ordering::Relaxed) && served < 10_000 && started.elapsed() < Duration::from_secs(60) {
        let name = read_all(addr).await;
        assert!(!name.is_empty(), "a client connection under load was not served");
        seen.lock().unwrap().push(name);
        served += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    served
}

/// Waits until the load has been served by a node of `cluster` after the
/// first `since` connections; returns how many it has seen now.
async fn load_reaches(seen: &Mutex<Vec<String>>, since: usize, cluster: &str) -> usize {
    wait_for(&format!("the load to reach {cluster}"), || async {
        let seen = seen.lock().unwrap();
        let reached = seen[since.min(seen.len())..].iter().any(|n| n.starts_with(cluster));
        reached.then_some(seen.len())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_redirects_a_service_and_back_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dead_addr();
    let mut replace = vec![
        ("0.0.0.0:9000", "127.0.0.1:0".to_string()),
        ("127.0.0.1:9900", admin.to_string()),
    ];
    for (placeholder, name) in [
        ("192.0.2.31:9000", "blue-1"),
        ("192.0.2.32:9000", "blue-2"),
        ("192.0.2.41:9000", "green-1"),
        ("192.0.2.42:9000", "green-2"),
    ] {
        replace.push((placeholder, name_backend(name).await.to_string()));
    }
    let file = example("controller.toml", dir.path(), &replace);
    let (_balancer, addr) = run(&file);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load(addr, stop.clone(), seen.clone())))
        .collect();
    let before = load_reaches(&seen, 0, "blue-").await;

    // The controller redirects to green with ctl: from then on new connections go to green.
    let admin_arg = admin.to_string();
    let ctl = within(
        "ctl redirect",
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["ctl", "--admin", &admin_arg, "redirect", "api", "green"])
                .output()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        ctl.status.success(),
        "ctl redirect: {}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    for _ in 0..3 {
        let name = read_all(addr).await;
        assert!(
            name.starts_with("green-"),
            "after the redirect a new connection goes to green, got {name:?}"
        );
    }
    let on_green = load_reaches(&seen, before, "green-").await;

    // And back to blue through the admin API itself.
    let reply = api(
        &admin.to_string(),
        None,
        hyper::Method::PUT,
        "/api/v1/services/api/cluster",
        Some(r#"{"cluster":"blue"}"#),
    )
    .await;
    assert_eq!(reply.status, 200, "redirect back to blue: {}", reply.text());
    for _ in 0..3 {
        let name = read_all(addr).await;
        assert!(
            name.starts_with("blue-"),
            "after the redirect back a new connection goes to blue, got {name:?}"
        );
    }
    load_reaches(&seen, on_green, "blue-").await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        within("a load client", client)
            .await
            .expect("no client connection under load failed");
    }
}
