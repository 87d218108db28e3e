//! Admission: whether an accepted client may be served at all — the service's
//! access lists, then the global, per-service and per-client connection
//! limits. Decided at accept time, before any node is contacted; a refused
//! client is closed at once, counted by reason, and logged at most once a
//! second per service (with the number of refusals in between).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::warn;

use super::shared::Shared;
use crate::config::{ForwardMode, SocketBuffer, canonical};
use crate::model::{Cluster, ConnectionState, Refusal, ServiceFigures, ServiceGuard};

/// What a connection task needs once its client is admitted. Dropping it
/// releases the client's place under every limit.
pub struct Admitted {
    /// The service's figures, and its place under the service's limit.
    pub service: ServiceGuard,
    pub cluster: Arc<Cluster>,
    pub forwarding: ForwardMode,
    pub idle_timeout: Option<Duration>,
    pub max_connection_age: Option<Duration>,
    /// The service has `[[service.route]]`: its clients' ClientHello chooses the cluster.
    pub routed: bool,
    /// The service's `socket_buffer`, for the client's socket.
    pub client_buffer: Option<SocketBuffer>,
    _global: GlobalGuard,
    _client: Option<ClientGuard>,
}

/// Admits `client` to `service`, or says why not.
pub fn admit(shared: &Arc<Shared>, service_name: &str, client: IpAddr) -> Result<Admitted, Refused> {
    let snapshot = shared.live.snapshot.load();
    let Some((service, cluster)) = snapshot.cluster_of(service_name) else {
        return Err(Refused {
            service: None,
            reason: Refusal::NoNode,
        });
    };
    let refuse = |reason| {
        Err(Refused {
            service: Some(service.figures.clone()),
            reason,
        })
    };
    let limits = &service.limits;
    if !limits.admits(client) {
        return refuse(Refusal::Denied);
    }
    let Some(global) = GlobalGuard::open(shared, snapshot.max_connections) else {
        return refuse(Refusal::GlobalMaxConnections);
    };
    let Some(in_service) = service.figures.try_open(limits.max_connections) else {
        return refuse(Refusal::MaxConnections);
    };
    let per_client = match limits.max_connections_per_client {
        None => None,
        Some(max) => match ClientGuard::open(&service.figures, canonical(client), max) {
            Some(g) => Some(g),
            None => return refuse(Refusal::MaxConnectionsPerClient),
        },
    };
    Ok(Admitted {
        service: in_service,
        cluster: cluster.clone(),
        forwarding: snapshot.forwarding,
        idle_timeout: limits.idle_timeout,
        max_connection_age: limits.max_connection_age,
        routed: !service.routes.is_empty(),
        client_buffer: limits.socket_buffer,
        _global: global,
        _client: per_client,
    })
}

/// The header timeout when `peer` is an upstream balancer of `service`
/// (`accept_proxy_from`), whose connection must start with a PROXY header.
pub fn expects_proxy_header(shared: &Shared, service: &str, peer: IpAddr) -> Option<Duration> {
    let snapshot = shared.live.snapshot.load();
    let limits = &snapshot.services.get(service)?.limits;
    limits.expects_proxy_header(peer).then_some(limits.accept_proxy_timeout)
}

/// Counts and logs an upstream balancer's connection closed for its header.
pub fn refuse_header(shared: &Shared, service: &str, upstream: IpAddr, why: &str) {
    let snapshot = shared.live.snapshot.load();
    if let Some(s) = snapshot.services.get(service) {
        s.figures.count_refused(Refusal::ProxyHeader);
        log_refusal(&s.figures, service, upstream, Refusal::ProxyHeader, Some(&why));
    }
}

/// Admits a connection adopted from the process this one upgraded: counted
/// under every limit like any other, refused by none (it was admitted there).
/// Its node: the snapshot's node of that name and address, or, when the
/// file no longer has it, a detached one. Returns it with the node's index.
pub fn adopt(shared: &Arc<Shared>, state: &ConnectionState) -> (Admitted, usize) {
    let snapshot = shared.live.snapshot.load();
    let service = snapshot.services.get(&state.service);
    let figures = service.map_or_else(Default::default, |s| s.figures.clone());
    let in_service = figures.adopt();
    let found = snapshot.clusters.get(&state.cluster).and_then(|c| {
        let i = c
            .nodes
            .iter()
            .position(|n| n.name == state.node && n.address_text == state.node_address)?;
        Some((c.clone(), i))
    });
    let (cluster, node) = found.unwrap_or_else(|| (Arc::new(detached(state)), 0));
    let limits = service.map(|s| s.limits.clone()).unwrap_or_default();
    let per_client = limits
        .max_connections_per_client
        .and_then(|_| ClientGuard::open(&figures, canonical(state.client.ip()), u32::MAX));
    let admitted = Admitted {
        service: in_service,
        cluster,
        forwarding: snapshot.forwarding,
        idle_timeout: limits.idle_timeout,
        max_connection_age: limits.max_connection_age,
        // Its node was chosen long ago.
        routed: false,
        client_buffer: None,
        _global: GlobalGuard::count(shared),
        _client: per_client,
    };
    (admitted, node)
}

/// The one-node cluster of an adopted connection whose node the file no longer has.
fn detached(state: &ConnectionState) -> Cluster {
    let address = crate::config::parse_node_address(&state.node_address, &crate::config::offline_resolver)
        .unwrap_or(crate::config::NodeAddress::Socket(state.client));
    let node = crate::model::Node {
        name: state.node.clone(),
        address,
        address_text: state.node_address.clone(),
        weight: 1,
        fallover: None,
        figures: Arc::new(crate::model::NodeFigures::new(crate::config::NodeState::Green)),
        agent: None,
        send_proxy: crate::config::ProxyHeader::None,
        health_port: None,
    };
    Cluster::detached(&state.cluster, node)
}

/// A refusal, with the service's figures to count it in.
pub struct Refused {
    pub service: Option<Arc<ServiceFigures>>,
    pub reason: Refusal,
}

impl Refused {
    /// Counts the refusal and logs it, at most once a second per service.
    pub fn record(&self, service_name: &str, client: IpAddr) {
        let Some(figures) = &self.service else { return };
        figures.count_refused(self.reason);
        log_refusal(figures, service_name, client, self.reason, None);
    }
}

/// Logs a refusal unless one was logged for this service in the last second.
pub fn log_refusal(
    figures: &ServiceFigures,
    service: &str,
    client: IpAddr,
    reason: Refusal,
    why: Option<&dyn std::fmt::Display>,
) {
    let now = process_millis();
    let last = figures.last_refusal_log_ms.load(Relaxed);
    if (last == 0 || now >= last + 1000)
        && figures
            .last_refusal_log_ms
            .compare_exchange(last, now.max(1), Relaxed, Relaxed)
            .is_ok()
    {
        let total: u64 = Refusal::ALL.iter().map(|r| figures.refused(*r)).sum();
        let why = why.map(|w| format!(": {w}")).unwrap_or_default();
        warn!(
            service,
            reason = reason.name(),
            "refused client {client}{why} ({total} refusal(s) so far; logged at most once a second)"
        );
    }
}

/// Milliseconds since the first call: a cheap monotonic clock for rate limits.
fn process_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A place under the global `max_connections`.
struct GlobalGuard(Arc<AtomicU64>);

impl GlobalGuard {
    /// A place for a client no limit refuses (an adopted one).
    fn count(shared: &Shared) -> GlobalGuard {
        shared.open_clients.fetch_add(1, Relaxed);
        GlobalGuard(shared.open_clients.clone())
    }

    fn open(shared: &Shared, max: Option<u64>) -> Option<GlobalGuard> {
        let before = shared.open_clients.fetch_add(1, Relaxed);
        if max.is_some_and(|m| before >= m) {
            shared.open_clients.fetch_sub(1, Relaxed);
            return None;
        }
        Some(GlobalGuard(shared.open_clients.clone()))
    }
}

impl Drop for GlobalGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A place under a service's `max_connections_per_client`.
struct ClientGuard {
    figures: Arc<ServiceFigures>,
    client: IpAddr,
}

impl ClientGuard {
    fn open(figures: &Arc<ServiceFigures>, client: IpAddr, max: u32) -> Option<ClientGuard> {
        let mut table = lock(&figures.per_client);
        let open = table.entry(client).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(ClientGuard {
            figures: figures.clone(),
            client,
        })
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut table = lock(&self.figures.per_client);
        if let Some(open) = table.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                table.remove(&self.client);
            }
        }
    }
}

/// A poisoned lock still holds consistent counts (each update is one statement).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
