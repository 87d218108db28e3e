//! The immutable [`Snapshot`] of services, clusters and nodes that the data
//! plane loads per connection, and how one is built from a validated config.
//! Building is pure: the compiled algorithms come from a factory the caller
//! passes in (`balance::build`), so this module never knows an algorithm.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::figures::{NodeFigures, ServiceFigures};
use crate::config::{
    AlgorithmKind, CheckConfig, ClusterConfig, Config, ForwardMode, LastResort, ListenSpec, NodeAddress, OnUnavailable,
    ProxyHeader, Route, ServiceLimits, SocketBuffer, Source,
};

/// A balancing algorithm, compiled for one cluster (see `crate::balance`).
pub trait Balancer: Send + Sync {
    /// The node to try first for `client`, or `None` when no node is eligible.
    fn pick(&self, client: IpAddr, nodes: &[Node]) -> Option<usize>;

    /// The node `client` belongs to whatever the nodes' state and health, for
    /// algorithms that assign clients to nodes (ip-hash); `None` for the others.
    /// When that node cannot take the client, its fall-over chain comes first
    /// (see docs/availability.md).
    fn home(&self, _client: IpAddr, _nodes: &[Node]) -> Option<usize> {
        None
    }
}

/// Compiles a cluster's algorithm: `balance::build`.
pub type Algorithms = fn(&ClusterConfig) -> Box<dyn Balancer>;

/// A node's identity across reloads: same cluster, name and address as the
/// file writes it means the same node, whose figures carry over (also when
/// its host name now resolves to another address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub cluster: String,
    pub name: String,
    pub address_text: String,
}

/// One node as the data plane sees it.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub address: NodeAddress,
    pub address_text: String,
    pub weight: u32,
    /// Index of the fall-over node in the cluster's `nodes`.
    pub fallover: Option<usize>,
    pub figures: Arc<NodeFigures>,
    /// The node's load agent (`crate::health::agent`), if it has one.
    pub agent: Option<SocketAddr>,
    /// The PROXY header this node gets first on each connection.
    pub send_proxy: ProxyHeader,
    /// For a node without a port of its own: the port whose health is the
    /// node's (the check's `port`, else the first port of a service its
    /// cluster serves). A refused connect to any other port marks only that
    /// port down. `None` for a node with a port.
    pub health_port: Option<u16>,
}

impl Node {
    pub fn is_eligible(&self) -> bool {
        self.figures.is_eligible()
    }

    /// Whether the node may take a client who came to `port`: eligible, and
    /// that port not refused (see [`Node::health_port`]).
    pub fn is_eligible_on(&self, port: u16) -> bool {
        self.is_eligible() && !self.figures.is_port_down(port)
    }

    /// Its weight as its share of new clients now, in thousandths: its
    /// `weight` times its slow-start ramp.
    pub fn weight_permille(&self) -> u64 {
        u64::from(self.weight) * u64::from(self.figures.ramp_permille())
    }

    /// Its weight as its share of new clients now: `weight` while no slow
    /// start ramps it up, a fraction of it meanwhile.
    pub fn share_weight(&self) -> f64 {
        self.weight_permille() as f64 / f64::from(super::figures::FULL_PERMILLE)
    }

    /// Where a check or probe of the node goes: `port` when given, else its
    /// own port or its [`Node::health_port`].
    pub fn checked_target(&self, port: Option<u16>) -> Option<SocketAddr> {
        match (self.address, port.or(self.health_port)) {
            (NodeAddress::Socket(addr), None) => Some(addr),
            (NodeAddress::Socket(addr), Some(port)) => Some(SocketAddr::new(addr.ip(), port)),
            (NodeAddress::SamePort(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
            (NodeAddress::SamePort(_), None) => None,
        }
    }
}

pub struct Cluster {
    pub name: String,
    pub algorithm: AlgorithmKind,
    pub balancer: Box<dyn Balancer>,
    pub affinity: bool,
    pub affinity_ttl: Duration,
    pub connect_timeout: Duration,
    pub retry_interval: Duration,
    /// Buffer size of each socket to a node (`None`: the kernel's own sizing).
    pub socket_buffer: Option<SocketBuffer>,
    /// Whether a client no eligible node can take is tried on green nodes that look down.
    pub last_resort: LastResort,
    /// The local address of each connection to a node.
    pub source: Source,
    /// The active checks of every node (`None`: the connect probe of unavailable ones).
    pub check: Option<CheckConfig>,
    /// Over how long a node that becomes eligible ramps up to its full share.
    pub slow_start: Option<Duration>,
    pub on_unavailable: OnUnavailable,
    pub nodes: Vec<Node>,
}

/// The algorithm of a cluster that takes no new client (see [`Cluster::detached`]).
struct NoPick;

impl Balancer for NoPick {
    fn pick(&self, _client: IpAddr, _nodes: &[Node]) -> Option<usize> {
        None
    }
}

impl Cluster {
    /// A cluster of one node that the configuration no longer has, for a
    /// connection adopted from the process this one upgraded (it carries on
    /// to the end, as after a reload); it picks nothing for new clients.
    pub fn detached(name: &str, node: Node) -> Cluster {
        Cluster {
            name: name.to_string(),
            algorithm: AlgorithmKind::RoundRobin,
            balancer: Box::new(NoPick),
            affinity: false,
            affinity_ttl: Duration::ZERO,
            connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
            retry_interval: crate::config::DEFAULT_RETRY_INTERVAL,
            socket_buffer: None,
            // A detached cluster picks nothing, so it has no one to try.
            last_resort: LastResort::Refuse,
            source: Source::Kernel,
            check: None,
            slow_start: None,
            on_unavailable: OnUnavailable::Keep,
            nodes: vec![node],
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The algorithm's choice for `client` among eligible nodes.
    pub fn pick(&self, client: IpAddr) -> Option<usize> {
        self.balancer.pick(client, &self.nodes)
    }
}

pub struct Service {
    pub name: String,
    pub listen: Vec<ListenSpec>,
    pub cluster: String,
    pub limits: ServiceLimits,
    pub figures: Arc<ServiceFigures>,
    /// `[[service.route]]`.
    pub routes: Vec<Route>,
    /// The connections each route sent to its cluster (kept across reloads
    /// while the route stays the same).
    pub route_connections: Vec<Arc<AtomicU64>>,
}

impl Service {
    /// The route `server_name` takes, with its count; `None`: no route
    /// matches (the service's own cluster serves).
    pub fn route(&self, server_name: &str) -> Option<(&Route, &AtomicU64)> {
        let (i, route) = crate::config::route_of(&self.routes, server_name)?;
        Some((route, &self.route_connections[i]))
    }
}

/// Everything the data plane needs, immutable once built; replaced whole on reload.
pub struct Snapshot {
    pub forwarding: ForwardMode,
    /// Open client connections at most, all services together.
    pub max_connections: Option<u64>,
    pub services: HashMap<String, Service>,
    pub clusters: HashMap<String, Arc<Cluster>>,
}

impl Snapshot {
    /// Builds a snapshot from a validated config, reusing the figures of
    /// `previous` for nodes and services that stay; `algorithms` compiles
    /// each cluster's algorithm.
    pub fn build(config: &Config, previous: Option<&Snapshot>, algorithms: Algorithms) -> Snapshot {
        let clusters = config
            .clusters
            .iter()
            .map(|c| {
                let health_port = health_port(config, c);
                (
                    c.name.clone(),
                    Arc::new(build_cluster(c, previous, algorithms, health_port)),
                )
            })
            .collect();
        let services = config
            .services
            .iter()
            .map(|s| {
                let figures = previous
                    .and_then(|p| p.services.get(&s.name))
                    .map(|old| old.figures.clone())
                    .unwrap_or_default();
                let old = previous.and_then(|p| p.services.get(&s.name));
                let route_connections = s
                    .routes
                    .iter()
                    .map(|r| {
                        old.and_then(|o| o.routes.iter().position(|held| held == r))
                            .and_then(|i| old.map(|o| o.route_connections[i].clone()))
                            .unwrap_or_default()
                    })
                    .collect();
                let service = Service {
                    name: s.name.clone(),
                    listen: s.listen.clone(),
                    cluster: s.cluster.clone(),
                    limits: s.limits.clone(),
                    figures,
                    routes: s.routes.clone(),
                    route_connections,
                };
                (s.name.clone(), service)
            })
            .collect();
        Snapshot {
            forwarding: config.forwarding,
            max_connections: config.max_connections,
            services,
            clusters,
        }
    }

    /// The cluster serving `service` now.
    pub fn cluster_of(&self, service: &str) -> Option<(&Service, &Arc<Cluster>)> {
        let s = self.services.get(service)?;
        Some((s, self.clusters.get(&s.cluster)?))
    }

    fn node_figures(&self, key: &NodeKey) -> Option<Arc<NodeFigures>> {
        let cluster = self.clusters.get(&key.cluster)?;
        let node = cluster.node(&key.name)?;
        (node.address_text == key.address_text).then(|| node.figures.clone())
    }
}

/// The port whose health is a port-following node's: the check's `port`,
/// else the first port of the first service its cluster serves.
fn health_port(config: &Config, c: &ClusterConfig) -> Option<u16> {
    c.check.as_ref().and_then(|check| check.port).or_else(|| {
        let service = config.services.iter().find(|s| s.cluster == c.name)?;
        let port = service.listen.first()?.first_port;
        (port != 0).then_some(port)
    })
}

fn build_cluster(
    c: &ClusterConfig,
    previous: Option<&Snapshot>,
    algorithms: Algorithms,
    health_port: Option<u16>,
) -> Cluster {
    let nodes = c
        .nodes
        .iter()
        .map(|n| {
            let key = NodeKey {
                cluster: c.name.clone(),
                name: n.name.clone(),
                address_text: n.address_text.clone(),
            };
            let figures = previous.and_then(|p| p.node_figures(&key)).unwrap_or_else(|| {
                let figures = Arc::new(NodeFigures::new(n.state));
                // A node a reload adds ramps up; the first start's nodes start together.
                if previous.is_some() && n.state == crate::config::NodeState::Green {
                    figures.begin_ramp(c.slow_start);
                }
                figures
            });
            if c.check.is_none() {
                figures.clear_check();
            }
            Node {
                name: n.name.clone(),
                address: n.address,
                address_text: n.address_text.clone(),
                weight: n.weight,
                fallover: n.fallover,
                figures,
                agent: n.agent,
                send_proxy: n.send_proxy,
                health_port: match n.address {
                    NodeAddress::Socket(_) => None,
                    NodeAddress::SamePort(_) => health_port,
                },
            }
        })
        .collect();
    Cluster {
        name: c.name.clone(),
        algorithm: c.algorithm,
        balancer: algorithms(c),
        affinity: c.affinity,
        affinity_ttl: c.affinity_ttl,
        connect_timeout: c.connect_timeout,
        retry_interval: c.retry_interval,
        socket_buffer: c.socket_buffer,
        last_resort: c.last_resort,
        source: c.source,
        check: c.check.clone(),
        slow_start: c.slow_start,
        on_unavailable: c.on_unavailable,
        nodes,
    }
}
