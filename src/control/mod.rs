//! The control plane's owner: the control state (the file's configuration
//! and the run-time overrides on top of it) and every change to it — reload,
//! node state, redirect — one at a time under one lock. Each change builds
//! a whole new snapshot from the effective configuration and publishes it;
//! a reload is first decided by the pure [`plan`], then carried out here.
//!
//! It tells the data plane what to do (bind, open, close listeners) and
//! never touches a connection. The admin API calls it; it knows nothing of
//! HTTP.

pub mod handover;
mod plan;
pub mod privileges;
pub mod shared;
mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{info, warn};

pub use plan::{Plan, Refusal, RestartOnly, plan};
pub use state::{ControlState, Dropped, Origin, Override, Overrides, Process};

use crate::config::{AdminConfig, AdminListen, Config, ConfigError, NodeState};
use crate::model::{Live, Snapshot};
use crate::proxy::{BindError, DataPlane, warn_capped_socket_buffers};

/// The file's state of a node the file has, or which of the two names it lacks.
fn known_node(control: &ControlState, cluster: &str, node: &str) -> Result<NodeState, ControlError> {
    control.file_state(cluster, node).ok_or_else(|| {
        if control.file.cluster(cluster).is_none() {
            ControlError::UnknownCluster(cluster.into())
        } else {
            ControlError::UnknownNode {
                cluster: cluster.into(),
                node: node.into(),
            }
        }
    })
}

fn node_key(cluster: &str, node: &str) -> shared::OverrideKey {
    shared::OverrideKey::NodeState {
        cluster: cluster.to_string(),
        node: node.to_string(),
    }
}

/// How often drain deadlines are looked at: a node turns red at most this late.
const DRAIN_TICK: Duration = Duration::from_millis(250);

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
    Bind(#[from] BindError),
    /// The file is valid, but the running process cannot take it (see [`Refusal`]).
    #[error("{0}")]
    Refused(Refusal),
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
    /// `cluster/node` of each run-time state dropped because the file changed that node.
    #[serde(default)]
    pub states_dropped: Vec<String>,
    /// Settings changed in the file that take effect at the next start.
    #[serde(default)]
    pub restart_only: Vec<String>,
}

/// A handle on the control state; clones share it.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

/// Where an upgrade's outcome is sent: the new process's pid, or why not.
pub type UpgradeReply = tokio::sync::oneshot::Sender<Result<u32, String>>;

struct Inner {
    state: Mutex<ControlState>,
    /// Upgrades asked for through the API, to whoever runs them (the process's main loop).
    upgrades: tokio::sync::mpsc::Sender<UpgradeReply>,
    upgrade_requests: Mutex<Option<tokio::sync::mpsc::Receiver<UpgradeReply>>>,
    live: Arc<Live>,
    data: Arc<DataPlane>,
    /// The file `reload` reads; unset for `forward` and in-process configs.
    config_path: OnceLock<PathBuf>,
    /// The `[admin]` settings now in force (token, allowed hosts), read per admin request.
    admin: ArcSwap<AdminConfig>,
    /// Run-time changes shared with twins (`[shared]`).
    sharing: Mutex<shared::Sharing>,
}

impl Control {
    /// The control state of `file` (already published in `live`), over `data`.
    pub fn new(file: Config, live: Arc<Live>, data: Arc<DataPlane>) -> Control {
        let (upgrades, requests) = tokio::sync::mpsc::channel(8);
        Control {
            inner: Arc::new(Inner {
                upgrades,
                upgrade_requests: Mutex::new(Some(requests)),
                admin: ArcSwap::from_pointee(file.admin.clone()),
                state: Mutex::new(ControlState::new(file)),
                live,
                data,
                config_path: OnceLock::new(),
                sharing: Mutex::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // Every change is applied whole before the lock is released.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot the data plane uses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.live.snapshot.load_full()
    }

    /// The live state: snapshot and pins.
    pub fn live(&self) -> &Arc<Live> {
        &self.inner.live
    }

    /// The data plane this control plane drives.
    pub fn data(&self) -> &DataPlane {
        &self.inner.data
    }

    /// Remembers the file that [`Control::reload`] re-reads.
    pub fn set_config_path(&self, path: PathBuf) {
        let _ = self.inner.config_path.set(path);
    }

    /// The `[admin]` settings in force now (a reload may change the token
    /// and the allowed hosts).
    pub fn admin_config(&self) -> Arc<AdminConfig> {
        self.inner.admin.load_full()
    }

    /// The admin token in force now (a reload may change it).
    pub fn admin_token(&self) -> Option<String> {
        self.inner.admin.load().token.clone()
    }

    /// Records the admin socket as bound: a reload is judged against it
    /// (see [`plan`]).
    pub fn note_admin_bound(&self, bound: AdminListen) {
        self.lock().process.admin = Some(bound);
    }

    /// Records that the process dropped to a user, keeping `dropped.kept`:
    /// a reload that needs more is refused (see [`plan`]).
    pub fn note_dropped(&self, dropped: Dropped) {
        self.lock().process.dropped = Some(dropped);
    }

    /// Asks for an upgrade in place (`POST /api/v1/upgrade`) and waits for
    /// its outcome: the new process's pid, or why there is none.
    pub async fn request_upgrade(&self) -> Result<u32, String> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.inner
            .upgrades
            .try_send(reply)
            .map_err(|_| "an upgrade is already running".to_string())?;
        outcome
            .await
            .unwrap_or_else(|_| Err("this balancer does not run upgrades (started from the library)".into()))
    }

    /// The upgrades asked for through the API, once: for the loop that runs them.
    pub fn upgrade_requests(&self) -> Option<tokio::sync::mpsc::Receiver<UpgradeReply>> {
        self.inner
            .upgrade_requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Takes over the run-time overrides of the process this one upgraded
    /// from: each one whose node, or service and cluster, the file still has.
    pub fn adopt_overrides(&self, overrides: Overrides) {
        let mut control = self.lock();
        for ((cluster, node), state) in overrides.node_states {
            if control
                .file_state(&cluster, &node)
                .is_some_and(|file| file != state.value || state.red_at_ms.is_some())
            {
                control.overrides.node_states.insert((cluster, node), state);
            }
        }
        for (service, target) in overrides.redirects {
            let known = control.file_cluster(&service).is_some_and(|c| c != target.value)
                && control.file.cluster(&target.value).is_some();
            if known {
                control.overrides.redirects.insert(service, target);
            }
        }
        self.publish(&control);
    }

    /// A copy of the control state now.
    pub fn state(&self) -> ControlState {
        self.lock().clone()
    }

    /// The run-time redirects in force: service → the file's cluster it overrides.
    pub fn redirects(&self) -> BTreeMap<String, String> {
        let state = self.lock();
        state
            .overrides
            .redirects
            .keys()
            .filter_map(|service| Some((service.clone(), state.file_cluster(service)?.to_string())))
            .collect()
    }

    /// Sets a node's state at run time; it lasts until the file changes that
    /// node (see [`plan`]). Setting the file's own state removes the override.
    pub fn set_node_state(&self, cluster: &str, node: &str, state: NodeState) -> Result<(), ControlError> {
        let mut control = self.lock();
        let file_state = known_node(&control, cluster, node)?;
        let key = (cluster.to_string(), node.to_string());
        let now = self.inner.live.clock().now_ms();
        if file_state == state {
            control.overrides.node_states.remove(&key);
        } else {
            control.overrides.node_states.insert(key, Override::here(state, now));
        }
        self.apply_node_state(cluster, node, state);
        drop(control);
        let shared_value = (file_state != state).then(|| state.name().to_string());
        self.shared_change(node_key(cluster, node), shared_value, now, None);
        Ok(())
    }

    /// Drains a node now (yellow) and turns it red once `deadline` has
    /// passed, unless its state is set again meanwhile. The deadline lasts
    /// as the override does: across an upgrade, and across reloads that
    /// leave the node as it was.
    pub fn drain_until(&self, cluster: &str, node: &str, deadline: Duration) -> Result<(), ControlError> {
        let mut control = self.lock();
        known_node(&control, cluster, node)?;
        let now = self.inner.live.clock().now_ms();
        let mut drain = Override::here(NodeState::Yellow, now);
        let red_at_ms = now.saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
        drain.red_at_ms = Some(red_at_ms);
        control
            .overrides
            .node_states
            .insert((cluster.to_string(), node.to_string()), drain);
        self.apply_node_state(cluster, node, NodeState::Yellow);
        drop(control);
        let yellow = Some(NodeState::Yellow.name().to_string());
        self.shared_change(node_key(cluster, node), yellow, now, Some(red_at_ms));
        info!(cluster, node, "draining; the node turns red in {deadline:?}");
        Ok(())
    }

    /// A node's host name resolves to `address` now: new connections go
    /// there; open ones stay where they are. Lasts while the file writes
    /// the node's address as `text`.
    pub fn set_resolved(&self, cluster: &str, node: &str, text: &str, address: crate::config::NodeAddress) {
        let mut control = self.lock();
        control
            .resolved
            .insert((cluster.to_string(), node.to_string()), (text.to_string(), address));
        self.publish(&control);
    }

    /// Turns red every drained node whose deadline has passed.
    pub fn expire_drains(&self) {
        let now = self.inner.live.clock().now_ms();
        let due: Vec<(String, String)> = {
            let control = self.lock();
            control
                .overrides
                .node_states
                .iter()
                .filter(|(_, s)| s.red_at_ms.is_some_and(|at| at <= now))
                .map(|(key, _)| key.clone())
                .collect()
        };
        for (cluster, node) in due {
            info!(cluster, node, "drain deadline passed");
            // Known nodes only are in the overrides: this cannot fail but for a reload racing it.
            let _ = self.set_node_state(&cluster, &node, NodeState::Red);
        }
    }

    /// Turns drained nodes red at their deadlines until `stop` is cancelled.
    pub async fn enforce_drain_deadlines(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            self.expire_drains();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(DRAIN_TICK) => {}
            }
        }
    }

    /// Moves `service`'s new connections to `cluster` (a controller redirect);
    /// open connections keep their node. Naming the file's cluster reverts.
    pub fn set_service_cluster(&self, service: &str, cluster: &str) -> Result<(), ControlError> {
        let mut control = self.lock();
        let file_cluster = control
            .file_cluster(service)
            .ok_or_else(|| ControlError::UnknownService(service.into()))?
            .to_string();
        if control.file.cluster(cluster).is_none() {
            return Err(ControlError::UnknownCluster(cluster.into()));
        }
        let now = self.inner.live.clock().now_ms();
        if file_cluster == cluster {
            control.overrides.redirects.remove(service);
        } else {
            control
                .overrides
                .redirects
                .insert(service.into(), Override::here(cluster.into(), now));
        }
        self.publish(&control);
        drop(control);
        let key = shared::OverrideKey::Redirect {
            service: service.to_string(),
        };
        self.shared_change(key, (file_cluster != cluster).then(|| cluster.to_string()), now, None);
        info!(service, "new connections now go to cluster \"{cluster}\"");
        Ok(())
    }

    /// Re-reads the config file (SIGHUP, `POST /api/v1/reload`).
    pub async fn reload(&self) -> Result<ReloadReport, ControlError> {
        let path = self.inner.config_path.get().ok_or(ControlError::NoConfigFile)?.clone();
        // Reading the file and resolving node names block: off the runtime.
        let source_name = path.display().to_string();
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ConfigError {
                source_name,
                line: None,
                message: format!("loading stopped: {e}"),
            })??;
        self.apply(config)
    }

    /// Carries out the plan from the state in force to the file `new`. What
    /// can fail (binding new listeners) comes first: on failure nothing has
    /// changed.
    pub fn apply(&self, new: Config) -> Result<ReloadReport, ControlError> {
        let mut control = self.lock();
        let plan = plan(&control, &new);
        if let Some(refusal) = plan.refused.into_iter().next() {
            return Err(ControlError::Refused(refusal));
        }
        let data = &self.inner.data;
        let bound = data.bind(&plan.open)?;
        for setting in &plan.restart_only {
            match setting {
                RestartOnly::Threads(_) => warn!(
                    "{setting} in the file: the {} worker threads running stay until the next start",
                    data.worker_count()
                ),
                _ => warn!("{setting} in the file: takes effect at the next start"),
            }
        }
        warn_capped_socket_buffers(&new);

        control.file = new;
        control.overrides = plan.overrides.clone();
        self.publish(&control);
        self.inner.admin.store(Arc::new(control.file.admin.clone()));
        data.close(&plan.close);
        data.open(bound);
        let named = |keys: &[crate::config::ListenerKey]| -> Vec<String> {
            keys.iter().map(|k| format!("{} {}", k.service, k.addr)).collect()
        };
        let report = ReloadReport {
            opened: named(&plan.open),
            closed: named(&plan.close),
            redirects_dropped: plan.redirects_dropped,
            states_dropped: plan.states_dropped.iter().map(|(c, n)| format!("{c}/{n}")).collect(),
            restart_only: plan.restart_only.iter().map(ToString::to_string).collect(),
        };
        info!(
            "reloaded: {}; {} listener(s) opened, {} closed",
            control.file.summary(),
            report.opened.len(),
            report.closed.len()
        );
        Ok(report)
    }

    /// Publishes the snapshot of the effective configuration. Nodes that stay
    /// keep their figures, whose state is then brought to the effective one.
    fn publish(&self, control: &ControlState) {
        let effective = control.effective();
        let live = &self.inner.live;
        let current = live.snapshot.load();
        live.snapshot
            .store(Arc::new(crate::balance::compile(&effective, Some(&current))));
        for cluster in &effective.clusters {
            for node in &cluster.nodes {
                self.apply_node_state(&cluster.name, &node.name, node.state);
            }
        }
    }

    /// Brings a node of the published snapshot to `state`, when it is not in
    /// it already: the one place where a node's state changes at run time.
    /// Red also moves the node's pins for good.
    fn apply_node_state(&self, cluster: &str, node: &str, state: NodeState) {
        let snapshot = self.inner.live.snapshot.load();
        let Some((slow_start, figures)) = snapshot
            .clusters
            .get(cluster)
            .and_then(|c| Some((c.slow_start, &c.node(node)?.figures)))
        else {
            return;
        };
        if figures.state() == state {
            return;
        }
        figures.set_state(state);
        if state == NodeState::Green && figures.is_available() {
            figures.begin_ramp(slow_start);
        }
        if state == NodeState::Red {
            // Red moves pins for good: the clients of a red node are pinned anew.
            let moved = self.inner.live.pins.forget_node(cluster, node);
            info!(
                cluster,
                node, "node state set to {state}; {moved} client pin(s) dropped"
            );
        } else {
            info!(cluster, node, "node state set to {state}");
        }
    }
}
