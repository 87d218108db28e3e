//! Active checks against real servers: nginx turning from 200 to 503 on
//! `/healthz`, exim, dovecot (IMAP and POP3) and vsftpd stopped and started
//! again; and a port-following FTP cluster that a scan of its passive ports
//! does not take out of service.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{
    Cluster, ConfigText, Node, NodeFigures, PATIENCE, Server, Service, ip, random_bytes, require_tools, wait_until,
};
use crate::{Daemon, curl, free_port, require_root, run_client, work_dir};

/// The check interval here: short, so a test takes seconds.
const INTERVAL: Duration = Duration::from_millis(300);
/// What a loaded 2-core machine may add to the rule's own bound.
const MARGIN: Duration = Duration::from_secs(3);

fn check(kind: &str, rise: u32, fall: u32) -> String {
    format!(
        "check = {{ type = \"{kind}\", interval = \"{}ms\", timeout = \"250ms\", rise = {rise}, fall = {fall} }}",
        INTERVAL.as_millis()
    )
}

fn figures(server: &Server, cluster: &str, node: &str) -> Arc<NodeFigures> {
    server.snapshot().clusters[cluster].node(node).unwrap().figures.clone()
}

/// Waits until the node's health is `available`; returns how long it took.
async fn until_health(f: &NodeFigures, what: &str, available: bool) -> Duration {
    let start = Instant::now();
    wait_until(&format!("{what} available = {available}"), || async {
        f.is_available() == available
    })
    .await;
    start.elapsed()
}

/// nginx that answers `/healthz` with 200 while `www/healthz` exists, else 503,
/// and `/id` with its name.
fn nginx_with_healthz(name: &str, dir: &Path, port: u16) -> Daemon {
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/id"), name).unwrap();
    std::fs::write(dir.join("www/healthz"), "ok").unwrap();
    crate::http::nginx_with(
        name,
        dir,
        port,
        "",
        "    location = /healthz { try_files /healthz =503; }",
    )
}

async fn fetch(url: String) -> String {
    let out = run_client({
        let mut c = curl();
        c.arg(url);
        c
    })
    .await;
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_answering_503_on_its_health_path_is_taken_out_and_back() {
    if !require_tools(&["nginx", "curl"]) {
        return;
    }
    let work = work_dir();
    let mut cluster = Cluster::new("web").key(&check("http", 2, 3).replace(" }", ", path = \"/healthz\" }"));
    let mut daemons = Vec::new();
    for name in ["one", "two"] {
        let port = free_port("127.0.0.1");
        daemons.push(nginx_with_healthz(name, &work.path().join(name), port));
        cluster = cluster.node(Node::new(name, format!("127.0.0.1:{port}")));
    }
    let (server, web) = ConfigText::one_service(cluster).start().await;
    let one = figures(&server, "web", "one");
    wait_until("one's first check", || async {
        one.check_report().is_some_and(|r| r.passing)
    })
    .await;

    std::fs::remove_file(work.path().join("one/www/healthz")).unwrap();
    let out = until_health(&one, "nginx one", false).await;
    assert!(out < INTERVAL * 4 + MARGIN, "out after {out:?} (fall = 3)");
    let report = one.check_report().unwrap();
    assert_eq!(report.last_error.as_deref(), Some("status 503"), "{report:?}");
    for _ in 0..4 {
        assert_eq!(
            fetch(format!("http://{web}/id")).await,
            "two",
            "clients all reach two meanwhile"
        );
    }
    std::fs::write(work.path().join("one/www/healthz"), "ok").unwrap();
    let back = until_health(&one, "nginx one", true).await;
    assert!(back < INTERVAL * 3 + MARGIN, "back after {back:?} (rise = 2)");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(fetch(format!("http://{web}/id")).await);
    }
    assert!(ids.contains(&"one".to_string()), "one serves again: {ids:?}");
    server.shutdown(PATIENCE).await;
    drop(daemons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exim_stopped_fails_its_smtp_check_and_started_passes_it() {
    if !require_tools(&["exim4"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let dir = work.path().join("mx");
    let port = free_port("127.0.0.1");
    let exim = crate::mail::exim("mx", &dir, port);
    let cluster = Cluster::new("c")
        .key(&check("smtp", 1, 1))
        .node(Node::new("mx", format!("127.0.0.1:{port}")));
    let (server, _smtp) = ConfigText::one_service(cluster).start().await;
    let f = figures(&server, "c", "mx");
    wait_until("exim's first check", || async {
        f.check_report().is_some_and(|r| r.passing)
    })
    .await;
    assert!(f.is_available());
    drop(exim);
    until_health(&f, "exim", false).await;
    assert_eq!(
        f.check_report().unwrap().last_error.as_deref(),
        Some("connection refused")
    );
    let _exim = crate::mail::exim("mx", &dir, port);
    until_health(&f, "exim", true).await;
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_stopped_fails_its_imap_and_pop3_checks_and_started_passes_them() {
    if !require_tools(&["dovecot"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let dir = work.path().join("store");
    let (imap, pop3) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let dovecot = crate::mail::dovecot("store", &dir, imap, pop3);
    let config = ConfigText::new()
        .service(Service::new("imap", "imap"))
        .service(Service::new("pop3", "pop3"))
        .cluster(
            Cluster::new("imap")
                .key(&check("imap", 1, 2))
                .node(Node::new("d", format!("127.0.0.1:{imap}"))),
        )
        .cluster(
            Cluster::new("pop3")
                .key(&check("pop3", 1, 2))
                .node(Node::new("d", format!("127.0.0.1:{pop3}"))),
        );
    let (server, _addr) = config.start().await;
    let checked = [figures(&server, "imap", "d"), figures(&server, "pop3", "d")];
    for f in &checked {
        wait_until("dovecot's first checks", || async {
            f.check_report().is_some_and(|r| r.passing)
        })
        .await;
    }
    drop(dovecot);
    for f in &checked {
        until_health(f, "dovecot", false).await;
    }
    let _dovecot = crate::mail::dovecot("store", &dir, imap, pop3);
    for f in &checked {
        until_health(f, "dovecot", true).await;
    }
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsftpd_stopped_fails_its_ftp_check_and_started_passes_it() {
    if !require_tools(&["vsftpd"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let dir = work.path().join("ftp");
    let control = free_port("127.0.0.1");
    let passive_port = free_port("127.0.0.1");
    let passive = (passive_port, passive_port);
    let start = || crate::ftp::vsftpd("vsftpd", &dir, ip(0, 0, 1), control, passive, ip(0, 0, 1));
    let vsftpd = start();
    let cluster = Cluster::new("c")
        .key(&check("ftp", 1, 1))
        .node(Node::new("f", format!("127.0.0.1:{control}")));
    let (server, _addr) = ConfigText::one_service(cluster).start().await;
    let f = figures(&server, "c", "f");
    wait_until("vsftpd's first check", || async {
        f.check_report().is_some_and(|r| r.passing)
    })
    .await;
    drop(vsftpd);
    until_health(&f, "vsftpd", false).await;
    let _vsftpd = start();
    until_health(&f, "vsftpd", true).await;
    server.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ftp_works_after_a_scan_of_every_passive_port() {
    if !require_tools(&["vsftpd", "curl"]) || !require_root() {
        return;
    }
    let work = work_dir();
    let (server, control, passive) = crate::ftp::start_balancer("algorithm = \"round-robin\"\naffinity = true").await;
    let _daemons = crate::ftp::two_vsftpd(work.path(), control, passive);
    // A scanner connects to every port of the passive range, from several
    // addresses so both nodes are hit: nobody opened those ports, so each
    // connect is refused by the node.
    for port in passive.0..=passive.1 {
        for scanner in [40u8, 41] {
            let s = crate::common::connect_from(ip(0, 0, scanner), SocketAddr::from(([127, 0, 0, 1], port))).await;
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut { s }, &mut sink).await;
        }
    }
    let snapshot = server.snapshot();
    for node in &snapshot.clusters["ftp"].nodes {
        assert!(node.figures.is_available(), "node {} stays in service", node.name);
    }
    assert!(
        snapshot.clusters["ftp"]
            .nodes
            .iter()
            .any(|n| !n.figures.down_ports().is_empty()),
        "the refused passive ports are down, each alone"
    );
    // A full passive upload and download with a real client.
    let sent = random_bytes(128 * 1024);
    let local = work.path().join("up.bin");
    std::fs::write(&local, &sent).unwrap();
    let back = work.path().join("back.bin");
    crate::ftp::upload_and_download(control, &ip(0, 0, 50).to_string(), &local, &back).await;
    assert!(std::fs::read(&back).unwrap() == sent, "the download is the upload");
    server.shutdown(PATIENCE).await;
}
