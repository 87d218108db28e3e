//! The control state: the configuration as the file says it, plus the
//! changes made at run time (node states, service redirects) on top of it.
//! Plain values, no locks and no I/O: [`super::Control`] owns one and
//! changes it one step at a time.

use std::collections::BTreeMap;

use crate::config::{Config, NodeState};

/// Changes made at run time (admin API, `ctl`, dashboard) that override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// service → the cluster its new connections go to instead of the file's.
    pub redirects: BTreeMap<String, String>,
    /// (cluster, node) → the state set at run time, where it differs from the file's.
    pub node_states: BTreeMap<(String, String), NodeState>,
}

/// The file's configuration and the run-time overrides in force.
#[derive(Debug, Clone)]
pub struct ControlState {
    pub file: Config,
    pub overrides: Overrides,
}

impl ControlState {
    /// A state with the file's configuration and no override.
    pub fn new(file: Config) -> ControlState {
        ControlState {
            file,
            overrides: Overrides::default(),
        }
    }

    /// The configuration in force: the file with the overrides applied.
    pub fn effective(&self) -> Config {
        let mut effective = self.file.clone();
        for service in &mut effective.services {
            if let Some(target) = self.overrides.redirects.get(&service.name) {
                service.cluster.clone_from(target);
            }
        }
        for cluster in &mut effective.clusters {
            for node in &mut cluster.nodes {
                if let Some(state) = self
                    .overrides
                    .node_states
                    .get(&(cluster.name.clone(), node.name.clone()))
                {
                    node.state = *state;
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
