//! The running balancer: owns the published snapshot, the listeners and the
//! connection tasks, and knows how to stop them. The binary and the tests
//! both start it through [`Server::start`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::affinity::{self, Affinity};
use crate::config::Config;
use crate::health;
use crate::model::{NodeState, Snapshot};
use crate::proxy::{self, DataPlane};

/// A listening socket of a service.
struct Listener {
    service: Arc<str>,
    addr: SocketAddr,
    stop: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("service \"{service}\": cannot listen on {addr}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// Why a node's state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("no cluster is named \"{0}\"")]
    UnknownCluster(String),
    #[error("cluster \"{cluster}\" has no node named \"{node}\"")]
    UnknownNode { cluster: String, node: String },
}

pub struct Server {
    plane: Arc<DataPlane>,
    listeners: Vec<Listener>,
    accept_loops: TaskTracker,
    /// The health prober and the affinity flusher, stopped after the connections.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Server {
    /// Binds every listener of `config` and starts accepting. Fails, having
    /// started nothing, if any address cannot be bound.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let affinity = {
            let (dir, config) = (config.state_dir.clone(), config.clone());
            tokio::task::spawn_blocking(move || Affinity::open(&dir, &config, affinity::MAX_PINS_PER_CLUSTER))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!("opening the affinity store failed ({e}); keeping pins in memory only");
                    Affinity::in_memory()
                })
        };
        let plane = Arc::new(DataPlane {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None)),
            cut_all: CancellationToken::new(),
            connections: TaskTracker::new(),
            open_clients: Default::default(),
            affinity: Arc::new(affinity),
        });
        let mut bound = Vec::new();
        for service in &config.services {
            for addr in service.listen.iter().flat_map(|l| l.addrs()) {
                let listener = proxy::bind(addr).map_err(|source| StartError::Bind {
                    service: service.name.clone(),
                    addr,
                    source,
                })?;
                bound.push((Arc::<str>::from(service.name.as_str()), listener));
            }
        }
        tokio::spawn(crate::rates::sample_forever(Arc::downgrade(&plane)));
        tokio::spawn(crate::health::agent::poll_forever(Arc::downgrade(&plane)));
        let accept_loops = TaskTracker::new();
        let mut listeners = Vec::with_capacity(bound.len());
        for (service, listener) in bound {
            let addr = listener.local_addr().expect("a bound listener has an address");
            let stop = CancellationToken::new();
            info!(service = %service, "listening on {addr}");
            accept_loops.spawn(proxy::accept_loop(
                listener,
                service.clone(),
                plane.clone(),
                stop.clone(),
            ));
            listeners.push(Listener { service, addr, stop });
        }
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        background.spawn(health::probe::run(plane.clone(), stop_background.clone()));
        background.spawn(affinity::run_flusher(plane.affinity.clone(), stop_background.clone()));
        Ok(Server {
            plane,
            listeners,
            accept_loops,
            background,
            stop_background,
        })
    }

    /// Every listening address, with its service (ports chosen by the kernel resolved).
    pub fn listen_addrs(&self) -> Vec<(&str, SocketAddr)> {
        self.listeners.iter().map(|l| (&*l.service, l.addr)).collect()
    }

    /// The first listening address of `service`.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| &*l.service == service).map(|l| l.addr)
    }

    /// The snapshot the data plane uses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.plane.snapshot.load_full()
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.plane.connections.len()
    }

    /// Sets a node's state now (as `state` in the config does at start):
    /// yellow takes no new connections, red also cuts the open ones at once.
    /// Returns the previous state.
    pub fn set_node_state(&self, cluster: &str, node: &str, state: NodeState) -> Result<NodeState, NodeStateError> {
        let snapshot = self.plane.snapshot.load();
        let c = snapshot
            .clusters
            .get(cluster)
            .ok_or_else(|| NodeStateError::UnknownCluster(cluster.to_string()))?;
        let n = c.node(node).ok_or_else(|| NodeStateError::UnknownNode {
            cluster: cluster.to_string(),
            node: node.to_string(),
        })?;
        let previous = n.figures.state();
        n.figures.set_state(state);
        if state == NodeState::Red {
            // Red moves pins for good: the clients of a red node are pinned anew.
            let moved = self.plane.affinity.forget_node(cluster, node);
            info!(
                cluster,
                node, "state {previous} -> {state}; {moved} client pin(s) dropped"
            );
        } else {
            info!(cluster, node, "state {previous} -> {state}");
        }
        Ok(previous)
    }

    /// The client pins of every cluster.
    pub fn affinity(&self) -> &Affinity {
        &self.plane.affinity
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// cuts the rest. Returns how many were cut.
    pub async fn shutdown(self, grace: Duration) -> usize {
        for l in &self.listeners {
            l.stop.cancel();
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
        let open = self.plane.connections.len();
        if open > 0 {
            info!("stopped accepting; waiting up to {grace:?} for {open} open connection(s)");
        }
        self.plane.connections.close();
        let cut = if tokio::time::timeout(grace, self.plane.connections.wait()).await.is_ok() {
            0
        } else {
            let cut = self.plane.connections.len();
            info!("grace period over: cutting {cut} connection(s)");
            self.plane.cut_all.cancel();
            self.plane.connections.wait().await;
            cut
        };
        self.stop_background.cancel();
        self.background.close();
        self.background.wait().await;
        cut
    }
}
