//! Config text for tests: [`ConfigText`] builds it from services, clusters and
//! nodes, each with any extra `key = value` lines; a test that is about the
//! raw text itself (line numbers, fuzzing) writes the text and uses
//! [`parse_config`], [`config_error`] or [`toml_file`].
//!
//! Defaults keep a test on its own: no state directory, the admin API on a
//! kernel-chosen loopback port, a 5 s shutdown grace, listeners on
//! `127.0.0.1:0`.

use std::fmt::Display;

use protobalance::config::Config;

/// A whole config file, rendered by [`ConfigText::text`].
#[derive(Clone, Debug)]
pub struct ConfigText {
    state_dir: String,
    shutdown_grace: String,
    top: Vec<String>,
    admin_listen: String,
    token: Option<String>,
    admin_keys: Vec<String>,
    services: Vec<Service>,
    clusters: Vec<Cluster>,
}

/// One `[[service]]`.
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    cluster: String,
    listen: Vec<String>,
    keys: Vec<String>,
}

/// One `[[cluster]]` with its nodes.
#[derive(Clone, Debug)]
pub struct Cluster {
    name: String,
    keys: Vec<String>,
    nodes: Vec<Node>,
}

/// One `[[cluster.node]]`.
#[derive(Clone, Debug)]
pub struct Node {
    name: String,
    address: String,
    keys: Vec<String>,
}

impl Default for ConfigText {
    fn default() -> Self {
        ConfigText {
            state_dir: String::new(),
            shutdown_grace: "5s".into(),
            top: Vec::new(),
            admin_listen: "127.0.0.1:0".into(),
            token: None,
            admin_keys: Vec::new(),
            services: Vec::new(),
            clusters: Vec::new(),
        }
    }
}

impl ConfigText {
    pub fn new() -> Self {
        Self::default()
    }

    /// Service `svc` on a kernel-chosen loopback port, served by `cluster`:
    /// the shape most tests need.
    pub fn one_service(cluster: Cluster) -> Self {
        Self::new().service(Service::new("svc", &cluster.name)).cluster(cluster)
    }

    /// Keeps affinity pins (and other state) in `dir`.
    pub fn state_dir(mut self, dir: &std::path::Path) -> Self {
        self.state_dir = dir.display().to_string();
        self
    }

    pub fn shutdown_grace(mut self, grace: &str) -> Self {
        self.shutdown_grace = grace.into();
        self
    }

    /// Top-level `key = value` lines (`threads = 2`, `forwarding = "copy"`, ...).
    pub fn top(mut self, lines: &str) -> Self {
        self.top.push(lines.into());
        self
    }

    pub fn admin_listen(mut self, addr: &str) -> Self {
        self.admin_listen = addr.into();
        self
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn no_token(mut self) -> Self {
        self.token = None;
        self
    }

    /// Extra `key = value` lines for `[admin]` (`allowed_hosts = [...]`, ...).
    pub fn admin_key(mut self, lines: &str) -> Self {
        self.admin_keys.push(lines.into());
        self
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    pub fn cluster(mut self, cluster: Cluster) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// The name of the first `[[service]]`.
    pub fn first_service(&self) -> Option<String> {
        self.services.first().map(|s| s.name.clone())
    }

    /// The file's text.
    pub fn text(&self) -> String {
        let quote = |s: &str| format!("{s:?}");
        let mut t = format!(
            "state_dir = {}\nshutdown_grace = {}\n",
            quote(&self.state_dir),
            quote(&self.shutdown_grace)
        );
        for lines in &self.top {
            t.push_str(lines);
            t.push('\n');
        }
        t.push_str(&format!("[admin]\nlisten = {}\n", quote(&self.admin_listen)));
        if let Some(token) = &self.token {
            t.push_str(&format!("token = {}\n", quote(token)));
        }
        push_lines(&mut t, &self.admin_keys);
        for s in &self.services {
            let listen: Vec<String> = s.listen.iter().map(|l| quote(l)).collect();
            t.push_str(&format!(
                "[[service]]\nname = {}\nlisten = [{}]\ncluster = {}\n",
                quote(&s.name),
                listen.join(", "),
                quote(&s.cluster)
            ));
            push_lines(&mut t, &s.keys);
        }
        for c in &self.clusters {
            t.push_str(&format!("[[cluster]]\nname = {}\n", quote(&c.name)));
            push_lines(&mut t, &c.keys);
            for n in &c.nodes {
                t.push_str(&format!(
                    "[[cluster.node]]\nname = {}\naddress = {}\n",
                    quote(&n.name),
                    quote(&n.address)
                ));
                push_lines(&mut t, &n.keys);
            }
        }
        t
    }

    /// The parsed config; a refusal fails the test, showing the text.
    pub fn config(&self) -> Config {
        parse_config(&self.text())
    }

    /// The text in a `.toml` file that lives as long as the handle.
    pub fn file(&self) -> tempfile::NamedTempFile {
        toml_file(&self.text())
    }
}

fn push_lines(text: &mut String, lines: &[String]) {
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
}

impl Service {
    /// Listening on `127.0.0.1:0` unless [`Service::listen`] says otherwise.
    pub fn new(name: &str, cluster: &str) -> Self {
        Service {
            name: name.into(),
            cluster: cluster.into(),
            listen: vec!["127.0.0.1:0".into()],
            keys: Vec::new(),
        }
    }

    pub fn listen(mut self, specs: &[&str]) -> Self {
        self.listen = specs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Extra `key = value` lines for the service.
    pub fn key(mut self, lines: &str) -> Self {
        self.keys.push(lines.into());
        self
    }
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        Cluster {
            name: name.into(),
            keys: Vec::new(),
            nodes: Vec::new(),
        }
    }

    /// A cluster with one plain node per `(name, address)`.
    pub fn of(name: &str, nodes: &[(&str, std::net::SocketAddr)]) -> Self {
        nodes
            .iter()
            .fold(Cluster::new(name), |c, (n, addr)| c.node(Node::new(n, addr)))
    }

    /// Extra `key = value` lines for the cluster (`algorithm = "ip-hash"`, ...).
    pub fn key(mut self, lines: &str) -> Self {
        self.keys.push(lines.into());
        self
    }

    pub fn node(mut self, node: Node) -> Self {
        self.nodes.push(node);
        self
    }

    pub fn nodes(mut self, nodes: impl IntoIterator<Item = Node>) -> Self {
        self.nodes.extend(nodes);
        self
    }
}

impl Node {
    /// `address` is anything the config takes: `IP:PORT`, or an IP alone.
    pub fn new(name: &str, address: impl Display) -> Self {
        Node {
            name: name.into(),
            address: address.to_string(),
            keys: Vec::new(),
        }
    }

    pub fn weight(self, weight: u32) -> Self {
        self.key(&format!("weight = {weight}"))
    }

    pub fn fallover(self, to: &str) -> Self {
        self.key(&format!("fallover = {to:?}"))
    }

    /// Extra `key = value` lines for the node (`state = "red"`, `agent = ...`).
    pub fn key(mut self, lines: &str) -> Self {
        self.keys.push(lines.into());
        self
    }
}

/// Parses config text a test wrote by hand; a refusal fails the test.
pub fn parse_config(text: &str) -> Config {
    Config::parse(text, "test config").unwrap_or_else(|e| panic!("test config refused: {e}\n{text}"))
}

/// The error a config text is refused with (its source is named `test config`);
/// an accepted text fails the test.
pub fn config_error(text: &str) -> String {
    match Config::parse(text, "test config") {
        Ok(_) => panic!("test config accepted, expected a refusal:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Parses `text` as the file `source`, resolving host names offline (a
/// mutated host name must never become a DNS query): for fuzzing the parser.
pub fn parse_offline(text: &str, source: &str) -> Result<Config, protobalance::config::ConfigError> {
    Config::parse_with(text, source, protobalance::config::offline_resolver)
}

/// `text` in a `.toml` file that lives as long as the handle.
pub fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}
