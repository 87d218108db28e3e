//! The shape of `GET /api/v1/status` (docs/admin.md), built from the
//! published snapshot and the node figures. `ctl` parses the same types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::Control;
use crate::model::{CheckReport, FULL_PERMILLE, Node, Refusal, Snapshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The balancer's process id (an upgrade in place changes it).
    #[serde(default)]
    pub pid: u32,
    pub services: Vec<ServiceStatus>,
    pub clusters: Vec<ClusterStatus>,
    /// With `[shared]`: the store and whether it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// The store's URL, without its password.
    pub url: String,
    /// This instance's name in what it writes there.
    pub instance: String,
    pub up: bool,
    /// Up, but past the lookup budget for clients in a row: clients do not
    /// ask it until it answers within the budget again.
    #[serde(default)]
    pub slow: bool,
}

/// Who made a run-time change, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetBy {
    /// The instance's name (this one's own for its changes).
    pub instance: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// As configured (`ADDR:PORT` or `ADDR:LOW-HIGH`).
    pub listen: Vec<String>,
    /// The sockets bound now (port 0 resolved).
    pub bound: Vec<String>,
    /// The cluster serving new connections now.
    pub cluster: String,
    /// The file's cluster, when a run-time redirect overrides it.
    pub redirected_from: Option<String>,
    /// Who set the redirect in force, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_set_by: Option<SetBy>,
    pub active_connections: u64,
    pub total_connections: u64,
    /// Clients turned away, all reasons together.
    pub refused_connections: u64,
    /// Clients turned away, by reason (the `reason` labels of the metrics).
    pub refused: BTreeMap<String, u64>,
    /// Connections closed for reaching `max_connection_age`.
    #[serde(default)]
    pub closed_max_age: u64,
    /// `[[service.route]]`: the names each routes, its cluster, and the
    /// connections it sent there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub sni: Vec<String>,
    pub cluster: String,
    pub connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub algorithm: String,
    pub affinity: bool,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub fallover: Option<String>,
    /// green, yellow or red (set by an operator).
    pub state: String,
    /// available or unavailable (observed).
    pub health: String,
    pub active_connections: u64,
    pub total_connections: u64,
    /// Client → node.
    pub bytes_in: u64,
    /// Node → client.
    pub bytes_out: u64,
    pub connect_failures: u64,
    pub health_transitions: u64,
    /// New connections per second.
    pub connection_rate: f64,
    /// Bytes per second, both ways.
    pub traffic_rate: f64,
    /// The active check's verdict, in a cluster with `[cluster.check]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckStatus>,
    /// Destination ports refused by a node without a port of its own
    /// (each out of service alone; see docs/availability.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down_ports: Vec<u16>,
    /// While slow start ramps the node up: its share of new clients now,
    /// as a fraction of its weight's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start_share: Option<f64>,
    /// A drain's deadline (RFC 3339): the node turns red then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Who set the run-time state in force (absent: the file's state), and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_set_by: Option<SetBy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// `passing` or `failing`: the latest check's verdict.
    pub status: String,
    /// Why the latest check failed (absent while passing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the verdict became what it is (RFC 3339).
    pub since: String,
}

impl Status {
    /// The status now, sorted by name.
    pub fn of(control: &Control) -> Status {
        let snapshot = control.snapshot();
        let redirects = control.redirects();
        let state = control.state();
        let instance = state
            .file
            .shared
            .as_ref()
            .map_or_else(|| "this instance".to_string(), |s| s.instance.clone());
        let set_by = |origin: &crate::control::Origin| SetBy {
            instance: origin.instance.clone().unwrap_or_else(|| instance.clone()),
            at: rfc3339_ms(origin.at_ms),
        };
        let bound = control.data().listen_addrs();
        let mut services: Vec<ServiceStatus> = snapshot
            .services
            .values()
            .map(|s| ServiceStatus {
                name: s.name.clone(),
                listen: s.listen.iter().map(|l| l.to_string()).collect(),
                bound: bound
                    .iter()
                    .filter(|(name, _)| *name == s.name)
                    .map(|(_, a)| a.to_string())
                    .collect(),
                cluster: s.cluster.clone(),
                redirected_from: redirects.get(&s.name).cloned(),
                redirect_set_by: state.overrides.redirects.get(&s.name).map(|o| set_by(&o.origin)),
                active_connections: s.figures.active_connections(),
                total_connections: s.figures.accepted(),
                refused_connections: Refusal::ALL.iter().map(|r| s.figures.refused(*r)).sum(),
                refused: Refusal::ALL
                    .iter()
                    .map(|r| (r.name().to_string(), s.figures.refused(*r)))
                    .collect(),
                closed_max_age: s.figures.aged_out(),
                routes: s
                    .routes
                    .iter()
                    .zip(&s.route_connections)
                    .map(|(r, n)| RouteStatus {
                        sni: r.names.iter().map(|n| n.text()).collect(),
                        cluster: r.cluster.clone(),
                        connections: n.load(std::sync::atomic::Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut clusters = clusters(&snapshot);
        // What the run-time state in force says of each node: who set it, and a drain's deadline.
        for c in &mut clusters {
            for n in &mut c.nodes {
                if let Some(o) = state.overrides.node_states.get(&(c.name.clone(), n.name.clone())) {
                    n.state_set_by = Some(set_by(&o.origin));
                    n.deadline = o.red_at_ms.map(rfc3339_ms);
                }
            }
        }
        Status {
            pid: std::process::id(),
            services,
            clusters,
            store: state.file.shared.as_ref().map(|s| StoreStatus {
                url: s.display_url(),
                instance: s.instance.clone(),
                up: control.live().store_figures.is_up(),
                slow: control.live().store_figures.is_slow(),
            }),
        }
    }
}

/// Unix milliseconds as RFC 3339, to the second.
fn rfc3339_ms(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn check_status(report: CheckReport) -> CheckStatus {
    CheckStatus {
        status: if report.passing { "passing" } else { "failing" }.to_string(),
        last_error: report.last_error,
        since: humantime::format_rfc3339_seconds(report.since).to_string(),
    }
}

fn clusters(snapshot: &Snapshot) -> Vec<ClusterStatus> {
    let mut clusters: Vec<ClusterStatus> = snapshot
        .clusters
        .values()
        .map(|c| ClusterStatus {
            name: c.name.clone(),
            algorithm: c.algorithm.name().to_string(),
            affinity: c.affinity,
            nodes: c
                .nodes
                .iter()
                .map(|n| node(n, n.fallover.map(|i| c.nodes[i].name.clone())))
                .collect(),
        })
        .collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    clusters
}

fn node(n: &Node, fallover: Option<String>) -> NodeStatus {
    let f = &n.figures;
    let (connection_rate, traffic_rate) = rates(n);
    NodeStatus {
        name: n.name.clone(),
        address: n.address_text.clone(),
        weight: n.weight,
        fallover,
        state: f.state().name().to_string(),
        health: if f.is_available() { "available" } else { "unavailable" }.to_string(),
        active_connections: f.active_connections(),
        total_connections: f.total_connections(),
        bytes_in: f.bytes_in(),
        bytes_out: f.bytes_out(),
        connect_failures: f.connect_failures(),
        health_transitions: f.health_transitions(),
        connection_rate,
        traffic_rate,
        check: f.check_report().map(check_status),
        down_ports: f.down_ports(),
        slow_start_share: match f.ramp_permille() {
            FULL_PERMILLE => None,
            permille => Some(f64::from(permille) / f64::from(FULL_PERMILLE)),
        },
        deadline: None,
        state_set_by: None,
    }
}

/// A node's connection and traffic rates (per second): the EWMA figures that
/// `crate::model::rates` samples for the rate-based algorithms.
fn rates(node: &Node) -> (f64, f64) {
    (node.figures.connection_rate(), node.figures.traffic_rate())
}
