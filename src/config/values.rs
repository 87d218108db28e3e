//! The value types of a configuration and their parsers: durations, sizes,
//! listen addresses, node addresses, node states, algorithm names and
//! forwarding modes. Pure functions over text; the only I/O is the host-name
//! resolver a caller passes in ([`Resolver`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// A node's state, set by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new connections.
    Green,
    /// Drains: no new connections, open ones continue.
    Yellow,
    /// Offline: open connections are cut, no new ones.
    Red,
}

impl NodeState {
    pub fn parse(s: &str) -> Option<NodeState> {
        match s {
            "green" => Some(NodeState::Green),
            "yellow" => Some(NodeState::Yellow),
            "red" => Some(NodeState::Red),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeState::Green => "green",
            NodeState::Yellow => "yellow",
            NodeState::Red => "red",
        }
    }

    pub fn from_u8(v: u8) -> NodeState {
        match v {
            0 => NodeState::Green,
            1 => NodeState::Yellow,
            _ => NodeState::Red,
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            NodeState::Green => 0,
            NodeState::Yellow => 1,
            NodeState::Red => 2,
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How log lines are written: `log_format` (or `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log collectors (field names: docs/admin.md).
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
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

    pub(super) fn overlaps(&self, other: &ListenSpec) -> bool {
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

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for AlgorithmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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

/// Splits `"30s"` into its leading whole number (`None` when there is none,
/// or it is too large) and the unit after it.
fn number_and_unit(s: &str) -> (Option<u64>, &str) {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    (digits.parse().ok(), unit)
}

/// Whether `text` is a name as the file's names are: 1 to 64 letters,
/// digits, `-`, `_` or `.` (services, clusters, nodes, instances, key
/// prefixes); such a name needs no escaping in keys, logs or JSON.
pub fn is_name(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
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

/// The addresses `host` has at the DNS server `server` (`resolver =
/// "IP:PORT"`), in the server's order; empty when it has none or does not
/// answer within `timeout`. The one DNS client of the crate: hickory's.
pub async fn lookup_at(server: SocketAddr, host: &str, timeout: std::time::Duration) -> Result<Vec<IpAddr>, String> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let mut builder = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![name_server]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    builder.options_mut().timeout = timeout;
    builder.options_mut().attempts = 1;
    // Every lookup asks the server: a moved name is seen at the next interval.
    builder.options_mut().cache_size = 0;
    let resolver = builder.build().map_err(|e| e.to_string())?;
    // A fully qualified name: no search domain is tried.
    let fqdn = if host.ends_with('.') {
        host.to_string()
    } else {
        format!("{host}.")
    };
    match tokio::time::timeout(timeout, resolver.lookup_ip(fqdn.as_str())).await {
        Ok(Ok(found)) => Ok(found.iter().collect()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// [`lookup_at`] for a caller without a runtime (the file's load): on a
/// thread of its own, so that it works inside a runtime too (a reload).
pub fn lookup_at_blocking(server: SocketAddr, host: &str, port: u16) -> Option<SocketAddr> {
    let host = host.to_string();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                let found = runtime
                    .block_on(lookup_at(server, &host, std::time::Duration::from_secs(3)))
                    .ok()?;
                found.first().map(|ip| SocketAddr::new(*ip, port))
            })
            .join()
            .ok()
            .flatten()
    })
}

/// The system's resolver (`/etc/hosts`, then DNS): the first address.
pub fn system_resolver(host: &str, port: u16) -> Option<SocketAddr> {
    (host, port).to_socket_addrs().ok().and_then(|mut it| it.next())
}

/// A resolver that knows only `localhost` and sends nothing on the network.
pub fn offline_resolver(host: &str, port: u16) -> Option<SocketAddr> {
    (host == "localhost").then(|| SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The host name of a node address as the file writes it, and its port
/// (`None`: the node takes the client's port); `None` for an IP address.
pub fn host_name_of(text: &str) -> Option<(&str, Option<u16>)> {
    if text.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let bare = text.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(text);
    if bare.parse::<IpAddr>().is_ok() {
        return None;
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((text, None)),
    }
}

/// Parses a node address: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT`, or the same
/// without a port. Host names are resolved now, to their first address.
pub fn parse_node_address(s: &str, resolver: &dyn Fn(&str, u16) -> Option<SocketAddr>) -> Result<NodeAddress, String> {
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
