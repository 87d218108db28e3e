//! The file's shape: raw structs that serde fills (`deny_unknown_fields`),
//! every value wrapped in `Spanned` so that validation can name its line.
//! Nothing is checked here beyond types and key names.

use serde::Deserialize;
use toml::Spanned;

use super::health::RawCheck;
use super::routes::RawRoute;
use super::shared::RawShared;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) threads: Option<Spanned<i64>>,
    pub(super) pin_workers: Option<Spanned<bool>>,
    pub(super) busy_poll: Option<Spanned<String>>,
    pub(super) shutdown_grace: Option<Spanned<String>>,
    pub(super) forwarding: Option<Spanned<String>>,
    pub(super) log_format: Option<Spanned<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) defaults: Option<RawDefaults>,
    pub(super) shared: Option<RawShared>,
    pub(super) resolver: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) service: Vec<RawService>,
    #[serde(default)]
    pub(super) cluster: Vec<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
    /// Any TOML value: serde's message for a wrong type would quote a secret.
    pub(super) token: Option<Spanned<toml::Value>>,
    pub(super) token_file: Option<Spanned<String>>,
    pub(super) allowed_hosts: Option<Vec<Spanned<String>>>,
    pub(super) socket_mode: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) header_timeout: Option<Spanned<String>>,
    pub(super) request_timeout: Option<Spanned<String>>,
}

/// Cluster keys that `[defaults]` may set for every cluster.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) algorithm: Option<Spanned<String>>,
    pub(super) affinity: Option<Spanned<bool>>,
    pub(super) affinity_ttl: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) retry_interval: Option<Spanned<String>>,
    pub(super) socket_buffer: Option<Spanned<String>>,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) source: Option<Spanned<String>>,
    pub(super) slow_start: Option<Spanned<String>>,
    pub(super) on_unavailable: Option<Spanned<String>>,
    pub(super) check: Option<Spanned<RawCheck>>,
    pub(super) resolve_interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<Vec<Spanned<String>>>,
    pub(super) cluster: Spanned<String>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_connections_per_client: Option<Spanned<i64>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) socket_buffer: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) accept_proxy_from: Vec<Spanned<String>>,
    pub(super) accept_proxy_timeout: Option<Spanned<String>>,
    pub(super) max_connection_age: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: Spanned<String>,
    pub(super) algorithm: Option<Spanned<String>>,
    pub(super) affinity: Option<Spanned<bool>>,
    pub(super) affinity_ttl: Option<Spanned<String>>,
    pub(super) load_rating: Option<Spanned<String>>,
    pub(super) hash_key: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) retry_interval: Option<Spanned<String>>,
    pub(super) socket_buffer: Option<Spanned<String>>,
    pub(super) last_resort: Option<Spanned<String>>,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) source: Option<Spanned<String>>,
    pub(super) slow_start: Option<Spanned<String>>,
    pub(super) on_unavailable: Option<Spanned<String>>,
    pub(super) check: Option<Spanned<RawCheck>>,
    pub(super) resolve_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) fallover: Option<Spanned<String>>,
    pub(super) state: Option<Spanned<String>>,
    pub(super) agent: Option<Spanned<String>>,
    pub(super) send_proxy: Option<Spanned<String>>,
}
