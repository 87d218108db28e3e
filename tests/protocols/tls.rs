//! TLS passthrough routing by server name (`[[service.route]]`): three nginx
//! with certificates of their own (made here with `openssl req`) behind one
//! listener; curl verifies each certificate, so a client that reached the
//! wrong nginx would fail its handshake.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{Cluster, ConfigText, Node, PATIENCE, Service, require_tools, tool};
use crate::{Daemon, curl, free_port, run_client, work_dir};

/// A self-signed certificate and key for `names` (the first is the subject).
fn certificate(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf) {
    let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    crate::common::self_signed(dir, names[0], &sans)
}

/// nginx serving HTTPS with its own certificate, answering `/id` with its name.
fn tls_nginx(name: &str, dir: &Path, port: u16, names: &[&str]) -> (Daemon, PathBuf) {
    let (cert, key) = certificate(&dir.join("tls"), names);
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/id"), name).unwrap();
    let lines = format!(
        "    ssl_certificate {};\n    ssl_certificate_key {};\n",
        cert.display(),
        key.display()
    );
    (crate::http::nginx_with(name, dir, port, "ssl", &lines), cert)
}

/// `GET /id` over HTTPS for `name`, resolved to the balancer, verified against `ca`.
async fn id_for(name: &str, port: u16, ca: &Path) -> String {
    let out = run_client({
        let mut c = curl();
        c.arg("--resolve")
            .arg(format!("{name}:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(ca)
            .arg(format!("https://{name}:{port}/id"));
        c
    })
    .await;
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_for_each_name_reaches_its_own_nginx_and_verifies_its_certificate() {
    if !require_tools(&["nginx", "curl", "openssl"]) {
        return;
    }
    let work = work_dir();
    let mut daemons = Vec::new();
    let mut cas = Vec::new();
    let mut config = ConfigText::new();
    let mut ports = Vec::new();
    for (name, names) in [
        ("a", &["a.test"][..]),
        ("b", &["b.test", "*.b.test"][..]),
        ("default", &["default.test"][..]),
    ] {
        let port = free_port("127.0.0.1");
        let (daemon, ca) = tls_nginx(name, &work.path().join(name), port, names);
        daemons.push(daemon);
        cas.push(ca);
        ports.push(port);
        config = config.cluster(Cluster::new(name).node(Node::new(name, format!("127.0.0.1:{port}"))));
    }
    let config = config.service(Service::new("tls", "default").key(
        "[[service.route]]\nsni = [\"a.test\"]\ncluster = \"a\"\n\
         [[service.route]]\nsni = [\"b.test\", \"*.b.test\"]\ncluster = \"b\"",
    ));
    let (server, listen) = config.start().await;
    let port = listen.port();
    assert_eq!(id_for("a.test", port, &cas[0]).await, "a");
    assert_eq!(id_for("b.test", port, &cas[1]).await, "b");
    assert_eq!(id_for("www.B.test", port, &cas[1]).await, "b", "wildcard, any case");
    // No route for the name: the service's own cluster, with its certificate.
    assert_eq!(id_for("default.test", port, &cas[2]).await, "default");

    // No server name at all: the service's cluster.
    let mut s_client = Command::new(tool("openssl"));
    s_client
        .args(["s_client", "-noservername", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = s_client.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"GET /id HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        // Kept open until the answer is in: s_client quits on its stdin's end.
        let out = crate::common::within("s_client's answer", async {
            tokio::task::spawn_blocking(move || {
                let mut text = String::new();
                std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut text).unwrap();
                let _ = child.wait();
                text
            })
            .await
            .unwrap()
        })
        .await;
        drop(stdin);
        assert!(out.ends_with("default"), "{out:?}");
    }
    let status = server.snapshot();
    let counts: Vec<u64> = status.services["tls"]
        .route_connections
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(counts, vec![1, 2], "connections routed per route");
    server.shutdown(PATIENCE).await;
    drop(daemons);
}
