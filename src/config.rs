//! Configuration: TOML text → raw structs (`deny_unknown_fields`) → a validated
//! [`Config`] whose errors name the key, the bad value and the line.
//!
//! This module owns parsing and validation only: it reads no file itself (the
//! caller hands it the text and a name for messages) and touches no socket.
//! Node host names are the one exception to "no I/O": they are resolved here,
//! once, when the file is loaded (see [`NodeAddress`]), so a name that does not
//! resolve is a load error rather than a failure on some later connection.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::balance::LoadRating;
use crate::model::NodeState;

pub mod diff;

/// Default for `connect_timeout` when neither the cluster nor `[defaults]` sets it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for `retry_interval`.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Default for `affinity_ttl`: long, because the product promises that a client
/// finds its node again "even if disconnected for a long period of time".
pub const DEFAULT_AFFINITY_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default for `shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default admin address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
/// Largest accepted `weight`: keeps weight arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// A validated configuration. Every name it holds refers to something that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Open client connections at most, all services together (`None`: only
    /// the descriptor limit bounds them).
    pub max_connections: Option<u64>,
    /// Worker threads; 0 means one per CPU.
    pub threads: usize,
    /// Each worker pinned to a CPU of its own, new clients steered to the
    /// worker on the CPU their connection arrives on.
    pub pin_workers: bool,
    /// How long a worker keeps polling for events after its last work
    /// instead of sleeping (`None`: it sleeps at once).
    pub busy_poll: Option<Duration>,
    pub shutdown_grace: Duration,
    pub forwarding: ForwardMode,
    pub admin: AdminConfig,
    pub services: Vec<ServiceConfig>,
    pub clusters: Vec<ClusterConfig>,
}

/// How bytes are moved between client and node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// Copy for small chunks, splice for bulk (Linux); elsewhere the same as `Copy`.
    Auto,
    /// splice(2) through a pipe, in the kernel (Linux); elsewhere the same as `Copy`.
    Splice,
    /// A portable read/write loop through a user-space buffer.
    Copy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub cluster: String,
    pub limits: ServiceLimits,
}

/// What a service lets in and what each client may hold: connection limits,
/// an idle timeout, which client addresses may connect, and the size of each
/// client socket's kernel buffers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceLimits {
    /// Open connections at most (`None`: no limit of its own).
    pub max_connections: Option<u64>,
    /// Open connections from one client IP at most.
    pub max_connections_per_client: Option<u32>,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// When not empty, only clients inside one of these networks may connect.
    pub allow: Vec<ipnet::IpNet>,
    /// Clients inside one of these networks are refused (deny wins over allow).
    pub deny: Vec<ipnet::IpNet>,
    /// `socket_buffer`: the receive and send buffer size of each client's
    /// socket (`None`: the kernel sizes them itself).
    pub socket_buffer: Option<SocketBuffer>,
}

impl ServiceLimits {
    /// Whether the access lists let `client` in.
    pub fn admits(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&client)))
            && !self.deny.iter().any(|n| n.contains(&client))
    }
}

/// An IPv4 client seen on a dual-stack listener (`::ffff:a.b.c.d`) is an IPv4 client.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `listen` entry: an address and a port or an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSpec {
    pub ip: IpAddr,
    pub first_port: u16,
    pub last_port: u16,
}

impl ListenSpec {
    /// Every socket address this entry listens on.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (self.first_port..=self.last_port).map(|p| SocketAddr::new(self.ip, p))
    }

    fn overlaps(&self, other: &ListenSpec) -> bool {
        // Port 0 asks the kernel for a free port: never a clash.
        if self.first_port == 0 || other.first_port == 0 {
            return false;
        }
        let same_host = self.ip == other.ip
            || (self.ip.is_unspecified() && (other.ip.is_ipv4() == self.ip.is_ipv4() || self.ip.is_ipv6()))
            || (other.ip.is_unspecified() && (self.ip.is_ipv4() == other.ip.is_ipv4() || other.ip.is_ipv6()));
        same_host && self.first_port <= other.last_port && other.first_port <= self.last_port
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = SocketAddr::new(self.ip, self.first_port);
        if self.first_port == self.last_port {
            write!(f, "{addr}")
        } else {
            write!(f, "{addr}-{}", self.last_port)
        }
    }
}

/// The six balancing algorithms of the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlgorithmKind {
    RoundRobin,
    Random,
    ConnectionRate,
    TrafficRate,
    LeastLoad,
    IpHash,
}

impl AlgorithmKind {
    pub const ALL: [AlgorithmKind; 6] = [
        AlgorithmKind::RoundRobin,
        AlgorithmKind::Random,
        AlgorithmKind::ConnectionRate,
        AlgorithmKind::TrafficRate,
        AlgorithmKind::LeastLoad,
        AlgorithmKind::IpHash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlgorithmKind::RoundRobin => "round-robin",
            AlgorithmKind::Random => "random",
            AlgorithmKind::ConnectionRate => "connection-rate",
            AlgorithmKind::TrafficRate => "traffic-rate",
            AlgorithmKind::LeastLoad => "least-load",
            AlgorithmKind::IpHash => "ip-hash",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for AlgorithmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    pub algorithm: AlgorithmKind,
    pub affinity: bool,
    pub affinity_ttl: Duration,
    /// Compiled when the config loads; least-load evaluates it per node.
    pub load_rating: Option<LoadRating>,
    pub hash_key: Option<String>,
    pub connect_timeout: Duration,
    pub retry_interval: Duration,
    /// `socket_buffer`: the receive and send buffer size of each socket to a
    /// node (`None`: the kernel sizes them itself).
    pub socket_buffer: Option<SocketBuffer>,
    pub nodes: Vec<NodeConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    pub address: NodeAddress,
    /// As written in the file, for status output.
    pub address_text: String,
    pub weight: u32,
    /// Index into the cluster's `nodes` of this node's fall-over node.
    pub fallover: Option<usize>,
    pub state: NodeState,
    /// The node's load agent, polled every `retry_interval` (see `crate::health::agent`).
    pub agent: Option<SocketAddr>,
}

/// Where a node is. A host name is resolved once, when the config is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeAddress {
    /// A full address.
    Socket(SocketAddr),
    /// A host without a port: connections go to the port the client connected to
    /// (for port-range listeners such as passive FTP).
    SamePort(IpAddr),
}

impl NodeAddress {
    /// The address to connect to for a client that reached us on `local_port`.
    pub fn target(&self, local_port: u16) -> SocketAddr {
        match *self {
            NodeAddress::Socket(addr) => addr,
            NodeAddress::SamePort(ip) => SocketAddr::new(ip, local_port),
        }
    }
}

/// A configuration error an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file name (or other label) the text came from.
    pub source_name: String,
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl Config {
    /// Parses and validates `text`; `source_name` labels messages (usually the
    /// path). Node host names are resolved with the system resolver.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, source_name, system_resolver)
    }

    /// As [`Config::parse`], with `resolve` turning host names into addresses
    /// (tests and fuzzing use one that asks no DNS server).
    pub fn parse_with(text: &str, source_name: &str, resolve: Resolver) -> Result<Config, ConfigError> {
        let ctx = Ctx {
            text,
            source_name,
            resolve,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ctx.error(e.span(), e.message().trim_end().to_string()))?;
        raw.validate(&ctx)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            line: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(&text, &name)
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// A one-line summary, as `check` prints it.
    pub fn summary(&self) -> String {
        let nodes: usize = self.clusters.iter().map(|c| c.nodes.len()).sum();
        let listeners: usize = self
            .services
            .iter()
            .flat_map(|s| &s.listen)
            .map(|l| usize::from(l.last_port - l.first_port) + 1)
            .sum();
        format!(
            "ok: {} service(s) on {} listening port(s), {} cluster(s), {} node(s)",
            self.services.len(),
            listeners,
            self.clusters.len(),
            nodes
        )
    }

    /// The configuration `protobalance forward LISTEN NODE...` runs: one service,
    /// one round-robin cluster, no affinity, nothing persisted.
    pub fn forward(listen: &str, nodes: &[String]) -> Result<Config, ConfigError> {
        let mut text = format!(
            "state_dir = \"\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"forward\"\nlisten = [{}]\ncluster = \"forward\"\n[[cluster]]\nname = \"forward\"\n",
            toml_string(listen)
        );
        for (i, node) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[cluster.node]]\nname = \"node{}\"\naddress = {}\n",
                i + 1,
                toml_string(node)
            ));
        }
        Config::parse(&text, "command line")
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Splits `"30s"` into its leading whole number (`None` when there is none,
/// or it is too large) and the unit after it.
fn number_and_unit(s: &str) -> (Option<u64>, &str) {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    (digits.parse().ok(), unit)
}

/// Parses a duration such as `50us`, `500ms`, `30s`, `5m`, `2h` or `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s);
    let n = n.ok_or("expected a whole number followed by a unit: us, ms, s, m, h or d (e.g. \"30s\")")?;
    let unit_us: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        "" => return Err("missing unit: use us, ms, s, m, h or d (e.g. \"30s\")".into()),
        other => return Err(format!("unknown unit \"{other}\": use us, ms, s, m, h or d")),
    };
    n.checked_mul(unit_us)
        .filter(|us| *us <= 100 * 365 * 86_400_000_000)
        .map(Duration::from_micros)
        .ok_or_else(|| "too long: at most 100 years".to_string())
}

/// The `socket_buffer` of a service or a cluster: SO_RCVBUF and SO_SNDBUF for
/// each of its sockets, in bytes.
///
/// Why it exists: without it the kernel grows each socket's buffers with the
/// traffic (up to `net.ipv4.tcp_rmem` / `tcp_wmem`'s maximum, several MB).
/// That is right at the ends of a connection, but a balancer is a hop in the
/// middle: when the far side is the slower one, the bytes queue in the
/// balancer's buffers (megabytes per connection) instead of pushing back on
/// the sender, and with many busy connections they go cold in the CPU's
/// caches before anyone reads them. A fixed size bounds that queue, and the
/// memory each connection can hold in the kernel. The price: a connection
/// cannot move more than about one buffer per round trip, so the size must
/// cover the path's bandwidth × round-trip time (1 MB carries 1 Gbit/s at
/// 8 ms). Not set by default, because the kernel's own sizing is the safe
/// choice for clients across the internet; docs/performance.md has the
/// measurements.
///
/// Linux doubles the value for its own bookkeeping and caps it at
/// `net.core.rmem_max` / `net.core.wmem_max` (the server warns about values
/// above them when it applies a config).
///
/// Non-zero, so that an `Option` of it takes no more room than the size
/// itself: it sits in each connection's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffer(std::num::NonZeroU32);

impl SocketBuffer {
    pub const MIN: u32 = 4 * 1024;
    pub const MAX: u32 = 64 * 1024 * 1024;

    pub fn bytes(self) -> usize {
        self.0.get() as usize
    }
}

/// Parses a byte size such as `65536`, `256k` or `4m` (k and m are 1024 and
/// 1024²) into a [`SocketBuffer`].
pub fn parse_socket_buffer(s: &str) -> Result<SocketBuffer, String> {
    let (n, unit) = number_and_unit(s);
    let n = n.ok_or("expected a whole number of bytes, optionally with k or m (e.g. \"256k\")")?;
    let scale: u64 = match unit {
        "" => 1,
        "k" | "K" => 1024,
        "m" | "M" => 1024 * 1024,
        other => return Err(format!("unknown unit \"{other}\": use k or m, or plain bytes")),
    };
    n.checked_mul(scale)
        .filter(|b| (u64::from(SocketBuffer::MIN)..=u64::from(SocketBuffer::MAX)).contains(b))
        .and_then(|b| std::num::NonZeroU32::new(b as u32))
        .map(SocketBuffer)
        .ok_or_else(|| "must be 4k to 64m".to_string())
}

/// Parses `ADDR:PORT` or `ADDR:LOW-HIGH` (IPv6 in brackets).
pub fn parse_listen(s: &str) -> Result<ListenSpec, String> {
    let (host, ports) = s.rsplit_once(':').ok_or("expected ADDR:PORT or ADDR:LOW-HIGH")?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("\"{host}\" is not an IP address (listen takes an IP, e.g. 0.0.0.0 or [::])"))?;
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>()
            .map_err(|_| format!("\"{p}\" is not a port number (0-65535)"))
    };
    let (first_port, last_port) = match ports.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo == 0 {
                return Err("a port range must start at 1 or above".into());
            }
            if lo > hi {
                return Err(format!("port range {lo}-{hi} is reversed"));
            }
            (lo, hi)
        }
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    Ok(ListenSpec {
        ip,
        first_port,
        last_port,
    })
}

/// Turns a host name and port into an address, or `None` when the name does not resolve.
pub type Resolver = fn(&str, u16) -> Option<SocketAddr>;

/// The system's resolver (`/etc/hosts`, then DNS): the first address.
pub fn system_resolver(host: &str, port: u16) -> Option<SocketAddr> {
    (host, port).to_socket_addrs().ok().and_then(|mut it| it.next())
}

/// A resolver that knows only `localhost` and sends nothing on the network.
pub fn offline_resolver(host: &str, port: u16) -> Option<SocketAddr> {
    (host == "localhost").then(|| SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Parses a node address: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT`, or the same
/// without a port. Host names are resolved now, to their first address.
pub fn parse_node_address(s: &str, resolver: Resolver) -> Result<NodeAddress, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(NodeAddress::Socket(addr));
    }
    let bare = s.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(NodeAddress::SamePort(ip));
    }
    let valid_host = |h: &str| {
        !h.is_empty()
            && h.len() <= 253
            && h.split('.')
                .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    let resolve = |host: &str, port: u16| -> Result<SocketAddr, String> {
        resolver(host, port).ok_or_else(|| format!("host \"{host}\" does not resolve"))
    };
    match s.rsplit_once(':') {
        Some((host, port)) if valid_host(host) => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("\"{port}\" is not a port number (0-65535)"))?;
            Ok(NodeAddress::Socket(resolve(host, port)?))
        }
        None if valid_host(s) => Ok(NodeAddress::SamePort(resolve(s, 0)?.ip())),
        _ => Err("expected IP:PORT, HOST:PORT, or an IP or HOST alone (same port as the client's)".into()),
    }
}

// ---------------------------------------------------------------------------
// Raw structs: the file's shape, nothing checked yet beyond types and key names.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    pin_workers: Option<Spanned<bool>>,
    busy_poll: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    forwarding: Option<Spanned<String>>,
    admin: Option<RawAdmin>,
    defaults: Option<RawDefaults>,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default)]
    cluster: Vec<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

/// Cluster keys that `[defaults]` may set for every cluster.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    algorithm: Option<Spanned<String>>,
    affinity: Option<Spanned<bool>>,
    affinity_ttl: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    retry_interval: Option<Spanned<String>>,
    socket_buffer: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    listen: Spanned<Vec<Spanned<String>>>,
    cluster: Spanned<String>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_client: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    socket_buffer: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    algorithm: Option<Spanned<String>>,
    affinity: Option<Spanned<bool>>,
    affinity_ttl: Option<Spanned<String>>,
    load_rating: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    retry_interval: Option<Spanned<String>>,
    socket_buffer: Option<Spanned<String>>,
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    fallover: Option<Spanned<String>>,
    state: Option<Spanned<String>>,
    agent: Option<Spanned<String>>,
}

/// The text being validated, for turning spans into line numbers.
struct Ctx<'a> {
    text: &'a str,
    source_name: &'a str,
    resolve: Resolver,
}

impl Ctx<'_> {
    fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        let line = span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1);
        ConfigError {
            source_name: self.source_name.to_string(),
            line,
            message,
        }
    }

    /// An error about `key = value` at the value's position.
    fn bad<T: fmt::Debug>(&self, what: &str, key: &str, value: &Spanned<T>, why: impl fmt::Display) -> ConfigError {
        self.error(
            Some(value.span()),
            format!("{what}{key} = {:?}: {why}", value.get_ref()),
        )
    }

    fn duration(&self, what: &str, key: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
        parse_duration(value.get_ref()).map_err(|why| self.bad(what, key, value, why))
    }

    /// A duration that may be left out (`None`) but, where written, is above zero.
    fn optional_duration(
        &self,
        what: &str,
        key: &str,
        value: Option<&Spanned<String>>,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let d = self.duration(what, key, value)?;
        if d.is_zero() {
            return Err(self.bad(what, key, value, "must be above zero (leave it out for none)"));
        }
        Ok(Some(d))
    }

    fn socket_buffer(&self, what: &str, value: Option<&Spanned<String>>) -> Result<Option<SocketBuffer>, ConfigError> {
        value
            .map(|v| parse_socket_buffer(v.get_ref()).map_err(|why| self.bad(what, "socket_buffer", v, why)))
            .transpose()
    }
}

/// Picks the cluster's own value, else the `[defaults]` one, else `fallback`.
fn layered<'a, T>(own: &'a Option<Spanned<T>>, default: &'a Option<Spanned<T>>) -> Option<&'a Spanned<T>> {
    own.as_ref().or(default.as_ref())
}

impl RawConfig {
    fn validate(self, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
        let top = "";
        let state_dir = self
            .state_dir
            .map(|s| PathBuf::from(s.into_inner()))
            .unwrap_or_default();
        let threads = match &self.threads {
            None => 0,
            Some(t) => usize::try_from(*t.get_ref())
                .ok()
                .filter(|n| *n <= 1024)
                .ok_or_else(|| ctx.bad(top, "threads", t, "must be 0 (one per CPU) to 1024"))?,
        };
        let pin_workers = self.pin_workers.is_some_and(|p| p.into_inner());
        let busy_poll = ctx.optional_duration(top, "busy_poll", self.busy_poll.as_ref())?;
        let shutdown_grace = match &self.shutdown_grace {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(d) => ctx.duration(top, "shutdown_grace", d)?,
        };
        let forwarding = match &self.forwarding {
            None => ForwardMode::Auto,
            Some(f) => match f.get_ref().as_str() {
                "auto" => ForwardMode::Auto,
                "splice" => ForwardMode::Splice,
                "copy" => ForwardMode::Copy,
                _ => return Err(ctx.bad(top, "forwarding", f, "expected \"auto\", \"splice\" or \"copy\"")),
            },
        };
        let max_connections = self
            .max_connections
            .as_ref()
            .map(|m| positive(ctx, top, "max_connections", m))
            .transpose()?;
        let admin = validate_admin(ctx, self.admin)?;
        let defaults = self.defaults.unwrap_or_default();

        let mut clusters: Vec<ClusterConfig> = Vec::new();
        let mut cluster_names = HashSet::new();
        for raw in &self.cluster {
            if !cluster_names.insert(raw.name.get_ref().as_str()) {
                return Err(ctx.bad("cluster ", "name", &raw.name, "duplicate cluster name"));
            }
            clusters.push(validate_cluster(ctx, raw, &defaults)?);
        }

        let mut services = Vec::new();
        let mut service_names = HashSet::new();
        let mut all_listen: Vec<(ListenSpec, &str)> = Vec::new();
        for raw in &self.service {
            let name = raw.name.get_ref();
            let what = format!("service \"{name}\": ");
            check_name(ctx, &what, &raw.name)?;
            if !service_names.insert(name.as_str()) {
                return Err(ctx.bad("service ", "name", &raw.name, "duplicate service name"));
            }
            if !cluster_names.contains(raw.cluster.get_ref().as_str()) {
                return Err(ctx.bad(&what, "cluster", &raw.cluster, "no [[cluster]] has this name"));
            }
            if raw.listen.get_ref().is_empty() {
                return Err(ctx.bad(&what, "listen", &raw.listen, "needs at least one address"));
            }
            let mut listen = Vec::new();
            for entry in raw.listen.get_ref() {
                let spec = parse_listen(entry.get_ref()).map_err(|why| ctx.bad(&what, "listen", entry, why))?;
                if let Some((other_spec, other)) = all_listen.iter().find(|(l, _)| l.overlaps(&spec)) {
                    let owner = if *other == name.as_str() {
                        "this service".to_string()
                    } else {
                        format!("service \"{other}\"")
                    };
                    return Err(ctx.bad(&what, "listen", entry, format!("overlaps {other_spec} of {owner}")));
                }
                all_listen.push((spec, name));
                listen.push(spec);
            }
            services.push(ServiceConfig {
                name: name.clone(),
                listen,
                cluster: raw.cluster.get_ref().clone(),
                limits: validate_limits(ctx, &what, raw)?,
            });
        }

        Ok(Config {
            state_dir,
            max_connections,
            threads,
            pin_workers,
            busy_poll,
            shutdown_grace,
            forwarding,
            admin,
            services,
            clusters,
        })
    }
}

/// A count that must be at least 1.
fn positive(ctx: &Ctx<'_>, what: &str, key: &str, value: &Spanned<i64>) -> Result<u64, ConfigError> {
    u64::try_from(*value.get_ref())
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ctx.bad(what, key, value, "must be 1 or more (leave it out for no limit)"))
}

fn validate_limits(ctx: &Ctx<'_>, what: &str, raw: &RawService) -> Result<ServiceLimits, ConfigError> {
    let networks = |key: &str, list: &[Spanned<String>]| -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.iter()
            .map(|entry| {
                let text = entry.get_ref();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        ctx.bad(
                            what,
                            key,
                            entry,
                            "expected an address or a network, e.g. 10.0.0.0/8 or ::1",
                        )
                    })
            })
            .collect()
    };
    let per_client = raw
        .max_connections_per_client
        .as_ref()
        .map(|m| {
            positive(ctx, what, "max_connections_per_client", m)?
                .try_into()
                .map_err(|_| ctx.bad(what, "max_connections_per_client", m, "too large"))
        })
        .transpose()?;
    let idle_timeout = ctx.optional_duration(what, "idle_timeout", raw.idle_timeout.as_ref())?;
    Ok(ServiceLimits {
        max_connections: raw
            .max_connections
            .as_ref()
            .map(|m| positive(ctx, what, "max_connections", m))
            .transpose()?,
        max_connections_per_client: per_client,
        idle_timeout,
        allow: networks("allow", &raw.allow)?,
        deny: networks("deny", &raw.deny)?,
        socket_buffer: ctx.socket_buffer(what, raw.socket_buffer.as_ref())?,
    })
}

fn check_name(ctx: &Ctx<'_>, what: &str, name: &Spanned<String>) -> Result<(), ConfigError> {
    let n = name.get_ref();
    if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ctx.bad(what, "name", name, "use 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(())
}

fn validate_admin(ctx: &Ctx<'_>, raw: Option<RawAdmin>) -> Result<AdminConfig, ConfigError> {
    let what = "[admin] ";
    let (listen, token) = match raw {
        None => (None, None),
        Some(a) => (a.listen, a.token),
    };
    let listen_addr = match &listen {
        None => DEFAULT_ADMIN_LISTEN.parse().expect("default admin address parses"),
        Some(l) => l
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|_| ctx.bad(what, "listen", l, "expected IP:PORT, e.g. 127.0.0.1:9900"))?,
    };
    if let Some(t) = &token
        && t.get_ref().len() < 8
    {
        // Never echo a token, even a bad one.
        return Err(ctx.error(
            Some(t.span()),
            format!("{what}token: too short, use at least 8 characters"),
        ));
    }
    if !listen_addr.ip().is_loopback() && token.is_none() {
        let l = listen.as_ref().expect("a non-default address was written");
        return Err(ctx.bad(
            what,
            "listen",
            l,
            "not a loopback address, so [admin] token is required",
        ));
    }
    Ok(AdminConfig {
        listen: listen_addr,
        token: token.map(Spanned::into_inner),
    })
}

fn validate_cluster(ctx: &Ctx<'_>, raw: &RawCluster, defaults: &RawDefaults) -> Result<ClusterConfig, ConfigError> {
    let name = raw.name.get_ref();
    let what = format!("cluster \"{name}\": ");
    check_name(ctx, "cluster: ", &raw.name)?;
    let algorithm = match layered(&raw.algorithm, &defaults.algorithm) {
        None => AlgorithmKind::RoundRobin,
        Some(a) => {
            let kind = AlgorithmKind::parse(a.get_ref()).ok_or_else(|| {
                let names: Vec<_> = AlgorithmKind::ALL.iter().map(|k| k.name()).collect();
                ctx.bad(
                    &what,
                    "algorithm",
                    a,
                    format!("unknown algorithm; expected one of {}", names.join(", ")),
                )
            })?;
            if !crate::balance::is_implemented(kind) {
                return Err(ctx.bad(&what, "algorithm", a, "not implemented yet in this version"));
            }
            kind
        }
    };
    let affinity = layered(&raw.affinity, &defaults.affinity).is_some_and(|a| *a.get_ref());
    let duration_or =
        |key: &str, own: &Option<Spanned<String>>, def: &Option<Spanned<String>>, fallback: Duration| match layered(
            own, def,
        ) {
            None => Ok(fallback),
            Some(d) => ctx.duration(&what, key, d),
        };
    let affinity_ttl = duration_or(
        "affinity_ttl",
        &raw.affinity_ttl,
        &defaults.affinity_ttl,
        DEFAULT_AFFINITY_TTL,
    )?;
    let connect_timeout = duration_or(
        "connect_timeout",
        &raw.connect_timeout,
        &defaults.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let retry_interval = duration_or(
        "retry_interval",
        &raw.retry_interval,
        &defaults.retry_interval,
        DEFAULT_RETRY_INTERVAL,
    )?;
    for (key, d) in [
        ("connect_timeout", &connect_timeout),
        ("retry_interval", &retry_interval),
    ] {
        if d.is_zero() {
            let span = match key {
                "connect_timeout" => layered(&raw.connect_timeout, &defaults.connect_timeout),
                _ => layered(&raw.retry_interval, &defaults.retry_interval),
            };
            return Err(ctx.bad(&what, key, span.expect("zero only when written"), "must be above zero"));
        }
    }
    let load_rating = match &raw.load_rating {
        None => None,
        Some(text) => Some(LoadRating::compile(text.get_ref()).map_err(|e| ctx.bad(&what, "load_rating", text, e))?),
    };
    if let Some(key) = &raw.hash_key
        && key.get_ref().is_empty()
    {
        return Err(ctx.bad(
            &what,
            "hash_key",
            key,
            "must not be empty (leave it out for the built-in key)",
        ));
    }
    if algorithm == AlgorithmKind::LeastLoad && raw.load_rating.is_none() {
        return Err(ctx.bad(
            &what,
            "algorithm",
            raw.algorithm.as_ref().or(defaults.algorithm.as_ref()).expect("set"),
            "least-load needs a load_rating expression",
        ));
    }

    if raw.node.is_empty() {
        return Err(ctx.error(Some(raw.name.span()), format!("{what}has no [[cluster.node]]")));
    }
    let mut nodes = Vec::with_capacity(raw.node.len());
    let mut node_names = HashSet::new();
    for n in &raw.node {
        let node_name = n.name.get_ref();
        check_name(ctx, &what, &n.name)?;
        if !node_names.insert(node_name.as_str()) {
            return Err(ctx.bad(&what, "node name", &n.name, "duplicate node name in this cluster"));
        }
        let nwhat = format!("cluster \"{name}\" node \"{node_name}\": ");
        let address = parse_node_address(n.address.get_ref(), ctx.resolve)
            .map_err(|why| ctx.bad(&nwhat, "address", &n.address, why))?;
        let weight = match &n.weight {
            None => 1,
            Some(w) => u32::try_from(*w.get_ref())
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .ok_or_else(|| ctx.bad(&nwhat, "weight", w, format!("must be 1 to {MAX_WEIGHT}")))?,
        };
        let state = match &n.state {
            None => NodeState::Green,
            Some(s) => NodeState::parse(s.get_ref())
                .ok_or_else(|| ctx.bad(&nwhat, "state", s, "expected green, yellow or red"))?,
        };
        let agent = match &n.agent {
            None => None,
            Some(a) => match parse_node_address(a.get_ref(), ctx.resolve) {
                Ok(NodeAddress::Socket(addr)) => Some(addr),
                Ok(NodeAddress::SamePort(_)) => return Err(ctx.bad(&nwhat, "agent", a, "needs a port: HOST:PORT")),
                Err(why) => return Err(ctx.bad(&nwhat, "agent", a, why)),
            },
        };
        nodes.push(NodeConfig {
            name: node_name.clone(),
            address,
            address_text: n.address.get_ref().clone(),
            weight,
            fallover: None,
            state,
            agent,
        });
    }
    for (i, n) in raw.node.iter().enumerate() {
        let Some(f) = &n.fallover else { continue };
        let nwhat = format!("cluster \"{name}\" node \"{}\": ", n.name.get_ref());
        let target = raw
            .node
            .iter()
            .position(|m| m.name.get_ref() == f.get_ref())
            .ok_or_else(|| ctx.bad(&nwhat, "fallover", f, "no node of this cluster has this name"))?;
        if target == i {
            return Err(ctx.bad(&nwhat, "fallover", f, "a node cannot be its own fall-over node"));
        }
        nodes[i].fallover = Some(target);
    }
    // A chain longer than the node count has revisited a node: a loop.
    for (i, n) in raw.node.iter().enumerate() {
        let mut at = nodes[i].fallover;
        let mut path = vec![nodes[i].name.as_str()];
        while let Some(next) = at {
            path.push(nodes[next].name.as_str());
            if next == i {
                let f = n.fallover.as_ref().expect("chain starts with a fallover");
                let nwhat = format!("cluster \"{name}\" node \"{}\": ", n.name.get_ref());
                return Err(ctx.bad(&nwhat, "fallover", f, format!("forms a loop: {}", path.join(" -> "))));
            }
            if path.len() > nodes.len() + 1 {
                break; // reaches a loop that does not include node i; reported from inside it
            }
            at = nodes[next].fallover;
        }
    }

    Ok(ClusterConfig {
        name: name.clone(),
        algorithm,
        affinity,
        affinity_ttl,
        load_rating,
        hash_key: raw.hash_key.as_ref().map(|s| s.get_ref().clone()),
        connect_timeout,
        retry_interval,
        socket_buffer: ctx.socket_buffer(&what, layered(&raw.socket_buffer, &defaults.socket_buffer))?,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999d").unwrap_err().contains("too long"));
    }

    #[test]
    fn socket_buffer_sizes() {
        let bytes = |s: &str| parse_socket_buffer(s).map(SocketBuffer::bytes);
        assert_eq!(bytes("65536"), Ok(65536));
        assert_eq!(bytes("256k"), Ok(256 * 1024));
        assert_eq!(bytes("4M"), Ok(4 * 1024 * 1024));
        assert!(bytes("2k").unwrap_err().contains("4k to 64m"));
        assert!(bytes("65m").unwrap_err().contains("4k to 64m"));
        assert!(bytes("1g").unwrap_err().contains("unknown unit"));
        assert!(bytes("-4k").unwrap_err().contains("whole number"));
        assert!(bytes("99999999999999999999k").is_err());
    }

    #[test]
    fn socket_buffer_layers_like_the_other_cluster_keys() {
        let text = "[defaults]\nsocket_buffer = \"512k\"\n\
                    [[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"a\"\nsocket_buffer = \"64k\"\n\
                    [[cluster]]\nname = \"a\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n\
                    [[cluster]]\nname = \"b\"\nsocket_buffer = \"1m\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n";
        let c = Config::parse(text, "t").unwrap();
        let size = |b: Option<SocketBuffer>| b.map(SocketBuffer::bytes);
        assert_eq!(size(c.services[0].limits.socket_buffer), Some(64 * 1024));
        assert_eq!(size(c.clusters[0].socket_buffer), Some(512 * 1024), "from [defaults]");
        assert_eq!(
            size(c.clusters[1].socket_buffer),
            Some(1024 * 1024),
            "the cluster's own"
        );
        let none = Config::forward("127.0.0.1:0", &["127.0.0.1:1".to_string()]).unwrap();
        assert_eq!(
            none.services[0].limits.socket_buffer, None,
            "the kernel's sizing by default"
        );
        assert_eq!(none.clusters[0].socket_buffer, None);

        let bad = text.replace("\"1m\"", "\"1 MB\"");
        let err = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(
            err.starts_with("t:15: cluster \"b\": socket_buffer = \"1 MB\": unknown unit"),
            "{err}"
        );
    }

    #[test]
    fn listen_specs() {
        let l = parse_listen("0.0.0.0:30000-30009").unwrap();
        assert_eq!((l.first_port, l.last_port), (30000, 30009));
        assert_eq!(l.addrs().count(), 10);
        assert_eq!(parse_listen("[::1]:80").unwrap().ip, "::1".parse::<IpAddr>().unwrap());
        assert!(parse_listen("1.2.3.4:9-3").unwrap_err().contains("reversed"));
        assert!(parse_listen("1.2.3.4:70000").is_err());
        assert!(parse_listen("nowhere:80").is_err());
        let any = parse_listen("0.0.0.0:80").unwrap();
        assert!(any.overlaps(&parse_listen("127.0.0.1:70-90").unwrap()));
        assert!(!any.overlaps(&parse_listen("127.0.0.1:81").unwrap()));
        assert!(
            !parse_listen("127.0.0.1:0")
                .unwrap()
                .overlaps(&parse_listen("127.0.0.1:0").unwrap())
        );
    }

    #[test]
    fn node_addresses() {
        assert_eq!(
            parse_node_address("10.0.0.1:80", offline_resolver),
            Ok(NodeAddress::Socket("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_node_address("10.0.0.1", offline_resolver),
            Ok(NodeAddress::SamePort("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse_node_address("[::1]", offline_resolver),
            Ok(NodeAddress::SamePort("::1".parse().unwrap()))
        );
        assert!(
            matches!(parse_node_address("localhost:80", offline_resolver), Ok(NodeAddress::Socket(a)) if a.port() == 80)
        );
        assert!(parse_node_address("bad host:80", offline_resolver).is_err());
        assert!(parse_node_address("10.0.0.1:99999", offline_resolver).is_err());
    }

    fn cluster_with(algorithm: &str, extra: &str, node_extra: &str) -> Result<Config, ConfigError> {
        Config::parse(
            &format!(
                "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n[[cluster]]\nname = \"c\"\nalgorithm = \"{algorithm}\"\n{extra}\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n{node_extra}\n"
            ),
            "t.toml",
        )
    }

    #[test]
    fn every_algorithm_is_accepted() {
        for kind in AlgorithmKind::ALL {
            let c = cluster_with(kind.name(), "load_rating = \"connections\"", "").unwrap();
            assert_eq!(c.clusters[0].algorithm, kind);
        }
    }

    #[test]
    fn load_rating_is_compiled_and_a_bad_one_is_reported_where_it_is() {
        let c = cluster_with("least-load", "load_rating = \"agent_load * 2 + connections\"", "").unwrap();
        assert_eq!(
            c.clusters[0].load_rating.as_ref().unwrap().source(),
            "agent_load * 2 + connections"
        );
        let e = cluster_with("least-load", "load_rating = \"connections / wieght\"", "").unwrap_err();
        assert_eq!(e.line, Some(8));
        assert!(e.message.contains("load_rating = \"connections / wieght\""), "{e}");
        assert!(e.message.contains("at column 15: unknown name \"wieght\""), "{e}");
        let e = cluster_with("least-load", "", "").unwrap_err();
        assert!(e.message.contains("least-load needs a load_rating"), "{e}");
        let e = cluster_with("ip-hash", "hash_key = \"\"", "").unwrap_err();
        assert!(e.message.contains("hash_key"), "{e}");
    }

    #[test]
    fn node_agents() {
        let c = cluster_with("round-robin", "", "agent = \"127.0.0.1:5555\"").unwrap();
        assert_eq!(c.clusters[0].nodes[0].agent, Some("127.0.0.1:5555".parse().unwrap()));
        let e = cluster_with("round-robin", "", "agent = \"127.0.0.1\"").unwrap_err();
        assert!(e.message.contains("agent = \"127.0.0.1\": needs a port"), "{e}");
        assert_eq!(e.line, Some(12));
        let e = cluster_with("round-robin", "", "agent = \"no such:1\"").unwrap_err();
        assert!(e.message.contains("agent"), "{e}");
    }
}
