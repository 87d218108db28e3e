//! A balancer under test: from the library in the test's own process
//! ([`ConfigText::start`], [`ConfigText::start_with_admin`]), or the binary as
//! a child process ([`Running`]); and calls to its admin API.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};

use protobalance::config::Config;
use protobalance::server::{Options, Server, StartError};

use super::{BIN, ConfigText, PATIENCE, wait_until_blocking};

impl ConfigText {
    /// Starts a balancer for this config; returns it and the address of the
    /// first service's first listener.
    pub async fn start(&self) -> (Server, SocketAddr) {
        self.start_with(Options::default()).await
    }

    /// As [`ConfigText::start`], with start `options` (a manual wall clock, say).
    pub async fn start_with(&self, options: Options) -> (Server, SocketAddr) {
        let server = Server::start_with(&self.config(), options)
            .await
            .unwrap_or_else(|e| panic!("the balancer does not start: {e}\n{}", self.text()));
        let first = self.first_service().expect("the config has a service");
        let addr = server
            .addr_of(&first)
            .unwrap_or_else(|| panic!("service {first} does not listen"));
        (server, addr)
    }

    /// Starts a balancer for this config, or says why it cannot.
    pub async fn try_start(&self) -> Result<Server, StartError> {
        Server::start(&self.config()).await
    }

    /// A balancer started from this config written to a file (so that reloads
    /// re-read it), with its admin API: the server, the admin address and the
    /// file, which a test may rewrite.
    pub async fn start_with_admin(&self) -> (Server, String, tempfile::NamedTempFile) {
        let file = self.file();
        let config = Config::load(file.path()).unwrap_or_else(|e| panic!("test config refused: {e}"));
        let server = Server::start(&config).await.expect("the balancer starts");
        server.set_config_path(file.path().to_path_buf());
        let admin = server.start_admin().await.expect("the admin API starts").to_string();
        (server, admin, file)
    }
}

/// A balancer from a file: service `web` on cluster blue (nodes a, b), and a
/// cluster green (node g), all echo nodes, admin API with `token`.
pub async fn start_web_blue_green(token: &str) -> (Server, String, tempfile::NamedTempFile) {
    use super::{Cluster, Service, echo_backend};
    let (a, b, g) = (echo_backend().await, echo_backend().await, echo_backend().await);
    ConfigText::new()
        .token(token)
        .service(Service::new("web", "blue"))
        .cluster(Cluster::of("blue", &[("a", a), ("b", b)]))
        .cluster(Cluster::of("green", &[("g", g)]))
        .start_with_admin()
        .await
}

/// A child process whose output lines (stdout and stderr) arrive on a
/// channel; killed on drop. Started with `RUST_LOG=info`.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line the process wrote, read or not.
    history: Arc<Mutex<Vec<String>>>,
    /// The config file of `protobalance run`, kept while the process runs.
    config: Option<tempfile::NamedTempFile>,
}

impl Running {
    /// Runs the balancer binary with `args`.
    pub fn spawn(args: &[&str]) -> Running {
        let mut command = Command::new(BIN);
        command.args(args);
        Running::start(command)
    }

    /// `protobalance run --config FILE ARGS...` with `config` in FILE.
    pub fn run(config: &ConfigText, args: &[&str]) -> Running {
        Running::run_with(config, args, |_| {})
    }

    /// As [`Running::run`], with `tweak` applied to the command first (a
    /// lowered descriptor limit in `pre_exec`, say).
    pub fn run_with(config: &ConfigText, args: &[&str], tweak: impl FnOnce(&mut Command)) -> Running {
        let file = config.file();
        let mut command = Command::new(BIN);
        command.args(["run", "--config"]).arg(file.path()).args(args);
        tweak(&mut command);
        let mut running = Running::start(command);
        running.config = Some(file);
        running
    }

    /// Runs `command` (its output is captured here).
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let history = Arc::new(Mutex::new(Vec::new()));
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
        Running {
            child,
            lines,
            history,
            config: None,
        }
    }

    /// The config file of a process started by [`Running::run`].
    pub fn config_path(&self) -> &Path {
        self.config.as_ref().expect("started by Running::run").path()
    }

    /// Waits for an output line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no output line containing {needle:?} within {PATIENCE:?}; so far:\n{}",
                    self.history.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// Every line the process wrote, once it has closed its output.
    pub fn all_output(&self) -> Vec<String> {
        while let Ok(_line) = self.lines.recv_timeout(PATIENCE) {}
        self.history.lock().unwrap().clone()
    }

    /// Waits until the balancer says it is ready (`protobalance VERSION
    /// running: ...`): start-up is over, every listener open.
    pub fn ready(&self) {
        self.logged(|l| l.contains(" running: "));
    }

    /// The address of the first service listener it logged (`listening on
    /// ADDR`; the admin API's `admin listening on` line is not one).
    pub fn listen_addr(&self) -> SocketAddr {
        let line = self.logged(|l| l.contains("listening on ") && !l.contains("admin listening on "));
        word_after(&line, "listening on ").parse().unwrap()
    }

    /// The admin API's address, from its `admin listening on ADDR` log line.
    pub fn admin_addr(&self) -> String {
        word_after(
            &self.logged(|l| l.contains("admin listening on ")),
            "admin listening on ",
        )
    }

    /// The first line written so far, or arriving within [`PATIENCE`], that
    /// matches `wanted`, whether or not [`Running::wait_for`] has read past it.
    fn logged(&self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self.history.lock().unwrap().iter().find(|l| wanted(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.lines.recv_timeout(left).is_err() {
                panic!(
                    "no such output line within {PATIENCE:?}; so far:\n{}",
                    self.history.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// Sends `sig`, which the process handles (SIGTERM, SIGHUP), once its
    /// handler is installed: the balancer installs it after logging that it
    /// listens, and until then the signal's default action would kill it.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id();
        wait_until_blocking(&format!("process {pid} to catch signal {sig}"), || catches(pid, sig));
        // SAFETY: kill(2) on the pid of our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        wait_until_blocking("the process to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

/// Whether process `pid` has a handler for `sig` (its `SigCgt` mask in
/// /proc/PID/status).
fn catches(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

fn word_after(line: &str, needle: &str) -> String {
    line.split(needle)
        .nth(1)
        // A text line's next word, or a JSON line's string value (up to its quote).
        .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == '"').next())
        .unwrap_or_else(|| panic!("no word after {needle:?} in {line:?}"))
        .to_string()
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The admin API

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

/// An answer read off the wire by [`raw_http`].
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawReply {
    /// The value of header `name` (any case), if the answer has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as it is (it should say `Connection: close`) to the TCP
/// address `addr` and reads the whole answer; for requests the client of
/// [`api`] would never send (another `Host`, an `Origin`, any content type).
pub async fn raw_http(addr: &str, request: &str) -> RawReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = super::within(&format!("an answer to {request:?}"), async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("the admin API listens");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawReply {
        status,
        headers,
        body: body.to_string(),
    }
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
