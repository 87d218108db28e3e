//! The background connect probe: every cluster's `retry_interval`, each
//! unavailable node of the cluster gets one TCP connect (within the cluster's
//! `connect_timeout`); when it succeeds the node is available again and takes
//! new connections. Clients' connections never serve as probes: a node that
//! left selection gets no client until the probe has seen it answer.
//!
//! Every change of health goes through [`mark_unavailable`] or
//! [`mark_available`], which log it and count it in the node's figures.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::NodeAddress;
use crate::model::{Cluster, Live, Node, NodeFigures, Snapshot};

/// How long the prober sleeps when no cluster is configured.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Marks `node` unavailable (it leaves selection until a probe succeeds), and
/// logs the change. Returns whether it was available until now.
pub fn mark_unavailable(cluster: &Cluster, node: &Node, why: impl fmt::Display) -> bool {
    let changed = node.figures.mark_available(false);
    if changed {
        warn!(
            cluster = %cluster.name, node = %node.name,
            "node unavailable: {why}; probing it every {:?}", cluster.retry_interval
        );
    }
    changed
}

/// Marks `node` available again and logs the change.
pub fn mark_available(cluster: &Cluster, node: &Node, why: impl fmt::Display) -> bool {
    let changed = node.figures.mark_available(true);
    if changed {
        info!(cluster = %cluster.name, node = %node.name, "node available again: {why}");
    }
    changed
}

/// Probes unavailable nodes until `stop` is cancelled. Reads the snapshot
/// afresh every round, so reloads add and remove nodes and clusters.
pub async fn run(live: Arc<Live>, stop: CancellationToken) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    // Nodes whose probe is still in flight (by figures identity): one probe per node at a time.
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut probes: JoinSet<usize> = JoinSet::new();
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
                if node.figures.is_available() || in_flight.contains(&id) {
                    continue;
                }
                let Some(target) = probe_target(&snapshot, cluster, node) else {
                    continue;
                };
                in_flight.insert(id);
                let cluster = cluster.clone();
                probes.spawn(async move {
                    let node = &cluster.nodes[i];
                    match tokio::time::timeout(cluster.connect_timeout, tokio::net::TcpStream::connect(target)).await {
                        Ok(Ok(stream)) => {
                            if node.send_proxy == crate::config::ProxyHeader::V2 {
                                // A node that requires the header reads a bare
                                // connect as a broken one: tell it this is ours.
                                let _ = stream.try_write(&local_header());
                            }
                            mark_available(&cluster, node, format_args!("probe connected to {target}"));
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(cluster = %cluster.name, node = %node.name, "probe of {target}: {e}")
                        }
                        Err(_) => {
                            tracing::debug!(cluster = %cluster.name, node = %node.name, "probe of {target}: no answer")
                        }
                    }
                    figures_id(&node.figures)
                });
            }
        }
        due.retain(|name, _| snapshot.clusters.contains_key(name));
        let wake = due.values().min().copied().unwrap_or(now + IDLE_TICK);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => {}
            Some(done) = probes.join_next() => {
                if let Ok(id) = done {
                    in_flight.remove(&id);
                }
            }
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

/// A node's identity for the in-flight set: its figures outlive reloads.
fn figures_id(figures: &Arc<NodeFigures>) -> usize {
    Arc::as_ptr(figures) as usize
}

/// Where to probe `node`. A node without a port (it takes the client's port)
/// is probed on the first port of a service its cluster serves.
fn probe_target(snapshot: &Snapshot, cluster: &Cluster, node: &Node) -> Option<std::net::SocketAddr> {
    match node.address {
        NodeAddress::Socket(addr) => Some(addr),
        NodeAddress::SamePort(_) => {
            let service = snapshot.services.values().find(|s| s.cluster == cluster.name)?;
            let port = service.listen.first()?.first_port;
            (port != 0).then(|| node.address.target(port))
        }
    }
}
