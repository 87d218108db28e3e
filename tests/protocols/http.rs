//! HTTP: two nginx instances, curl through the balancer.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::common::{Cluster, ConfigText, Node, PATIENCE, Service, random_bytes, require_tools, tool};
use crate::{Daemon, curl, free_port, run_client, work_dir};

const TEN_MB: usize = 10 * 1024 * 1024;

/// nginx in the foreground, one process, serving `dir/www` on `port`.
fn nginx(name: &str, dir: &Path, port: u16) -> Daemon {
    nginx_with(name, dir, port, "", "")
}

/// nginx as [`nginx`], with words after its `listen` address (`proxy_protocol`)
/// and lines in its `server` block.
pub(crate) fn nginx_with(name: &str, dir: &Path, port: u16, listen_words: &str, server_lines: &str) -> Daemon {
    for sub in ["www", "tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  default_type application/octet-stream;\n\
           client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
           fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
           server {{\n    listen 127.0.0.1:{port} {listen_words};\n    root {d}/www;\n{server_lines}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut command = Command::new(tool("nginx"));
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-e", "stderr"]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Daemon::start(name, command, dir.join("daemon.log"), &[addr])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_nginx_round_robin_and_ten_mb_byte_identical() {
    if !require_tools(&["nginx", "curl"]) {
        return;
    }
    let work = work_dir();
    let big = random_bytes(TEN_MB);
    let mut cluster = Cluster::new("nginx").key("algorithm = \"round-robin\"");
    let mut daemons = Vec::new();
    for name in ["one", "two"] {
        let dir = work.path().join(name);
        let port = free_port("127.0.0.1");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/id"), name).unwrap();
        std::fs::write(dir.join("www/big.bin"), &big).unwrap();
        daemons.push(nginx(&format!("nginx {name}"), &dir, port));
        cluster = cluster.node(Node::new(name, format!("127.0.0.1:{port}")));
    }
    let (server, web) = ConfigText::one_service(cluster).start().await;

    let mut ids = Vec::new();
    for _ in 0..4 {
        let out = run_client({
            let mut c = curl();
            c.arg(format!("http://{web}/id"));
            c
        })
        .await;
        ids.push(String::from_utf8(out.stdout).unwrap());
    }
    assert!(
        ids[0] != ids[1] && ids[0] == ids[2] && ids[1] == ids[3],
        "round robin alternates between the two nginx: {ids:?}"
    );
    let mut seen = ids.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["one", "two"]);

    let fetched = work.path().join("fetched.bin");
    run_client({
        let mut c = curl();
        c.arg("--output").arg(&fetched).arg(format!("http://{web}/big.bin"));
        c
    })
    .await;
    let got = std::fs::read(&fetched).unwrap();
    assert!(got == big, "10 MB body differs ({} of {TEN_MB} bytes)", got.len());

    server.shutdown(PATIENCE).await;
    drop(daemons);
}

/// nginx that requires the PROXY header and answers `/addr` with the
/// client address the header named.
fn nginx_reporting_proxy_addr(name: &str, dir: &Path) -> (Daemon, u16) {
    let port = free_port("127.0.0.1");
    let daemon = nginx_with(
        name,
        dir,
        port,
        "proxy_protocol",
        "    location = /addr { return 200 \"$proxy_protocol_addr\"; }",
    );
    (daemon, port)
}

/// `GET /addr` through `web` from the source address `from`.
async fn addr_seen_from(from: &str, web: SocketAddr) -> String {
    let out = run_client({
        let mut c = curl();
        c.args(["--interface", from]).arg(format!("http://{web}/addr"));
        c
    })
    .await;
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_behind_send_proxy_sees_each_clients_own_address() {
    if !require_tools(&["nginx", "curl"]) {
        return;
    }
    let work = work_dir();
    for version in ["v1", "v2"] {
        let (daemon, port) = nginx_reporting_proxy_addr(&format!("nginx {version}"), &work.path().join(version));
        let cluster = Cluster::new("nginx")
            .key(&format!("send_proxy = \"{version}\""))
            .node(Node::new("n", format!("127.0.0.1:{port}")));
        let (server, web) = ConfigText::one_service(cluster).start().await;
        for client in ["127.0.0.21", "127.0.0.22"] {
            assert_eq!(addr_seen_from(client, web).await, client, "send_proxy = {version}");
        }
        server.shutdown(PATIENCE).await;
        drop(daemon);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_names_the_client_that_reaches_nginx() {
    if !require_tools(&["haproxy", "nginx", "curl"]) {
        return;
    }
    let work = work_dir();
    let (nginx, nginx_port) = nginx_reporting_proxy_addr("nginx", &work.path().join("nginx"));
    // Proto Balance trusts HAProxy's header and tells nginx in its own.
    let cluster = Cluster::new("nginx")
        .key("send_proxy = \"v1\"")
        .node(Node::new("n", format!("127.0.0.1:{nginx_port}")));
    let service = Service::new("web", "nginx").key("accept_proxy_from = [\"127.0.0.1/32\"]");
    let (server, balancer) = ConfigText::new().service(service).cluster(cluster).start().await;
    let front = free_port("127.0.0.1");
    let conf = work.path().join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n\
             backend b\n  server pb {balancer} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(tool("haproxy"));
    command.arg("-db").arg("-f").arg(&conf);
    let haproxy = Daemon::start(
        "haproxy",
        command,
        work.path().join("haproxy.log"),
        &[SocketAddr::from(([127, 0, 0, 1], front))],
    );
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    for client in ["127.0.0.23", "127.0.0.24"] {
        assert_eq!(
            addr_seen_from(client, front).await,
            client,
            "through HAProxy and Proto Balance"
        );
    }
    server.shutdown(PATIENCE).await;
    drop((haproxy, nginx));
}
