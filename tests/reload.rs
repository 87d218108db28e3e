//! Reconfiguration on the fly: established connections survive, listeners
//! follow the file, figures survive for nodes that stay, bad files change
//! nothing, and the rules for run-time states and redirects across a reload.

mod common;

use common::*;
use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const SIZE: usize = 50 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// The byte at `i` of the test stream: a pattern that catches lost, doubled or reordered chunks.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_a_50_mb_transfer_byte_exact() {
    let (stay, gone, fresh) = (echo_backend().await, echo_backend().await, echo_backend().await);
    let (server, admin, file) = ConfigText::new()
        .service(Service::new("web", "main"))
        .service(Service::new("old", "spare"))
        .cluster(Cluster::of("main", &[("stay", stay), ("gone", gone)]))
        .cluster(Cluster::of("spare", &[("s", gone)]))
        .start_with_admin()
        .await;
    let web = server.addr_of("web").unwrap();
    let old_addr = server.addr_of("old").unwrap();
    // Only "stay" takes new connections, so the transfer goes through it.
    server.set_node_state("main", "gone", NodeState::Yellow).unwrap();

    let (halfway_tx, halfway_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let transfer = tokio::spawn(async move {
        let stream = TcpStream::connect(web).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            let mut halfway = Some((halfway_tx, go_rx));
            let mut buf = vec![0u8; CHUNK];
            for start in (0..SIZE).step_by(CHUNK) {
                if start >= SIZE / 5
                    && let Some((tx, rx)) = halfway.take()
                {
                    // A fifth sent: let the test reload, continue when it has.
                    tx.send(()).unwrap();
                    rx.await.unwrap();
                }
                for (k, b) in buf.iter_mut().enumerate() {
                    *b = pattern(start + k);
                }
                w.write_all(&buf).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut received = 0usize;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(received + k), "byte {} differs", received + k);
            }
            received += n;
        }
        writer.await.unwrap();
        received
    });

    halfway_rx.await.unwrap();
    let before = status(&admin, None).await;
    assert_eq!(node_status(&before, "main", "stay")["active_connections"], 1);

    // New file: "gone" and service "old" removed, service "new" and node "fresh" added.
    let new = ConfigText::new()
        .service(Service::new("web", "main"))
        .service(Service::new("new", "main"))
        .cluster(Cluster::of("main", &[("stay", stay), ("fresh", fresh)]))
        .cluster(Cluster::of("spare", &[("s", gone)]));
    std::fs::write(file.path(), new.text()).unwrap();
    let reply = api(&admin, None, Method::POST, "/api/v1/reload", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["closed"],
        serde_json::json!([format!("old {}", "127.0.0.1:0")])
    );
    go_tx.send(()).unwrap();

    let received = within("the transfer finishes", transfer).await.unwrap();
    assert_eq!(received, SIZE);
    // The last chunk is counted once its write returned, which may be just
    // after the client has read it.
    wait_until("the last chunk to be counted", || async {
        node_status(&status(&admin, None).await, "main", "stay")["bytes_out"] == SIZE as u64
    })
    .await;

    let after = status(&admin, None).await;
    let stay_after = node_status(&after, "main", "stay");
    assert_eq!(stay_after["total_connections"], 1, "figures survive the reload");
    assert_eq!(stay_after["bytes_in"], SIZE as u64);
    assert_eq!(stay_after["bytes_out"], SIZE as u64);
    assert_eq!(node_status(&after, "main", "fresh")["total_connections"], 0);
    assert!(
        TcpStream::connect(old_addr).await.is_err(),
        "the removed listener is closed"
    );
    let new_addr = server.addr_of("new").expect("the added service listens");
    let mut c = TcpStream::connect(new_addr).await.unwrap();
    c.write_all(b"hi").await.unwrap();
    c.read_exact(&mut [0u8; 2]).await.unwrap();
    drop(c);
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn run_time_state_is_kept_until_the_file_changes_it() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let file = |a_state: &str, b_state: &str| {
        ConfigText::new().service(Service::new("web", "c")).cluster(
            Cluster::new("c")
                .node(Node::new("a", a).key(&format!("state = \"{a_state}\"")))
                .node(Node::new("b", b).key(&format!("state = \"{b_state}\""))),
        )
    };
    let (server, admin, path) = file("green", "green").start_with_admin().await;
    let state = |s: &serde_json::Value, n: &str| node_status(s, "c", n)["state"].as_str().unwrap().to_string();
    server.set_node_state("c", "a", NodeState::Yellow).unwrap();

    // The file does not change a's state: the run-time yellow stays.
    std::fs::write(path.path(), file("green", "red").text()).unwrap();
    server.reload().await.unwrap();
    let s = status(&admin, None).await;
    assert_eq!(state(&s, "a"), "yellow");
    assert_eq!(state(&s, "b"), "red", "the file's change applies");

    // The file changes a's state: the file wins.
    std::fs::write(path.path(), file("red", "red").text()).unwrap();
    server.reload().await.unwrap();
    assert_eq!(state(&status(&admin, None).await, "a"), "red");
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn redirect_is_kept_until_the_file_changes_that_service() {
    let (blue, green, red) = (
        name_backend("blue").await,
        name_backend("green").await,
        name_backend("red").await,
    );
    let file = |cluster: &str| {
        ConfigText::new()
            .service(Service::new("web", cluster))
            .cluster(Cluster::of("blue", &[("b", blue)]))
            .cluster(Cluster::of("green", &[("g", green)]))
            .cluster(Cluster::of("red", &[("r", red)]))
    };
    let (server, _admin, path) = file("blue").start_with_admin().await;
    let web = server.addr_of("web").unwrap();
    server.set_service_cluster("web", "green").await.unwrap();
    assert_eq!(read_tag(web).await.unwrap(), "green");

    // Same file: the redirect stays.
    let report = server.reload().await.unwrap();
    assert!(report.redirects_dropped.is_empty());
    assert_eq!(read_tag(web).await.unwrap(), "green");

    // The file changes web's cluster: the file wins.
    std::fs::write(path.path(), file("red").text()).unwrap();
    let report = server.reload().await.unwrap();
    assert_eq!(report.redirects_dropped, vec!["web".to_string()]);
    assert_eq!(read_tag(web).await.unwrap(), "red");
    server.shutdown(PATIENCE).await;
}

#[tokio::test]
async fn a_listener_that_cannot_be_bound_leaves_everything_as_it_was() {
    let backend = name_backend("one").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let (server, admin, file) = ConfigText::new()
        .service(Service::new("web", "c"))
        .cluster(Cluster::of("c", &[("n", backend)]))
        .start_with_admin()
        .await;
    let before = status(&admin, None).await;
    let other = name_backend("two").await;
    let clash = ConfigText::new()
        .service(Service::new("web", "c"))
        .service(Service::new("clash", "c").listen(&["127.0.0.1:0", &taken_addr.to_string()]))
        .cluster(Cluster::of("c", &[("n", other)]));
    std::fs::write(file.path(), clash.text()).unwrap();
    let reply = api(&admin, None, Method::POST, "/api/v1/reload", None).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains(&taken_addr.to_string()), "{}", reply.text());
    let after = status(&admin, None).await;
    assert_eq!(before["services"], after["services"]);
    assert_eq!(node_status(&after, "c", "n")["address"], backend.to_string());
    assert!(server.addr_of("clash").is_none());
    assert_eq!(read_tag(server.addr_of("web").unwrap()).await.unwrap(), "one");
    server.shutdown(PATIENCE).await;
}
