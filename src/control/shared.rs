//! Run-time overrides as records twins share through the store (`[shared]`):
//! each node state, drain deadline and redirect set here is told to the
//! store's task as a [`SharedOverride`], and a record a twin wrote is applied
//! here when it is newer than what this instance knows of that override
//! (last writer wins, by the time the change was made). A record whose
//! node, service or cluster this file does not have is ignored.
//!
//! Owns the records and their rule; never talks to the store (that is
//! `crate::shared`'s), never changes the file's own states.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::Control;
use super::state::{Origin, Override};
use crate::config::NodeState;

/// How far ahead of this instance's clock a record may be dated: more is a
/// store that lies (or a clock far off), and the record is ignored.
const MAX_AHEAD_MS: u64 = 60 * 60 * 1000;

/// What a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OverrideKey {
    NodeState { cluster: String, node: String },
    Redirect { service: String },
}

impl OverrideKey {
    /// The record's field in the store: names hold no `/` (config rule).
    pub fn field(&self) -> String {
        match self {
            OverrideKey::NodeState { cluster, node } => format!("node/{cluster}/{node}"),
            OverrideKey::Redirect { service } => format!("redirect/{service}"),
        }
    }
}

/// One override as twins share it: `value` is the state or cluster set,
/// `None` when it was set back to the file's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedOverride {
    pub key: OverrideKey,
    pub value: Option<String>,
    /// Who set it (always named: this instance's own name for its changes).
    pub instance: String,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub red_at_ms: Option<u64>,
}

/// Where this instance's changes go (the store's task) and what it knows of
/// each shared override: when its latest change was made.
#[derive(Default)]
pub(super) struct Sharing {
    pub(super) changes: Option<tokio::sync::mpsc::UnboundedSender<SharedOverride>>,
    pub(super) instance: String,
    pub(super) latest_ms: std::collections::HashMap<OverrideKey, u64>,
}

impl Control {
    /// Sends every run-time change made here from now on to `changes`, as
    /// made by `instance`.
    pub fn share_changes(&self, instance: &str, changes: tokio::sync::mpsc::UnboundedSender<SharedOverride>) {
        let mut sharing = self.sharing();
        sharing.changes = Some(changes);
        sharing.instance = instance.to_string();
    }

    fn sharing(&self) -> std::sync::MutexGuard<'_, Sharing> {
        self.inner.sharing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the store's task of a change made here.
    pub(super) fn shared_change(&self, key: OverrideKey, value: Option<String>, at_ms: u64, red_at_ms: Option<u64>) {
        let mut sharing = self.sharing();
        sharing.latest_ms.insert(key.clone(), at_ms);
        let instance = sharing.instance.clone();
        if let Some(changes) = &sharing.changes {
            let _ = changes.send(SharedOverride {
                key,
                value,
                instance,
                at_ms,
                red_at_ms,
            });
        }
    }

    /// The overrides in force here as shared records, for the store that
    /// comes back after an outage (it keeps the newer of each).
    pub fn shared_records(&self) -> Vec<SharedOverride> {
        let state = self.state();
        let instance = self.sharing().instance.clone();
        let named = |origin: &Origin| origin.instance.clone().unwrap_or_else(|| instance.clone());
        let nodes = state
            .overrides
            .node_states
            .iter()
            .map(|((cluster, node), o)| SharedOverride {
                key: OverrideKey::NodeState {
                    cluster: cluster.clone(),
                    node: node.clone(),
                },
                value: Some(o.value.name().to_string()),
                instance: named(&o.origin),
                at_ms: o.origin.at_ms,
                red_at_ms: o.red_at_ms,
            });
        let redirects = state.overrides.redirects.iter().map(|(service, o)| SharedOverride {
            key: OverrideKey::Redirect {
                service: service.clone(),
            },
            value: Some(o.value.clone()),
            instance: named(&o.origin),
            at_ms: o.origin.at_ms,
            red_at_ms: None,
        });
        nodes.chain(redirects).collect()
    }

    /// Applies a twin's record when it is newer than what this instance
    /// knows of that override; returns whether it changed anything.
    pub fn apply_shared(&self, record: &SharedOverride) -> bool {
        // A store that lies: the name goes into log lines and the status.
        let named = crate::config::is_name(&record.instance);
        // A change dated far ahead would win over every real one to come.
        let now = self.inner.live.clock().now_ms();
        if !named || record.at_ms > now.saturating_add(MAX_AHEAD_MS) {
            return false;
        }
        // A value that means nothing here changes nothing, and is not remembered as the latest.
        let meaningful = match (&record.key, &record.value) {
            (OverrideKey::NodeState { .. }, Some(v)) => NodeState::parse(v).is_some(),
            (OverrideKey::Redirect { .. }, Some(v)) => self.lock().file.cluster(v).is_some(),
            (_, None) => true,
        };
        if !meaningful {
            return false;
        }
        {
            let mut sharing = self.sharing();
            if sharing
                .latest_ms
                .get(&record.key)
                .is_some_and(|&known| known >= record.at_ms)
            {
                return false;
            }
            sharing.latest_ms.insert(record.key.clone(), record.at_ms);
        }
        let own = record.instance == self.sharing().instance;
        let origin = Origin {
            instance: (!own).then(|| record.instance.clone()),
            at_ms: record.at_ms,
        };
        let mut control = self.lock();
        match &record.key {
            OverrideKey::NodeState { cluster, node } => {
                let Some(file_state) = control.file_state(cluster, node) else {
                    return false;
                };
                let state = match &record.value {
                    None => file_state,
                    Some(v) => match NodeState::parse(v) {
                        Some(s) => s,
                        None => return false,
                    },
                };
                let key = (cluster.clone(), node.clone());
                if state == file_state && record.red_at_ms.is_none() {
                    control.overrides.node_states.remove(&key);
                } else {
                    control.overrides.node_states.insert(
                        key,
                        Override {
                            value: state,
                            origin,
                            red_at_ms: record.red_at_ms,
                        },
                    );
                }
                drop(control);
                info!(cluster, node, by = %record.instance, "node state set to {state} by a twin");
                self.apply_node_state(cluster, node, state);
            }
            OverrideKey::Redirect { service } => {
                let Some(file_cluster) = control.file_cluster(service).map(str::to_string) else {
                    return false;
                };
                let target = record.value.clone().unwrap_or_else(|| file_cluster.clone());
                if control.file.cluster(&target).is_none() {
                    return false;
                }
                if target == file_cluster {
                    control.overrides.redirects.remove(service);
                } else {
                    control.overrides.redirects.insert(
                        service.clone(),
                        Override {
                            value: target.clone(),
                            origin,
                            red_at_ms: None,
                        },
                    );
                }
                self.publish(&control);
                info!(service, by = %record.instance, "new connections now go to cluster \"{target}\" (set by a twin)");
            }
        }
        true
    }
}
