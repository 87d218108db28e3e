//! Nodes that follow DNS: a node whose address the file gives by host name
//! is resolved again every `resolve_interval` of its cluster, at the
//! `resolver` the file names or else with the system's resolver (as at
//! load). When the name's first address (in the resolver's order) changes,
//! new connections go to the new one — `control::Control::set_resolved`
//! publishes it — and open ones stay where they are. A failed resolution
//! keeps the last good address and says so once in the log, and once again
//! when the name resolves again.
//!
//! Owns the re-resolution's pace and its log lines; never parses DNS itself
//! (hickory does, through `config::lookup_at`), never connects to a node.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{NodeAddress, host_name_of, lookup_at};
use crate::control::Control;

/// The longest one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the task sleeps when no node has a host name.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Resolves the host-name nodes of every cluster again, each cluster at its
/// own interval, until `stop` is cancelled.
pub async fn follow(control: Control, stop: CancellationToken) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut failing: HashSet<(String, String)> = HashSet::new();
    loop {
        let state = control.state();
        let now = Instant::now();
        for cluster in &state.file.clusters {
            let next = due
                .entry(cluster.name.clone())
                .or_insert(now + cluster.resolve_interval);
            if *next > now {
                continue;
            }
            *next = now + cluster.resolve_interval;
            for node in &cluster.nodes {
                let Some((host, port)) = host_name_of(&node.address_text) else {
                    continue;
                };
                let key = (cluster.name.clone(), node.name.clone());
                let timeout = LOOKUP_TIMEOUT.min(cluster.resolve_interval);
                let found = resolve(state.file.resolver, host, timeout).await;
                let current = control
                    .snapshot()
                    .clusters
                    .get(&cluster.name)
                    .and_then(|c| c.node(&node.name))
                    .map(|n| n.address);
                match found {
                    Ok(ip) => {
                        if failing.remove(&key) {
                            info!(cluster = %cluster.name, node = %node.name, "{host} resolves again");
                        }
                        let address = match port {
                            Some(port) => NodeAddress::Socket(SocketAddr::new(ip, port)),
                            None => NodeAddress::SamePort(ip),
                        };
                        if current.is_some_and(|c| c != address) {
                            info!(
                                cluster = %cluster.name, node = %node.name,
                                "{host} now resolves to {ip}: new connections go there, open ones stay"
                            );
                            control.set_resolved(&cluster.name, &node.name, &node.address_text, address);
                        }
                    }
                    Err(why) => {
                        if failing.insert(key) {
                            let kept = match current {
                                Some(NodeAddress::Socket(a)) => a.to_string(),
                                Some(NodeAddress::SamePort(ip)) => ip.to_string(),
                                None => "none".to_string(),
                            };
                            warn!(
                                cluster = %cluster.name, node = %node.name,
                                "cannot resolve {host}: {why}; keeping its last address {kept}"
                            );
                        }
                    }
                }
            }
        }
        due.retain(|name, _| state.file.clusters.iter().any(|c| c.name == *name));
        let wake = due.values().min().copied().unwrap_or(now + IDLE_TICK);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(wake.max(now + Duration::from_millis(10))) => {}
        }
    }
}

/// The first address of `host`: at `server`, or with the system's resolver.
async fn resolve(server: Option<SocketAddr>, host: &str, timeout: Duration) -> Result<IpAddr, String> {
    let found = match server {
        Some(server) => lookup_at(server, host, timeout).await?,
        None => match tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        },
    };
    found.first().copied().ok_or_else(|| "no address".to_string())
}
