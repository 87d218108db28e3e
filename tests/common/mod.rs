//! Helpers shared by the admin, reload, redirect, ctl and dashboard tests:
//! real backends on loopback ports, config text, admin API calls.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use protobalance::admin::client::{self, Reply};
use protobalance::config::Config;
use protobalance::server::Server;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything a loaded 2-core machine must finish.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A backend that echoes every byte back, then closes when the client does.
pub async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A backend that answers every connection with `tag` and a newline, then closes.
pub async fn tag_backend(tag: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = format!("{tag}\n");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Connects to `addr` and reads the whole answer of a tag backend.
pub async fn read_tag(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text.trim_end().to_string())
}

/// `[[cluster]]` text with one node per `(name, address)`.
pub fn cluster_toml(name: &str, nodes: &[(&str, SocketAddr)]) -> String {
    let mut text = format!("[[cluster]]\nname = \"{name}\"\n");
    for (node, addr) in nodes {
        text.push_str(&format!("[[cluster.node]]\nname = \"{node}\"\naddress = \"{addr}\"\n"));
    }
    text
}

/// `[[service]]` text listening on a kernel-chosen loopback port.
pub fn service_toml(name: &str, cluster: &str) -> String {
    format!("[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"{cluster}\"\n")
}

/// The head of a config: no state, admin on a free loopback port, optional token.
pub fn head_toml(token: Option<&str>) -> String {
    let mut text = String::from("state_dir = \"\"\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    if let Some(t) = token {
        text.push_str(&format!("token = \"{t}\"\n"));
    }
    text
}

/// A server started from `text` written to a file (so reloads can re-read
/// it), with its admin API; returns the server, the admin address and the file.
pub async fn start_from_file(text: &str) -> (Arc<Server>, String, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let config = Config::load(file.path()).unwrap();
    let server = Server::start(&config).await.unwrap();
    server.set_config_path(file.path().to_path_buf());
    let admin = server.start_admin().await.unwrap().to_string();
    (server, admin, file)
}

/// One admin API call; panics only if the API cannot be reached.
pub async fn api(admin: &str, token: Option<&str>, method: Method, path: &str, body: Option<&str>) -> Reply {
    client::request(admin, token, method, path, body).await.unwrap()
}

/// `GET /api/v1/status` as JSON.
pub async fn status(admin: &str, token: Option<&str>) -> Value {
    let reply = api(admin, token, Method::GET, "/api/v1/status", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// The status entry of node `node` of cluster `cluster`.
pub fn node_status<'a>(status: &'a Value, cluster: &str, node: &str) -> &'a Value {
    let c = status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {status}"));
    c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {c}"))
}

/// The status entry of service `service`.
pub fn service_status<'a>(status: &'a Value, service: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("no service {service} in {status}"))
}

/// Polls `condition` every 20 ms until it holds, failing after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
