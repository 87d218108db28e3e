//! HTTP: two nginx instances, curl through the balancer.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::common::{Cluster, ConfigText, Node, PATIENCE, random_bytes, require_tools, tool};
use crate::{Daemon, curl, free_port, run_client, work_dir};

const TEN_MB: usize = 10 * 1024 * 1024;

/// nginx in the foreground, one process, serving `dir/www` on `port`.
fn nginx(name: &str, dir: &Path, port: u16) -> Daemon {
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
           server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n  }}\n}}\n"
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
