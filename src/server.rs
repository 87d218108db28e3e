//! The running balancer: owns the published snapshot, the listeners and the
//! connection tasks, and knows how to stop them. The binary and the tests
//! both start it through [`Server::start`].
//!
//! It is also the owner of run-time changes (the control state): reloads,
//! controller redirects and node states all go through a `Server` method,
//! which builds a whole new snapshot and swaps it in; the admin API only calls
//! these methods.
//!
//! Rules for run-time changes across a reload (see docs/admin.md):
//! - a redirect (`set_service_cluster`) is kept until the file changes that
//!   service's `cluster` (or drops the service or the target cluster);
//! - a node state set at run time is kept until the file changes that node's
//!   `state` (a node whose address changes is a new node and takes the file's state).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::affinity::{self, Affinity};
use crate::config::{Config, ConfigError};
use crate::config::{ListenerKey, diff};
use crate::health;
use crate::model::{NodeState, Snapshot};
use crate::proxy::{self, DataPlane};

/// A listening socket of a service.
struct Listener {
    service: Arc<str>,
    /// As the file names it (port 0 stays 0): the listener's identity across reloads.
    configured: SocketAddr,
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
    #[error("admin API: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the worker threads: {0}")]
    Workers(io::Error),
}

/// Why a run-time change was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no service named \"{0}\"")]
    UnknownService(String),
    #[error("no cluster named \"{0}\"")]
    UnknownCluster(String),
    #[error("cluster \"{cluster}\" has no node named \"{node}\"")]
    UnknownNode { cluster: String, node: String },
    #[error("no config file to reload (the balancer was started without --config)")]
    NoConfigFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] StartError),
}

/// What a reload did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    /// `service address` of each listener opened.
    pub opened: Vec<String>,
    /// `service address` of each listener closed.
    pub closed: Vec<String>,
    /// Redirects dropped because the file changed that service's cluster (or dropped the service or cluster).
    pub redirects_dropped: Vec<String>,
}

/// The control state: the config as the file says it and the run-time
/// redirects on top of it. Changed only under the lock, one change at a time.
struct Control {
    file: Config,
    /// service → cluster, set through the admin API.
    redirects: BTreeMap<String, String>,
}

/// A handle on the running balancer. Clones share it: the admin API holds one.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

/// What every handle of one balancer shares.
struct Shared {
    plane: Arc<DataPlane>,
    /// The data plane's threads: every accept loop and connection runs there.
    workers: proxy::Workers,
    listeners: Mutex<Vec<Listener>>,
    accept_loops: TaskTracker,
    control: tokio::sync::Mutex<Control>,
    /// The file `reload` reads; unset for `forward` and in-process configs.
    config_path: OnceLock<PathBuf>,
    /// The admin token of the config now in force, read per admin request.
    admin_token: ArcSwap<Option<String>>,
    /// Cancelled at shutdown: stops the admin API.
    admin_stop: CancellationToken,
    /// The health prober and the affinity flusher, stopped after the connections.
    background: TaskTracker,
    stop_background: CancellationToken,
}

impl Server {
    /// Starts the worker threads (`config.threads`), binds every listener of
    /// `config` and starts accepting. Fails, having started nothing, if any
    /// address cannot be bound. The control plane (admin API, health probes,
    /// the affinity flusher) runs on the caller's runtime.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        warn_capped_socket_buffers(config);
        let workers =
            proxy::Workers::start(config.threads, config.pin_workers, config.busy_poll).map_err(StartError::Workers)?;
        let keys = crate::config::listeners(config);
        let bound = bind_all(keys.iter(), &workers)?;
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
        let server = Server {
            shared: Arc::new(Shared {
                plane,
                workers,
                listeners: Mutex::new(Vec::new()),
                accept_loops: TaskTracker::new(),
                control: tokio::sync::Mutex::new(Control {
                    file: config.clone(),
                    redirects: BTreeMap::new(),
                }),
                config_path: OnceLock::new(),
                admin_token: ArcSwap::from_pointee(config.admin.token.clone()),
                admin_stop: CancellationToken::new(),
                background: TaskTracker::new(),
                stop_background: CancellationToken::new(),
            }),
        };
        tokio::spawn(crate::rates::sample_forever(Arc::downgrade(&server.shared.plane)));
        tokio::spawn(crate::health::agent::poll_forever(Arc::downgrade(&server.shared.plane)));
        let (shared, stop) = (&server.shared, &server.shared.stop_background);
        shared
            .background
            .spawn(health::probe::run(shared.plane.clone(), stop.clone()));
        shared
            .background
            .spawn(affinity::run_flusher(shared.plane.affinity.clone(), stop.clone()));
        server.start_listeners(bound);
        Ok(server)
    }

    /// Starts the admin API on the config's `[admin] listen` and returns the
    /// bound address. It stops at [`Server::shutdown`].
    pub async fn start_admin(&self) -> Result<SocketAddr, StartError> {
        let addr = self.shared.control.lock().await.file.admin.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::AdminBind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StartError::AdminBind { addr, source })?;
        info!("admin listening on {bound}");
        tokio::spawn(crate::admin::serve(
            listener,
            self.clone(),
            self.shared.admin_stop.clone(),
        ));
        Ok(bound)
    }

    /// The run-time redirects in force: service → the file's cluster it overrides.
    pub async fn redirects(&self) -> BTreeMap<String, String> {
        let control = self.shared.control.lock().await;
        control
            .redirects
            .keys()
            .filter_map(|service| {
                let file = control.file.services.iter().find(|s| &s.name == service)?;
                Some((service.clone(), file.cluster.clone()))
            })
            .collect()
    }

    /// Remembers the file that [`Server::reload`] re-reads.
    pub fn set_config_path(&self, path: PathBuf) {
        let _ = self.shared.config_path.set(path);
    }

    /// The admin token in force now (a reload may change it).
    pub fn admin_token(&self) -> Arc<Option<String>> {
        self.shared.admin_token.load_full()
    }

    /// Every listening address, with its service (ports chosen by the kernel resolved).
    pub fn listen_addrs(&self) -> Vec<(String, SocketAddr)> {
        let listeners = self.shared.listeners.lock().expect("listeners lock");
        listeners.iter().map(|l| (l.service.to_string(), l.addr)).collect()
    }

    /// The first listening address of `service`.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        let listeners = self.shared.listeners.lock().expect("listeners lock");
        listeners.iter().find(|l| &*l.service == service).map(|l| l.addr)
    }

    /// The snapshot the data plane uses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.plane.snapshot.load_full()
    }

    /// Clients each worker thread has accepted since start.
    pub fn accepted_by_worker(&self) -> Vec<u64> {
        self.shared.workers.accepted()
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.shared.plane.connections.len()
    }

    /// Sets a node's state. The one place where a state changes at run time:
    /// the admin API and reloads both come here.
    pub fn set_node_state(&self, cluster: &str, node: &str, state: NodeState) -> Result<(), ControlError> {
        let snapshot = self.shared.plane.snapshot.load();
        let c = snapshot
            .clusters
            .get(cluster)
            .ok_or_else(|| ControlError::UnknownCluster(cluster.into()))?;
        let n = c.node(node).ok_or_else(|| ControlError::UnknownNode {
            cluster: cluster.into(),
            node: node.into(),
        })?;
        n.figures.set_state(state);
        if state == NodeState::Red {
            // Red moves pins for good: the clients of a red node are pinned anew.
            let moved = self.shared.plane.affinity.forget_node(cluster, node);
            info!(
                cluster,
                node, "node state set to {state}; {moved} client pin(s) dropped"
            );
        } else {
            info!(cluster, node, "node state set to {state}");
        }
        Ok(())
    }

    /// The client pins of every cluster.
    pub fn affinity(&self) -> &Affinity {
        &self.shared.plane.affinity
    }

    /// Moves `service`'s new connections to `cluster` (a controller redirect);
    /// open connections keep their node. Naming the file's cluster reverts.
    pub async fn set_service_cluster(&self, service: &str, cluster: &str) -> Result<(), ControlError> {
        let mut control = self.shared.control.lock().await;
        let file_cluster = control
            .file
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.cluster.clone())
            .ok_or_else(|| ControlError::UnknownService(service.into()))?;
        if control.file.cluster(cluster).is_none() {
            return Err(ControlError::UnknownCluster(cluster.into()));
        }
        if file_cluster == cluster {
            control.redirects.remove(service);
        } else {
            control.redirects.insert(service.into(), cluster.into());
        }
        self.publish(&control);
        info!(service, "new connections now go to cluster \"{cluster}\"");
        Ok(())
    }

    /// Re-reads the config file (SIGHUP, `POST /api/v1/reload`).
    pub async fn reload(&self) -> Result<ReloadReport, ControlError> {
        let path = self.shared.config_path.get().ok_or(ControlError::NoConfigFile)?.clone();
        let mut control = self.shared.control.lock().await;
        // Reading the file and resolving node names block: off the runtime.
        let source_name = path.display().to_string();
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ConfigError {
                source_name,
                line: None,
                message: format!("loading stopped: {e}"),
            })??;
        self.apply(&mut control, config)
    }

    /// Builds everything the new config needs first (listeners bound, snapshot
    /// built); only when nothing can fail any more does it swap and close.
    fn apply(&self, control: &mut Control, new: Config) -> Result<ReloadReport, ControlError> {
        let old = &control.file;
        let listeners = diff(old, &new);
        let bound = bind_all(listeners.open.iter(), &self.shared.workers)?;

        let mut report = ReloadReport::default();
        let redirects = std::mem::take(&mut control.redirects);
        for (service, target) in redirects {
            let file_before = old.services.iter().find(|s| s.name == service).map(|s| &s.cluster);
            let file_now = new.services.iter().find(|s| s.name == service).map(|s| &s.cluster);
            if file_now.is_some() && file_now == file_before && new.cluster(&target).is_some() {
                control.redirects.insert(service, target);
            } else {
                report.redirects_dropped.push(service);
            }
        }
        let states_changed: Vec<(String, String, NodeState)> = new
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
            .filter(|(c, n)| {
                old.cluster(&c.name)
                    .and_then(|oc| oc.nodes.iter().find(|on| on.name == n.name && on.address == n.address))
                    .is_some_and(|on| on.state != n.state)
            })
            .map(|(c, n)| (c.name.clone(), n.name.clone(), n.state))
            .collect();
        if new.threads != old.threads {
            warn!(
                "threads = {} in the file: the {} worker threads running stay until the next start",
                new.threads,
                self.shared.workers.count()
            );
        }
        if new.pin_workers != old.pin_workers {
            warn!(
                "pin_workers = {} in the file: takes effect at the next start",
                new.pin_workers
            );
        }
        if new.busy_poll != old.busy_poll {
            warn!("busy_poll changed in the file: takes effect at the next start");
        }
        warn_capped_socket_buffers(&new);
        if new.admin.listen != old.admin.listen {
            warn!(
                "[admin] listen changed to {}: takes effect at the next start",
                new.admin.listen
            );
        }

        control.file = new;
        self.publish(control);
        self.shared
            .admin_token
            .store(Arc::new(control.file.admin.token.clone()));
        for (cluster, node, state) in states_changed {
            // The node is in the snapshot just published: this cannot fail.
            let _ = self.set_node_state(&cluster, &node, state);
        }
        self.shared.listeners.lock().expect("listeners lock").retain(|l| {
            let closing = listeners
                .close
                .iter()
                .any(|k| *k.service == *l.service && k.addr == l.configured);
            if closing {
                // The accept loop ends; connections it accepted keep going.
                l.stop.cancel();
                info!(service = %l.service, "closed listener on {}", l.addr);
            }
            !closing
        });
        report.closed = listeners
            .close
            .iter()
            .map(|k| format!("{} {}", k.service, k.addr))
            .collect();
        report.opened = listeners
            .open
            .iter()
            .map(|k| format!("{} {}", k.service, k.addr))
            .collect();
        self.start_listeners(bound);
        info!(
            "reloaded: {}; {} listener(s) opened, {} closed",
            control.file.summary(),
            report.opened.len(),
            report.closed.len()
        );
        Ok(report)
    }

    /// Publishes the snapshot of the file's config with the run-time redirects
    /// applied. Figures of nodes and services that stay carry over.
    fn publish(&self, control: &Control) {
        let mut effective = control.file.clone();
        for service in &mut effective.services {
            if let Some(target) = control.redirects.get(&service.name) {
                service.cluster.clone_from(target);
            }
        }
        let current = self.shared.plane.snapshot.load();
        self.shared
            .plane
            .snapshot
            .store(Arc::new(Snapshot::build(&effective, Some(&current))));
    }

    /// Starts the accept loops of each bound listener: each worker accepts
    /// from its own socket of the group and its neighbour's
    /// (`proxy::share_with_neighbours`).
    fn start_listeners(&self, bound: Vec<(ListenerKey, Vec<std::net::TcpListener>)>) {
        let mut listeners = self.shared.listeners.lock().expect("listeners lock");
        let steered = self.shared.workers.steering().is_some();
        for (key, group) in bound {
            let addr = group[0].local_addr().expect("a bound listener has an address");
            let service = Arc::<str>::from(key.service.as_str());
            let stop = CancellationToken::new();
            info!(service = %service, "listening on {addr}");
            for (worker, listener) in proxy::share_with_neighbours(group, steered) {
                let accept = proxy::accept_loop(
                    listener,
                    service.clone(),
                    self.shared.plane.clone(),
                    self.shared.workers.accept_count(worker),
                    stop.clone(),
                );
                self.shared
                    .workers
                    .spawn_on(worker, self.shared.accept_loops.track_future(accept));
            }
            listeners.push(Listener {
                service,
                configured: key.addr,
                addr,
                stop,
            });
        }
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// cuts the rest. Returns how many were cut.
    pub async fn shutdown(self, grace: Duration) -> usize {
        self.shared.admin_stop.cancel();
        for l in self.shared.listeners.lock().expect("listeners lock").iter() {
            l.stop.cancel();
        }
        self.shared.accept_loops.close();
        self.shared.accept_loops.wait().await;
        let open = self.shared.plane.connections.len();
        if open > 0 {
            info!("stopped accepting; waiting up to {grace:?} for {open} open connection(s)");
        }
        self.shared.plane.connections.close();
        let cut = if tokio::time::timeout(grace, self.shared.plane.connections.wait())
            .await
            .is_ok()
        {
            0
        } else {
            let cut = self.shared.plane.connections.len();
            info!("grace period over: cutting {cut} connection(s)");
            self.shared.plane.cut_all.cancel();
            self.shared.plane.connections.wait().await;
            cut
        };
        // Last: the affinity flusher writes the pins of the connections just ended.
        self.shared.stop_background.cancel();
        self.shared.background.close();
        self.shared.background.wait().await;
        // Last: a worker hands over its batched access-log lines as it ends.
        self.shared.workers.stop().await;
        cut
    }
}

/// Binds every listener named, one socket per worker each, or none: on the
/// first failure the ones already bound are dropped (closed) and the error
/// says which address failed.
fn bind_all<'a>(
    keys: impl Iterator<Item = &'a ListenerKey>,
    workers: &proxy::Workers,
) -> Result<Vec<(ListenerKey, Vec<std::net::TcpListener>)>, StartError> {
    keys.map(|key| {
        proxy::bind_group(key.addr, workers.count(), workers.steering())
            .map(|l| (key.clone(), l))
            .map_err(|source| StartError::Bind {
                service: key.service.clone(),
                addr: key.addr,
                source,
            })
    })
    .collect()
}

/// Warns about each `socket_buffer` larger than the kernel grants an
/// unprivileged `setsockopt` (`net.core.rmem_max` / `wmem_max`): Linux caps
/// it there without an error, and an operator who asked for more should
/// know. Reads the two limits only when some `socket_buffer` is set (a start
/// without one pays nothing), and says nothing where they cannot be read.
fn warn_capped_socket_buffers(config: &Config) {
    let sized = socket_buffers(config);
    if sized.is_empty() {
        return;
    }
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
    };
    if let (Some(rmem_max), Some(wmem_max)) = (read("rmem_max"), read("wmem_max")) {
        for message in capped_socket_buffers(&sized, rmem_max, wmem_max) {
            warn!("{message}");
        }
    }
}

/// Every `socket_buffer` of `config`: who sets it, and the size in bytes.
fn socket_buffers(config: &Config) -> Vec<(String, usize)> {
    let services = config
        .services
        .iter()
        .map(|s| (format!("service \"{}\"", s.name), s.limits.socket_buffer));
    let clusters = config
        .clusters
        .iter()
        .map(|c| (format!("cluster \"{}\"", c.name), c.socket_buffer));
    services
        .chain(clusters)
        .filter_map(|(owner, size)| Some((owner, size?.bytes())))
        .collect()
}

/// The sizes of `sized` above `rmem_max` or `wmem_max`, each described for the log.
fn capped_socket_buffers(sized: &[(String, usize)], rmem_max: usize, wmem_max: usize) -> Vec<String> {
    sized
        .iter()
        .filter(|(_, size)| *size > rmem_max.min(wmem_max))
        .map(|(owner, size)| {
            format!(
                "{owner}: socket_buffer = {size} bytes is above net.core.rmem_max ({rmem_max}) or \
                 net.core.wmem_max ({wmem_max}); Linux caps each buffer at its maximum: raise them \
                 for the full size"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_buffers_above_the_kernel_maximum_are_named() {
        let config = Config::parse(
            "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"a\"\nsocket_buffer = \"1m\"\n\
             [[cluster]]\nname = \"a\"\nsocket_buffer = \"128k\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n\
             [[cluster]]\nname = \"b\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        let sized = socket_buffers(&config);
        assert_eq!(sized.len(), 2, "the service and cluster a set one; b does not");
        // Debian's defaults: 208 KiB each.
        let capped = capped_socket_buffers(&sized, 212_992, 212_992);
        assert_eq!(capped.len(), 1, "{capped:?}");
        assert!(
            capped[0].starts_with("service \"web\": socket_buffer = 1048576 bytes is above net.core.rmem_max (212992)"),
            "{}",
            capped[0]
        );
        assert!(capped_socket_buffers(&sized, 4 << 20, 4 << 20).is_empty());
        assert_eq!(
            capped_socket_buffers(&sized, 4 << 20, 100_000).len(),
            2,
            "wmem_max counts too"
        );
    }
}
