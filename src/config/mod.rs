//! Configuration: TOML text → raw structs (`deny_unknown_fields`) → a validated
//! [`Config`] whose errors name the key, the bad value and the line.
//!
//! The ground floor of the crate: it imports nothing of the crate, and every
//! other module may import it. It owns parsing and validation only: it reads
//! no file except in [`Config::load`] and touches no socket. Node host names
//! are the one exception to "no I/O": they are resolved here, once, when the
//! file is loaded (see [`NodeAddress`]), so a name that does not resolve is a
//! load error rather than a failure on some later connection.
//!
//! - `raw`: the file's shape, as serde reads it;
//! - `validate`: raw → validated, with the errors;
//! - `values`: the value types and their parsers (durations, addresses, states);
//! - `load_rating`: least-load's expression, compiled here;
//! - `listeners`: every listening socket a config asks for.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

mod account;
mod admin;
mod file;
mod health;
mod identity;
mod listeners;
pub mod load_rating;
mod raw;
mod routes;
mod shared;
mod validate;
mod values;

pub use account::RunAs;
pub use admin::{
    AdminConfig, AdminListen, DEFAULT_ADMIN_HEADER_TIMEOUT, DEFAULT_ADMIN_MAX_CONNECTIONS,
    DEFAULT_ADMIN_REQUEST_TIMEOUT, DEFAULT_SOCKET_MODE, HostPort,
};
pub use file::{MAX_CONFIG_FILE, MAX_TOKEN_FILE, read_regular_file};
pub use health::{
    CheckConfig, CheckKind, DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT, DEFAULT_FALL, DEFAULT_RISE, OnUnavailable,
    Step,
};
pub use identity::{DEFAULT_ACCEPT_PROXY_TIMEOUT, ProxyHeader, Source};
pub use listeners::{ListenerKey, listeners};
pub use load_rating::{LoadRating, LoadRatingError, Variable};
pub use routes::{MAX_SERVER_NAME, Route, SniName, route_of};
pub use shared::{DEFAULT_KEY_PREFIX, DEFAULT_LOOKUP_BUDGET, SharedConfig};
pub use values::{
    AlgorithmKind, ForwardMode, ListenSpec, LogFormat, NodeAddress, NodeState, Resolver, SocketBuffer, canonical,
    host_name_of, is_name, lookup_at, offline_resolver, parse_duration, parse_listen, parse_node_address,
    parse_socket_buffer, system_resolver,
};

/// Default for `connect_timeout` when neither the cluster nor `[defaults]` sets it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for `resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
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
    /// How log lines are written; the CLI's `--log-format` overrides it.
    pub log_format: LogFormat,
    /// `user` / `group`: who the process becomes once its sockets are open.
    pub run_as: Option<RunAs>,
    pub admin: AdminConfig,
    /// `[shared]`: the store twins keep pins and run-time overrides in.
    pub shared: Option<SharedConfig>,
    /// `resolver`: the DNS server node host names are resolved with
    /// (`None`: the system's resolver).
    pub resolver: Option<SocketAddr>,
    pub services: Vec<ServiceConfig>,
    pub clusters: Vec<ClusterConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub cluster: String,
    pub limits: ServiceLimits,
    /// `[[service.route]]`: clusters chosen by the ClientHello's server name.
    pub routes: Vec<Route>,
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
    /// `max_connection_age`: a connection open this long is closed, each at
    /// its own moment within the last tenth of the age.
    pub max_connection_age: Option<Duration>,
    /// When not empty, only clients inside one of these networks may connect.
    pub allow: Vec<ipnet::IpNet>,
    /// Clients inside one of these networks are refused (deny wins over allow).
    pub deny: Vec<ipnet::IpNet>,
    /// `socket_buffer`: the receive and send buffer size of each client's
    /// socket (`None`: the kernel sizes them itself).
    pub socket_buffer: Option<SocketBuffer>,
    /// `accept_proxy_from`: clients from these networks are upstream
    /// balancers, whose connections start with a PROXY header that names
    /// the real client.
    pub accept_proxy_from: Vec<ipnet::IpNet>,
    /// How long such a client has to send its whole header.
    pub accept_proxy_timeout: Duration,
}

impl ServiceLimits {
    /// Whether the access lists let `client` in.
    pub fn admits(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&client)))
            && !self.deny.iter().any(|n| n.contains(&client))
    }

    /// Whether `peer` (the socket's own peer) must start with a PROXY header.
    pub fn expects_proxy_header(&self, peer: IpAddr) -> bool {
        !self.accept_proxy_from.is_empty() && {
            let peer = canonical(peer);
            self.accept_proxy_from.iter().any(|n| n.contains(&peer))
        }
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
    /// `last_resort`: what a client gets when no node is eligible.
    pub last_resort: LastResort,
    /// `source`: the local address of each connection to a node.
    pub source: Source,
    /// `[cluster.check]`: the active checks of every node (`None`: only
    /// passive marking and the connect probe of unavailable nodes).
    pub check: Option<CheckConfig>,
    /// `slow_start`: a node that becomes eligible ramps up to its full share
    /// over this (`None`: at once).
    pub slow_start: Option<std::time::Duration>,
    /// `on_unavailable`: what an active check failing does to open connections.
    pub on_unavailable: OnUnavailable,
    /// `resolve_interval`: how often node host names are resolved again.
    pub resolve_interval: Duration,
    pub nodes: Vec<NodeConfig>,
}

/// `last_resort`: when no node is eligible, whether the client is tried on
/// the green nodes that merely look down before it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LastResort {
    /// Try the green-but-unavailable nodes, in candidate order.
    #[default]
    TryUnavailable,
    /// Refuse the client at once.
    Refuse,
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
    /// `send_proxy`, the node's own or its cluster's.
    pub send_proxy: ProxyHeader,
}

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
    /// With `resolver = "IP:PORT"`, host names are resolved at that server.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Config::parse_inner(text, source_name, &system_resolver, true)
    }

    /// As [`Config::parse`], with `resolve` turning host names into addresses
    /// (tests and fuzzing use one that asks no DNS server), whatever
    /// `resolver` says.
    pub fn parse_with(text: &str, source_name: &str, resolve: Resolver) -> Result<Config, ConfigError> {
        Config::parse_inner(text, source_name, &resolve, false)
    }

    fn parse_inner(
        text: &str,
        source_name: &str,
        resolve: &dyn Fn(&str, u16) -> Option<SocketAddr>,
        custom_dns: bool,
    ) -> Result<Config, ConfigError> {
        let ctx = validate::Ctx {
            text,
            source_name,
            resolve,
            custom_dns,
        };
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ctx.error(e.span(), e.message().trim_end().to_string()))?;
        raw.validate(&ctx)
    }

    /// Reads and parses the file at `path`, which must be a regular file
    /// (a FIFO or a device is refused at once, never waited on).
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = read_regular_file(path, MAX_CONFIG_FILE).map_err(|message| ConfigError {
            source_name: name.clone(),
            line: None,
            message,
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
            parse_node_address("10.0.0.1:80", &offline_resolver),
            Ok(NodeAddress::Socket("10.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            parse_node_address("10.0.0.1", &offline_resolver),
            Ok(NodeAddress::SamePort("10.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            parse_node_address("[::1]", &offline_resolver),
            Ok(NodeAddress::SamePort("::1".parse().unwrap()))
        );
        assert!(
            matches!(parse_node_address("localhost:80", &offline_resolver), Ok(NodeAddress::Socket(a)) if a.port() == 80)
        );
        assert!(parse_node_address("bad host:80", &offline_resolver).is_err());
        assert!(parse_node_address("10.0.0.1:99999", &offline_resolver).is_err());
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
    fn last_resort_defaults_to_try_unavailable_and_refuses_other_words() {
        let c = cluster_with("round-robin", "", "").unwrap();
        assert_eq!(c.clusters[0].last_resort, LastResort::TryUnavailable);
        let c = cluster_with("round-robin", "last_resort = \"refuse\"", "").unwrap();
        assert_eq!(c.clusters[0].last_resort, LastResort::Refuse);
        let e = cluster_with("round-robin", "last_resort = \"retry\"", "").unwrap_err();
        assert_eq!(e.line, Some(8));
        assert!(e.message.contains("last_resort = \"retry\": must be"), "{e}");
    }

    #[test]
    fn checks_layer_from_defaults_and_say_which_key_is_wrong() {
        let c = cluster_with("round-robin", "", "").unwrap();
        assert_eq!(c.clusters[0].check, None);
        let c = cluster_with(
            "round-robin",
            "[cluster.check]\ntype = \"http\"\npath = \"/healthz\"\nexpect_status = \"200\"\nrise = 1",
            "",
        )
        .unwrap();
        let check = c.clusters[0].check.clone().unwrap();
        assert_eq!(
            check.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                host: None,
                expect_status: (200, 200)
            }
        );
        assert_eq!((check.rise, check.fall), (1, DEFAULT_FALL));
        assert_eq!(
            (check.interval, check.timeout),
            (DEFAULT_CHECK_INTERVAL, DEFAULT_CHECK_TIMEOUT)
        );
        let text = "[defaults]\ncheck = { type = \"smtp\", interval = \"5s\" }\n\
                    [[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
                    [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n";
        let c = Config::parse(text, "t").unwrap();
        let check = c.clusters[0].check.clone().unwrap();
        assert_eq!((check.kind, check.interval), (CheckKind::Smtp, Duration::from_secs(5)));

        for (extra, line, says) in [
            ("[cluster.check]\nrise = 0", 9, "check: rise = 0: must be 1 to 1000"),
            (
                "[cluster.check]\ntype = \"send-expect\"",
                8,
                "type = \"send-expect\" needs steps",
            ),
            (
                "[cluster.check]\ntype = \"send-expect\"\nsteps = []",
                10,
                "steps: has no step",
            ),
            (
                "[cluster.check]\ntype = \"send-expect\"\nsteps = [{send = \"x\", expect = \"y\"}]",
                10,
                "step 1: needs exactly one of send or expect",
            ),
            (
                "[cluster.check]\ntype = \"http\"\nexpect_status = \"700\"",
                10,
                "expect_status = \"700\"",
            ),
            (
                "[cluster.check]\ntype = \"http\"\nexpect_status = \"399-200\"",
                10,
                "reversed",
            ),
            (
                "[cluster.check]\ntype = \"smtp\"\npath = \"/\"",
                10,
                "path: only for type = \"http\"",
            ),
            ("[cluster.check]\ntype = \"icmp\"", 9, "type = \"icmp\": must be one of"),
            (
                "[cluster.check]\ninterval = \"1s\"\ntimeout = \"2s\"",
                10,
                "timeout = \"2s\": must not be longer",
            ),
            ("[cluster.check]\nport = 70000", 9, "port = 70000"),
            ("[cluster.check]\nrise = 2\nretries = 3", 10, "unknown field `retries`"),
            ("slow_start = \"0s\"", 8, "slow_start = \"0s\": must be above zero"),
            (
                "on_unavailable = \"drop\"",
                8,
                "on_unavailable = \"drop\": must be \"keep\" or \"cut\"",
            ),
        ] {
            let e = cluster_with("round-robin", extra, "").unwrap_err();
            assert!(e.message.contains(says), "{extra:?}: {e}");
            assert_eq!(e.line, Some(line), "{extra:?}: {e}");
        }
    }

    #[test]
    fn slow_start_on_unavailable_and_max_connection_age() {
        let c = cluster_with("round-robin", "slow_start = \"30s\"\non_unavailable = \"cut\"", "").unwrap();
        assert_eq!(c.clusters[0].slow_start, Some(Duration::from_secs(30)));
        assert_eq!(c.clusters[0].on_unavailable, OnUnavailable::Cut);
        let c = cluster_with("round-robin", "", "").unwrap();
        assert_eq!(
            (c.clusters[0].slow_start, c.clusters[0].on_unavailable),
            (None, OnUnavailable::Keep)
        );
        let text = "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\nmax_connection_age = \"6h\"\n\
                    [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n";
        let c = Config::parse(text, "t").unwrap();
        assert_eq!(
            c.services[0].limits.max_connection_age,
            Some(Duration::from_secs(6 * 3600))
        );
        let e = Config::parse(&text.replace("\"6h\"", "\"0s\""), "t").unwrap_err();
        assert!(
            e.message.contains("max_connection_age = \"0s\": must be above zero"),
            "{e}"
        );
        assert_eq!(e.line, Some(5));
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
