//! `GET /metrics`: the figures of the published snapshot in the Prometheus
//! text format (OpenMetrics flavour), with the names of docs/admin.md.
//!
//! The figures already live in atomics owned by the model, so each scrape
//! fills a fresh registry from them rather than keeping a second copy of
//! every counter up to date on the hot path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::{NodeFigures, NodeState, Refusal, ServiceFigures, Snapshot, StoreFigures};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    service: String,
    /// The route's first name, as the file writes it.
    route: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    cluster: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    cluster: String,
    node: String,
    /// `in` = client→node, `out` = node→client.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    cluster: String,
    node: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    service: String,
    reason: &'static str,
}

/// Every metric family, filled from the figures of one snapshot.
#[derive(Default)]
struct Families {
    active: Family<NodeLabels, Gauge>,
    connections: Family<NodeLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    failures: Family<NodeLabels, Counter>,
    check_failures: Family<NodeLabels, Counter>,
    transitions: Family<NodeLabels, Counter>,
    available: Family<NodeLabels, Gauge>,
    state: Family<StateLabels, Gauge>,
    accepted: Family<ServiceLabels, Counter>,
    aged_out: Family<ServiceLabels, Counter>,
    routed: Family<RouteLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    worker_accepted: Family<WorkerLabels, Counter>,
}

/// Renders every metric of `snapshot`, and the clients each worker thread
/// has accepted (`accepted_by_worker`, indexed by worker).
/// With `[shared]`, `store` adds the store's figures.
pub fn render(
    snapshot: &Snapshot,
    accepted_by_worker: &[u64],
    store: Option<&StoreFigures>,
) -> Result<String, std::fmt::Error> {
    let families = Families::default();
    for cluster in snapshot.clusters.values() {
        for node in &cluster.nodes {
            families.add_node(&cluster.name, &node.name, &node.figures);
        }
    }
    for service in snapshot.services.values() {
        families.add_service(&service.name, &service.figures);
        for (route, n) in service.routes.iter().zip(&service.route_connections) {
            let labels = RouteLabels {
                service: service.name.clone(),
                route: route.names.first().map(|n| n.text()).unwrap_or_default(),
                cluster: route.cluster.clone(),
            };
            families
                .routed
                .get_or_create(&labels)
                .inc_by(n.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    for (worker, &n) in accepted_by_worker.iter().enumerate() {
        families
            .worker_accepted
            .get_or_create(&WorkerLabels {
                worker: worker.to_string(),
            })
            .inc_by(n);
    }
    let mut text = String::new();
    let mut registry = families.registry();
    if let Some(store) = store {
        register_store(&mut registry, store);
    }
    encode(&mut text, &registry)?;
    Ok(text)
}

/// The store's figures: `protobalance_store_up` and what its requests cost.
fn register_store(registry: &mut Registry, store: &StoreFigures) {
    let up: Gauge = Gauge::default();
    up.set(i64::from(store.is_up()));
    registry.register("protobalance_store_up", "1 when the shared state store answers", up);
    let slow: Gauge = Gauge::default();
    slow.set(i64::from(store.is_slow()));
    registry.register(
        "protobalance_store_slow",
        "1 while the store runs past the lookup budget and clients do not ask it",
        slow,
    );
    let requests: Counter = Counter::default();
    requests.inc_by(store.requests());
    registry.register("protobalance_store_requests", "Requests sent to the store", requests);
    let seconds: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
    seconds.inc_by(store.request_seconds());
    registry.register(
        "protobalance_store_request_seconds",
        "Time the store's requests took, all together (divided by the requests: the mean latency)",
        seconds,
    );
    let errors: Counter = Counter::default();
    errors.inc_by(store.errors());
    registry.register("protobalance_store_errors", "Store requests that failed", errors);
    let timeouts: Counter = Counter::default();
    timeouts.inc_by(store.lookup_timeouts());
    registry.register(
        "protobalance_store_lookup_timeouts",
        "Pin lookups of new clients that ran past the lookup budget",
        timeouts,
    );
}

impl Families {
    fn add_node(&self, cluster: &str, node: &str, f: &NodeFigures) {
        let labels = NodeLabels {
            cluster: cluster.to_string(),
            node: node.to_string(),
        };
        self.active.get_or_create(&labels).set(gauge(f.active_connections()));
        self.connections.get_or_create(&labels).inc_by(f.total_connections());
        self.failures.get_or_create(&labels).inc_by(f.connect_failures());
        self.check_failures.get_or_create(&labels).inc_by(f.check_failures());
        self.transitions.get_or_create(&labels).inc_by(f.health_transitions());
        self.available.get_or_create(&labels).set(i64::from(f.is_available()));
        for (direction, n) in [("in", f.bytes_in()), ("out", f.bytes_out())] {
            let labels = BytesLabels {
                cluster: cluster.to_string(),
                node: node.to_string(),
                direction,
            };
            self.bytes.get_or_create(&labels).inc_by(n);
        }
        for s in [NodeState::Green, NodeState::Yellow, NodeState::Red] {
            let labels = StateLabels {
                cluster: cluster.to_string(),
                node: node.to_string(),
                state: s.name(),
            };
            self.state.get_or_create(&labels).set(i64::from(f.state() == s));
        }
    }

    fn add_service(&self, service: &str, f: &ServiceFigures) {
        self.accepted
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .inc_by(f.accepted());
        self.aged_out
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .inc_by(f.aged_out());
        for reason in Refusal::ALL {
            let labels = RefusedLabels {
                service: service.to_string(),
                reason: reason.name(),
            };
            self.refused.get_or_create(&labels).inc_by(f.refused(reason));
        }
    }

    /// A registry holding every family under its name (counters get their
    /// `_total` suffix from the encoder).
    fn registry(self) -> Registry {
        let mut registry = Registry::default();
        let Families {
            active,
            connections,
            bytes,
            failures,
            check_failures,
            transitions,
            available,
            state,
            accepted,
            aged_out,
            routed,
            refused,
            worker_accepted,
        } = self;
        registry.register(
            "protobalance_route_connections",
            "Connections a service's route sent to its cluster, by the ClientHello's server name",
            routed,
        );
        registry.register(
            "protobalance_service_max_age_closed",
            "Connections closed for reaching the service's max_connection_age",
            aged_out,
        );
        registry.register(
            "protobalance_node_active_connections",
            "Connections open to the node now",
            active,
        );
        registry.register(
            "protobalance_node_connections",
            "Connections forwarded to the node",
            connections,
        );
        registry.register(
            "protobalance_node_bytes",
            "Bytes forwarded (in = client to node, out = node to client)",
            bytes,
        );
        registry.register(
            "protobalance_node_connect_failures",
            "Failed connection attempts to the node",
            failures,
        );
        registry.register(
            "protobalance_node_check_failures",
            "Active checks of the node that failed",
            check_failures,
        );
        registry.register(
            "protobalance_node_health_transitions",
            "Changes of the node's health (available <-> unavailable)",
            transitions,
        );
        registry.register(
            "protobalance_node_available",
            "1 when health checks find the node available",
            available,
        );
        registry.register(
            "protobalance_node_state",
            "1 for the node's current operator state",
            state,
        );
        registry.register(
            "protobalance_service_accepted",
            "Clients accepted by the service",
            accepted,
        );
        registry.register(
            "protobalance_service_refused",
            "Clients turned away, by reason (see docs/configuration.md)",
            refused,
        );
        registry.register(
            "protobalance_worker_accepted",
            "Clients accepted by each worker thread (admitted or refused): how they spread over the workers",
            worker_accepted,
        );
        registry
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
