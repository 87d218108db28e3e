//! The background connect probe: every cluster's `retry_interval`, each
//! unavailable node of a cluster without active checks gets one TCP connect
//! (within the cluster's `connect_timeout`); when it succeeds the node is
//! available again and takes new connections. A cluster with active checks
//! leaves that to `health::check`. Clients' connections never serve as
//! probes: a node that left selection gets no client until the probe (or
//! the check) has seen it answer.
//!
//! A node without a port of its own keeps its health per destination port
//! (see `model::Node::health_port`): a refused connect to another port than
//! its health port marks only that port down, and the probe connects to
//! each such port until it answers, whatever the cluster's checks.
//!
//! Every change of health goes through [`mark_unavailable`],
//! [`mark_available`], [`mark_failed`] or [`mark_port_up`], which log it and
//! count it in the node's figures.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::{Cluster, Live, Node, NodeFigures};

/// How long the prober sleeps when no cluster is configured.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Marks `node` unavailable (it leaves selection until a probe succeeds), and
/// logs the change. Returns whether it was available until now.
pub fn mark_unavailable(cluster: &Cluster, node: &Node, why: impl fmt::Display) -> bool {
    let changed = node.figures.mark_available(false);
    if changed {
        match &cluster.check {
            Some(check) => warn!(
                cluster = %cluster.name, node = %node.name,
                "node unavailable: {why}; it is back after {} passing check(s)", check.rise
            ),
            None => warn!(
                cluster = %cluster.name, node = %node.name,
                "node unavailable: {why}; probing it every {:?}", cluster.retry_interval
            ),
        }
    }
    changed
}

/// Marks `node` available again (a slow start ramps its share up) and logs the change.
pub fn mark_available(cluster: &Cluster, node: &Node, why: impl fmt::Display) -> bool {
    let changed = node.figures.mark_available(true);
    if changed {
        if node.figures.state() == crate::config::NodeState::Green {
            node.figures.begin_ramp(cluster.slow_start);
        }
        info!(cluster = %cluster.name, node = %node.name, "node available again: {why}");
    }
    changed
}

/// A client's connect to `target` failed: a node without a port of its
/// own loses only that port, unless it is its health port; any other node
/// becomes unavailable.
pub fn mark_failed(cluster: &Cluster, node: &Node, target: SocketAddr, why: impl fmt::Display) {
    match node.health_port {
        Some(health) if health != target.port() => {
            if node.figures.mark_port(target.port(), true) {
                warn!(
                    cluster = %cluster.name, node = %node.name,
                    "port {} of the node unavailable: {why}; its other ports stay in service, probing it every {:?}",
                    target.port(), cluster.retry_interval
                );
            }
        }
        _ => {
            mark_unavailable(cluster, node, why);
        }
    }
}

/// Destination `port` of `node` answers again.
pub fn mark_port_up(cluster: &Cluster, node: &Node, port: u16, why: impl fmt::Display) {
    // The first test spares every connection the list's lock while no port is down.
    if node.figures.is_port_down(port) && node.figures.mark_port(port, false) {
        info!(cluster = %cluster.name, node = %node.name, "port {port} of the node available again: {why}");
    }
}

/// Probes unavailable nodes, and the down ports of port-following nodes,
/// until `stop` is cancelled. Reads the snapshot afresh every round, so
/// reloads add and remove nodes and clusters.
pub async fn run(live: Arc<Live>, stop: CancellationToken) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    // Probes in flight, by node (figures identity) and port: one at a time each.
    let mut in_flight: HashSet<(usize, u16)> = HashSet::new();
    let mut probes: JoinSet<(usize, u16)> = JoinSet::new();
    loop {
        let snapshot = live.snapshot.load_full();
        let now = Instant::now();
        for cluster in snapshot.clusters.values() {
            let next = due.entry(cluster.name.clone()).or_insert(now + cluster.retry_interval);
            if *next > now {
                continue;
            }
            *next = now + cluster.retry_interval;
            for (i, node) in cluster.nodes.iter().enumerate() {
                let id = figures_id(&node.figures);
                let mut targets: Vec<(SocketAddr, Probed)> = node
                    .figures
                    .down_ports()
                    .into_iter()
                    .map(|port| (node.address.target(port), Probed::Port))
                    .collect();
                if !node.figures.is_available() && cluster.check.is_none() {
                    targets.extend(node.checked_target(None).map(|t| (t, Probed::Node)));
                }
                for (target, probed) in targets {
                    if !in_flight.insert((id, target.port())) {
                        continue;
                    }
                    let cluster = cluster.clone();
                    probes.spawn(async move {
                        probe(&cluster, i, target, probed).await;
                        (id, target.port())
                    });
                }
            }
        }
        due.retain(|name, _| snapshot.clusters.contains_key(name));
        let wake = due.values().min().copied().unwrap_or(now + IDLE_TICK);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => {}
            Some(done) = probes.join_next() => {
                if let Ok(key) = done {
                    in_flight.remove(&key);
                }
            }
        }
    }
}

/// What a probe that succeeds brings back.
#[derive(Clone, Copy)]
enum Probed {
    /// The node (it was unavailable).
    Node,
    /// One destination port of a port-following node.
    Port,
}

/// One connect to `target` for node `i` of `cluster`, within its connect timeout.
async fn probe(cluster: &Cluster, i: usize, target: SocketAddr, probed: Probed) {
    let node = &cluster.nodes[i];
    match tokio::time::timeout(cluster.connect_timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(stream)) => {
            if node.send_proxy == crate::config::ProxyHeader::V2 {
                // A node that requires the header reads a bare
                // connect as a broken one: tell it this is ours.
                let _ = stream.try_write(&local_header());
            }
            let why = format_args!("probe connected to {target}");
            match probed {
                Probed::Node => {
                    mark_available(cluster, node, why);
                }
                Probed::Port => mark_port_up(cluster, node, target.port(), why),
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(cluster = %cluster.name, node = %node.name, "probe of {target}: {e}")
        }
        Err(_) => {
            tracing::debug!(cluster = %cluster.name, node = %node.name, "probe of {target}: no answer")
        }
    }
}

/// A PROXY protocol v2 `LOCAL` header: "this connection is the balancer's
/// own", which a node that requires the header (`send_proxy = "v2"`)
/// accepts without a client address.
pub fn local_header() -> Vec<u8> {
    use ppp::v2::{Addresses, Builder, Command, Protocol, Version};
    Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        Addresses::Unspecified,
    )
    .build()
    .expect("an empty v2 header fits in memory")
}

/// A node's identity for the in-flight sets of probes and checks: its
/// figures outlive reloads.
pub(super) fn figures_id(figures: &Arc<NodeFigures>) -> usize {
    Arc::as_ptr(figures) as usize
}
