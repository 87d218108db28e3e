//! The control state: the configuration as the file says it, plus the
//! changes made at run time (node states, service redirects) on top of it,
//! and what the running process holds that no file changes (the admin
//! socket it bound, the privileges it kept). Plain values, no locks and no
//! I/O: [`super::Control`] owns one and changes it one step at a time.

use std::collections::BTreeMap;

use super::privileges::{DEFAULT_UNPRIVILEGED_PORT_START, Privileges};
use crate::config::{AdminListen, Config, NodeAddress, NodeState};

/// Where and when a run-time change was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// The instance that made it; `None`: this one.
    pub instance: Option<String>,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// A value set at run time over the file's, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Override<T> {
    pub value: T,
    pub origin: Origin,
    /// A node state's drain deadline (`ctl state … yellow --deadline`): in
    /// Unix milliseconds, when the node turns red. Always `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub red_at_ms: Option<u64>,
}

impl<T> Override<T> {
    /// `value`, set by this instance at `at_ms`.
    pub fn here(value: T, at_ms: u64) -> Override<T> {
        Override {
            value,
            origin: Origin { instance: None, at_ms },
            red_at_ms: None,
        }
    }
}

/// Changes made at run time (admin API, `ctl`, dashboard) that override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// service → the cluster its new connections go to instead of the file's.
    pub redirects: BTreeMap<String, Override<String>>,
    /// (cluster, node) → the state set at run time, where it differs from the file's.
    pub node_states: BTreeMap<(String, String), Override<NodeState>>,
}

/// What the running process holds whatever the file says: a reload is
/// judged against it, not against the file it replaces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Process {
    /// The admin API's socket as bound (port 0 resolved); `None`: not started.
    pub admin: Option<AdminListen>,
    /// How the process dropped its privileges; `None`: it did not, so it
    /// can still do whatever it could at start.
    pub dropped: Option<Dropped>,
}

/// A drop to `user`, and what it kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub user: String,
    pub kept: Privileges,
    /// `net.ipv4.ip_unprivileged_port_start` at the drop.
    pub unprivileged_port_start: u16,
}

impl Dropped {
    /// A drop to `user` that kept `kept`, under the kernel's default port rule.
    pub fn new(user: &str, kept: Privileges) -> Dropped {
        Dropped {
            user: user.to_string(),
            kept,
            unprivileged_port_start: DEFAULT_UNPRIVILEGED_PORT_START,
        }
    }
}

/// The file's configuration and the run-time overrides in force.
#[derive(Debug, Clone)]
pub struct ControlState {
    pub file: Config,
    pub overrides: Overrides,
    pub process: Process,
    /// (cluster, node) → where its host name resolves now, with the address
    /// as the file writes it: applied while the file still writes it so.
    pub resolved: BTreeMap<(String, String), (String, NodeAddress)>,
}

impl ControlState {
    /// A state with the file's configuration and no override.
    pub fn new(file: Config) -> ControlState {
        ControlState {
            file,
            overrides: Overrides::default(),
            process: Process::default(),
            resolved: BTreeMap::new(),
        }
    }

    /// The configuration in force: the file with the overrides applied.
    pub fn effective(&self) -> Config {
        let mut effective = self.file.clone();
        for service in &mut effective.services {
            if let Some(target) = self.overrides.redirects.get(&service.name) {
                service.cluster.clone_from(&target.value);
            }
        }
        for cluster in &mut effective.clusters {
            for node in &mut cluster.nodes {
                if let Some((text, address)) = self.resolved.get(&(cluster.name.clone(), node.name.clone()))
                    && *text == node.address_text
                {
                    node.address = *address;
                }
                if let Some(state) = self
                    .overrides
                    .node_states
                    .get(&(cluster.name.clone(), node.name.clone()))
                {
                    node.state = state.value;
                }
            }
        }
        effective
    }

    /// The file's state of `node` in `cluster`, if the file has that node.
    pub fn file_state(&self, cluster: &str, node: &str) -> Option<NodeState> {
        let c = self.file.cluster(cluster)?;
        c.nodes.iter().find(|n| n.name == node).map(|n| n.state)
    }

    /// The file's cluster of `service`, if the file has that service.
    pub fn file_cluster(&self, service: &str) -> Option<&str> {
        self.file
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| s.cluster.as_str())
    }
}
