//! Helpers shared by the integration tests: a balancer started from the
//! library on ephemeral loopback ports, and small real backends.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use protobalance::config::Config;
use protobalance::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The balancer binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_protobalance");

/// Generous bound for anything a test waits on: the suite runs on a loaded
/// 2-core machine, and a hang must fail the test rather than block it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `f`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Parses config text written by a test.
pub fn config(text: &str) -> Config {
    Config::parse(text, "test config").unwrap_or_else(|e| panic!("test config refused: {e}\n{text}"))
}

/// One service `svc` on an ephemeral port, one cluster `pool` with `nodes`
/// (name, address, weight), and `extra` lines appended to the cluster table.
pub fn one_service(nodes: &[(&str, SocketAddr, u32)], extra: &str) -> Config {
    let mut text = String::from(
        "state_dir = \"\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"svc\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"pool\"\n\
         [[cluster]]\nname = \"pool\"\n",
    );
    text.push_str(extra);
    text.push('\n');
    for (name, addr, weight) in nodes {
        text.push_str(&format!(
            "[[cluster.node]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    config(&text)
}

/// Starts a balancer for `config`; returns it and the address of service `svc`.
pub async fn start(config: &Config) -> (Server, SocketAddr) {
    let server = Server::start(config).await.expect("balancer starts");
    let addr = server.addr_of("svc").expect("service svc listens");
    (server, addr)
}

/// A backend that sends its name to every client, then closes.
pub async fn name_backend(name: &'static str) -> SocketAddr {
    serve(move |mut s| async move {
        let _ = s.write_all(name.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// A backend that echoes everything back and half-closes after the client does.
pub async fn echo_backend() -> SocketAddr {
    serve(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A backend on a free loopback port running `handler` for every connection
/// (TCP_NODELAY set, as a real server would for request/response traffic).
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handler(stream));
        }
    });
    addr
}

/// Connects, reads everything until EOF, returns it as text.
pub async fn read_all(addr: SocketAddr) -> String {
    within("read_all", async {
        let mut s = TcpStream::connect(addr).await.expect("connect to the balancer");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read until EOF");
        out
    })
    .await
}

/// An address on which nothing listens (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

/// A child process whose stderr lines arrive on a channel; killed on drop.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line the process wrote, read or not.
    history: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    /// Runs the balancer binary with `args`.
    pub fn spawn(args: &[&str]) -> Running {
        let mut command = Command::new(BIN);
        command.args(args);
        Running::start(command)
    }

    /// Runs `command` (its output is captured here).
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (tx, history) = (tx.clone(), history.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    history.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Running { child, lines, history }
    }

    /// Waits for an output line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no output line containing {needle:?}"),
            }
        }
    }

    /// Every line the process wrote, once it has closed its output.
    pub fn all_output(&self) -> Vec<String> {
        while let Ok(_line) = self.lines.recv_timeout(PATIENCE) {}
        self.history.lock().unwrap().clone()
    }

    /// Whether an output line seen so far, or arriving within a second, contains `needle`.
    pub fn saw(&self, needle: &str) -> bool {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// The address in the first `listening on ADDR` log line.
    pub fn listen_addr(&self) -> SocketAddr {
        self.addr_after("listening on ").parse().unwrap()
    }

    /// The admin API's address, from its `admin listening on ADDR` log line.
    pub fn admin_addr(&self) -> String {
        self.addr_after("admin listening on ")
    }

    fn addr_after(&self, needle: &str) -> String {
        let line = self.wait_for(needle);
        line.split(needle)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Control plane: config text, a balancer started from a file with its admin
// API, and admin API calls.

/// Connects to `addr` and reads the whole answer (trimmed), or the I/O error.
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

/// A balancer started from `text` written to a file (so that reloads re-read
/// it), with its admin API: the server, the admin address and the file.
/// A balancer from a file: service `web` on cluster blue (nodes a, b), and a
/// cluster green (node g), all echo nodes, admin API with `token`.
pub async fn start_web_blue_green(token: &str) -> (Server, String, tempfile::NamedTempFile) {
    let (a, b, g) = (echo_backend().await, echo_backend().await, echo_backend().await);
    let text = format!(
        "{}{}{}{}",
        head_toml(Some(token)),
        service_toml("web", "blue"),
        cluster_toml("blue", &[("a", a), ("b", b)]),
        cluster_toml("green", &[("g", g)])
    );
    start_from_file(&text).await
}

pub async fn start_from_file(text: &str) -> (Server, String, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let config = Config::load(file.path()).unwrap();
    let server = Server::start(&config).await.unwrap();
    server.set_config_path(file.path().to_path_buf());
    let admin = server.start_admin().await.unwrap().to_string();
    (server, admin, file)
}

/// One admin API call; panics only if the API cannot be reached.
pub async fn api(
    admin: &str,
    token: Option<&str>,
    method: hyper::Method,
    path: &str,
    body: Option<&str>,
) -> protobalance::admin::client::Reply {
    protobalance::admin::client::request(admin, token, method, path, body)
        .await
        .unwrap()
}

/// `GET /api/v1/status` as JSON.
pub async fn status(admin: &str, token: Option<&str>) -> serde_json::Value {
    let reply = api(admin, token, hyper::Method::GET, "/api/v1/status", None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// The status entry of node `node` of cluster `cluster`.
pub fn node_status<'a>(status: &'a serde_json::Value, cluster: &str, node: &str) -> &'a serde_json::Value {
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
pub fn service_status<'a>(status: &'a serde_json::Value, service: &str) -> &'a serde_json::Value {
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
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a bad request must leave alone: states, clusters, listeners.
pub fn control_view(status: &serde_json::Value) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = status["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |n| serde_json::json!([c["name"], n["name"], n["address"], n["state"]]))
        })
        .collect();
    let services: Vec<serde_json::Value> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::json!([s["name"], s["cluster"], s["bound"]]))
        .collect();
    serde_json::json!({ "nodes": nodes, "services": services })
}
