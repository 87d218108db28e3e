//! Live figures: per-node counters, health and state ([`NodeFigures`]) and
//! per-service counters ([`ServiceFigures`]), all atomics behind an `Arc`
//! that outlives snapshots, so a reload keeps the counters of what stays.
//! Also the per-worker slots that keep what workers write on cache lines of
//! their own. Never any I/O.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime};

use super::rates::LoadFigures;
use crate::config::NodeState;

/// Live figures of one node. Relaxed atomics: each figure is independent and
/// only ever read as an approximate, monotonic-enough value.
#[derive(Debug)]
pub struct NodeFigures {
    active: AtomicU64,
    total: AtomicU64,
    /// Client → node.
    bytes_in: AtomicU64,
    /// Node → client.
    bytes_out: AtomicU64,
    connect_failures: AtomicU64,
    available: AtomicBool,
    state: AtomicU8,
    /// EWMA rates and agent load; kept by `rates`, which adds their getters.
    pub(crate) load: LoadFigures,
    /// Times the node went from available to unavailable or back.
    health_transitions: AtomicU64,
    /// Wakes the node's open connections when it turns red, so they are cut:
    /// one `Notify` per worker slot (see [`bind_worker_slot`]), each on cache
    /// lines of its own. A waiting connection's task takes its `Notify`'s
    /// mutex each time it is polled, that is on every wake-up; with one per
    /// node, every worker would lock the same mutex for every request.
    turned_red: Box<[Padded<tokio::sync::Notify>]>,
    /// Times its open connections were cut without it turning red
    /// (`on_unavailable = "cut"`): a connection opened before a cut ends.
    cuts: AtomicU64,
    /// The latest active check's verdict (`None`: no check has run).
    check: Mutex<Option<CheckReport>>,
    check_failures: AtomicU64,
    /// Destination ports refused by a node without a port of its own
    /// (it takes the client's port), each unavailable alone; the node's
    /// own health is its checked port's. `any_port_down` spares every
    /// pick the lock while the list is empty, which is nearly always.
    down_ports: Mutex<Vec<u16>>,
    any_port_down: AtomicBool,
    /// Its share of new clients, in thousandths of its weight: below 1000
    /// while slow start ramps it up (see `health::slow_start`).
    ramp_permille: AtomicU32,
    /// When it last became eligible, while its ramp is under way.
    ramping_since: Mutex<Option<Instant>>,
}

/// The latest verdict of a node's active check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub passing: bool,
    /// Why the latest failed check failed (`None` while passing).
    pub last_error: Option<String>,
    /// When it began passing, or failing.
    pub since: SystemTime,
}

/// The most destination ports one node keeps down, so that a port scan
/// costs a bounded list and a bounded number of probes.
pub const MAX_DOWN_PORTS: usize = 64;

/// A ramp's first share, in thousandths of the node's weight.
pub const RAMP_START_PERMILLE: u32 = 50;
/// A node's share when no ramp is under way.
pub const FULL_PERMILLE: u32 = 1000;

/// A node's monotonic counters, as an upgrade hands them over.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeCounters {
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_failures: u64,
    pub health_transitions: u64,
    #[serde(default)]
    pub check_failures: u64,
}

/// A value alone on its cache lines (128 bytes: x86-64 fetches lines in
/// pairs), for what different workers write.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

thread_local! {
    /// This thread's worker slot: which of each node's per-worker parts it uses.
    static WORKER_SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread use worker slot `worker` (modulo the number of slots,
/// one per CPU the process may use): called by each worker thread as it
/// starts. Any other thread uses slot 0. Workers beyond the number of CPUs
/// share slots, and only they contend with each other.
pub fn bind_worker_slot(worker: usize) {
    WORKER_SLOT.set(worker % worker_slots());
}

/// How many worker slots a node's per-worker parts have: one per CPU the
/// process may use, counted once (a cgroup's CPU quota is read from files),
/// which is also the default number of workers.
pub fn worker_slots() -> usize {
    static SLOTS: OnceLock<usize> = OnceLock::new();
    *SLOTS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl NodeFigures {
    pub fn new(state: NodeState) -> NodeFigures {
        NodeFigures {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            available: AtomicBool::new(true),
            state: AtomicU8::new(state.to_u8()),
            load: LoadFigures::default(),
            health_transitions: AtomicU64::new(0),
            turned_red: (0..worker_slots()).map(|_| Default::default()).collect(),
            cuts: AtomicU64::new(0),
            check: Mutex::new(None),
            check_failures: AtomicU64::new(0),
            down_ports: Mutex::new(Vec::new()),
            any_port_down: AtomicBool::new(false),
            ramp_permille: AtomicU32::new(FULL_PERMILLE),
            ramping_since: Mutex::new(None),
        }
    }

    /// Cuts every connection open to the node now, as red does, without
    /// changing its state.
    pub fn cut_connections(&self) {
        self.cuts.fetch_add(1, Relaxed);
        for connections in &self.turned_red {
            connections.0.notify_waiters();
        }
    }

    /// Records an active check's result: returns the report as it was
    /// before, so the caller logs a transition once.
    pub fn record_check(&self, result: Result<(), &str>) -> Option<CheckReport> {
        let mut report = self.check.lock().unwrap_or_else(|p| p.into_inner());
        let before = report.clone();
        let passing = result.is_ok();
        if result.is_err() {
            self.check_failures.fetch_add(1, Relaxed);
        }
        let since = match &before {
            Some(b) if b.passing == passing => b.since,
            _ => SystemTime::now(),
        };
        *report = Some(CheckReport {
            passing,
            last_error: result.err().map(str::to_string),
            since,
        });
        before
    }
    pub fn check_report(&self) -> Option<CheckReport> {
        self.check.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Forgets the check's verdict (the cluster no longer has a check).
    pub fn clear_check(&self) {
        *self.check.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    pub fn check_failures(&self) -> u64 {
        self.check_failures.load(Relaxed)
    }

    /// Whether destination `port` was refused (a node without a port of its own).
    pub fn is_port_down(&self, port: u16) -> bool {
        self.any_port_down.load(Relaxed)
            && self
                .down_ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&port)
    }
    /// Marks destination `port` down or up; returns whether it changed.
    /// Past [`MAX_DOWN_PORTS`] the port marked down longest ago is
    /// forgotten (taken as up again).
    pub fn mark_port(&self, port: u16, down: bool) -> bool {
        let mut ports = self.down_ports.lock().unwrap_or_else(|p| p.into_inner());
        let at = ports.iter().position(|&p| p == port);
        let changed = match (at, down) {
            (None, true) => {
                if ports.len() >= MAX_DOWN_PORTS {
                    ports.remove(0);
                }
                ports.push(port);
                true
            }
            (Some(i), false) => {
                // In the order they went down, for the bound above.
                ports.remove(i);
                true
            }
            _ => false,
        };
        self.any_port_down.store(!ports.is_empty(), Relaxed);
        changed
    }
    /// The destination ports down now.
    pub fn down_ports(&self) -> Vec<u16> {
        if !self.any_port_down.load(Relaxed) {
            return Vec::new();
        }
        self.down_ports.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The node just became eligible: with a slow start, its share starts
    /// small and `health::slow_start` ramps it up.
    pub fn begin_ramp(&self, slow_start: Option<Duration>) {
        if slow_start.is_some() {
            *self.ramping_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.ramp_permille.store(RAMP_START_PERMILLE, Relaxed);
        }
    }
    /// Moves the ramp on to `now` over `window`; returns whether it is still under way.
    pub fn advance_ramp(&self, window: Option<Duration>, now: Instant) -> bool {
        let mut since = self.ramping_since.lock().unwrap_or_else(|p| p.into_inner());
        let Some(start) = *since else { return false };
        let elapsed = now.saturating_duration_since(start);
        let permille = match window {
            Some(w) if elapsed < w => {
                let share = (elapsed.as_secs_f64() / w.as_secs_f64() * f64::from(FULL_PERMILLE)) as u32;
                share.clamp(RAMP_START_PERMILLE, FULL_PERMILLE)
            }
            _ => FULL_PERMILLE,
        };
        self.ramp_permille.store(permille, Relaxed);
        if permille == FULL_PERMILLE {
            *since = None;
        }
        permille < FULL_PERMILLE
    }
    /// Its share now, in thousandths of its weight.
    pub fn ramp_permille(&self) -> u32 {
        self.ramp_permille.load(Relaxed)
    }

    pub fn active_connections(&self) -> u64 {
        self.active.load(Relaxed)
    }
    pub fn total_connections(&self) -> u64 {
        self.total.load(Relaxed)
    }
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Relaxed)
    }
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Relaxed)
    }
    pub fn connect_failures(&self) -> u64 {
        self.connect_failures.load(Relaxed)
    }
    pub fn is_available(&self) -> bool {
        self.available.load(Relaxed)
    }
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Relaxed);
    }
    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Relaxed))
    }
    pub fn set_state(&self, state: NodeState) {
        self.state.store(state.to_u8(), Relaxed);
        if state == NodeState::Red {
            for connections in &self.turned_red {
                connections.0.notify_waiters();
            }
        }
    }
    /// Whether the node may take a new connection: green and available.
    pub fn is_eligible(&self) -> bool {
        self.is_available() && self.state() == NodeState::Green
    }

    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }
    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }
    pub fn count_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Relaxed);
    }

    /// Sets the node's health; returns whether it changed, and counts the change.
    pub fn mark_available(&self, available: bool) -> bool {
        let changed = self.available.swap(available, Relaxed) != available;
        if changed {
            self.health_transitions.fetch_add(1, Relaxed);
        }
        changed
    }
    pub fn health_transitions(&self) -> u64 {
        self.health_transitions.load(Relaxed)
    }
    /// Resolves once the node is red, or its connections are cut
    /// ([`NodeFigures::cut_connections`]) after this was called: at once if
    /// it is red now. Waits on this thread's worker slot.
    pub fn red(&self) -> TurnedRed<'_> {
        TurnedRed {
            figures: self,
            cuts_seen: self.cuts.load(Relaxed),
            turned: self.turned_red_here().notified(),
            armed: false,
        }
    }

    fn turned_red_here(&self) -> &tokio::sync::Notify {
        &self.turned_red[WORKER_SLOT.get()].0
    }

    /// The node's counters now.
    pub fn counters(&self) -> NodeCounters {
        NodeCounters {
            total_connections: self.total_connections(),
            bytes_in: self.bytes_in(),
            bytes_out: self.bytes_out(),
            connect_failures: self.connect_failures(),
            health_transitions: self.health_transitions(),
            check_failures: self.check_failures(),
        }
    }

    /// Adds counters kept by another process (the one this upgraded from),
    /// so the node's totals go on rather than start again.
    pub fn carry_on(&self, counters: &NodeCounters) {
        self.total.fetch_add(counters.total_connections, Relaxed);
        self.bytes_in.fetch_add(counters.bytes_in, Relaxed);
        self.bytes_out.fetch_add(counters.bytes_out, Relaxed);
        self.connect_failures.fetch_add(counters.connect_failures, Relaxed);
        self.health_transitions.fetch_add(counters.health_transitions, Relaxed);
        self.check_failures.fetch_add(counters.check_failures, Relaxed);
    }

    /// Counts a connection adopted from another process (which counted it in
    /// the totals handed over) as open until the returned guard drops.
    pub fn adopt_connection(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }

    /// Counts a connection as open until the returned guard drops.
    pub fn open_connection(self: &Arc<Self>) -> ActiveGuard {
        self.total.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }
}

pin_project_lite::pin_project! {
    /// Resolves once its node is red; see [`NodeFigures::red`]. A plain
    /// future rather than an `async fn`: every open connection waits on one,
    /// and this is the smaller of the two.
    pub struct TurnedRed<'a> {
        figures: &'a NodeFigures,
        // The node's cuts when the connection began waiting: one more cuts it.
        cuts_seen: u64,
        #[pin]
        turned: tokio::sync::futures::Notified<'a>,
        // Whether `turned` is registered and the state was checked after that.
        armed: bool,
    }
}

impl Future for TurnedRed<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut this = self.as_mut().project();
            if !*this.armed {
                // Registered before the check, so a change between the two is not missed.
                this.turned.as_mut().enable();
                *this.armed = true;
                if this.figures.state() == NodeState::Red || this.figures.cuts.load(Relaxed) != *this.cuts_seen {
                    return Poll::Ready(());
                }
            }
            ready!(this.turned.as_mut().poll(cx));
            // Woken, but it may have turned back already: check again, on a new registration.
            this.turned.set(this.figures.turned_red_here().notified());
            *this.armed = false;
        }
    }
}

/// Decrements a node's active connections when dropped.
pub struct ActiveGuard(Arc<NodeFigures>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Why a client was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No node could take it (all unavailable, not green, or failing to connect).
    NoNode,
    /// The service's `max_connections` was reached.
    MaxConnections,
    /// The global `max_connections` was reached.
    GlobalMaxConnections,
    /// Its IP had `max_connections_per_client` open already.
    MaxConnectionsPerClient,
    /// The service's `allow`/`deny` lists refuse its address.
    Denied,
    /// The balancer itself was out of descriptors or memory for the node side.
    Exhausted,
    /// A client from `accept_proxy_from` sent no valid PROXY header in time.
    ProxyHeader,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NoNode,
        Refusal::MaxConnections,
        Refusal::GlobalMaxConnections,
        Refusal::MaxConnectionsPerClient,
        Refusal::Denied,
        Refusal::Exhausted,
        Refusal::ProxyHeader,
    ];

    /// The `reason` label of `protobalance_service_refused_total`.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoNode => "no_node",
            Refusal::MaxConnections => "max_connections",
            Refusal::GlobalMaxConnections => "global_max_connections",
            Refusal::MaxConnectionsPerClient => "max_connections_per_client",
            Refusal::Denied => "denied",
            Refusal::Exhausted => "exhausted",
            Refusal::ProxyHeader => "proxy_header",
        }
    }
}

/// Per-service figures.
#[derive(Debug, Default)]
pub struct ServiceFigures {
    accepted: AtomicU64,
    active: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    /// Open connections per client IP, kept only for a service with
    /// `max_connections_per_client`; an entry goes when its count reaches 0.
    pub(crate) per_client: std::sync::Mutex<HashMap<IpAddr, u32>>,
    /// When a refusal was last logged (ms on the process clock), to log at most one a second.
    pub(crate) last_refusal_log_ms: AtomicU64,
    /// Connections closed for reaching `max_connection_age`.
    aged_out: AtomicU64,
}

impl ServiceFigures {
    /// Connections closed for reaching `max_connection_age`.
    pub fn aged_out(&self) -> u64 {
        self.aged_out.load(Relaxed)
    }
    pub fn count_aged_out(&self) {
        self.aged_out.fetch_add(1, Relaxed);
    }

    /// Clients accepted (admitted past limits and access lists).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }
    pub fn active_connections(&self) -> u64 {
        self.active.load(Relaxed)
    }
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason as usize].load(Relaxed)
    }
    pub fn count_refused(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Relaxed);
    }
    /// Counts a client as open if fewer than `max` are; `None` when full.
    pub(crate) fn try_open(self: &Arc<Self>, max: Option<u64>) -> Option<ServiceGuard> {
        let before = self.active.fetch_add(1, Relaxed);
        if max.is_some_and(|m| before >= m) {
            self.active.fetch_sub(1, Relaxed);
            return None;
        }
        self.accepted.fetch_add(1, Relaxed);
        Some(ServiceGuard(self.clone()))
    }
    /// Counts an adopted client as open (another process accepted it: it is
    /// not counted as accepted again, and no limit refuses it).
    pub(crate) fn adopt(self: &Arc<Self>) -> ServiceGuard {
        self.active.fetch_add(1, Relaxed);
        ServiceGuard(self.clone())
    }
}

/// Decrements a service's open connections when dropped; gives access to
/// the service's figures meanwhile.
pub struct ServiceGuard(Arc<ServiceFigures>);

impl std::ops::Deref for ServiceGuard {
    type Target = ServiceFigures;
    fn deref(&self) -> &ServiceFigures {
        &self.0
    }
}

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::task::Waker;

    fn is_ready(future: Pin<&mut impl Future<Output = ()>>) -> bool {
        future.poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    #[test]
    fn a_red_node_cuts_a_connection_at_once() {
        let figures = NodeFigures::new(NodeState::Red);
        assert!(is_ready(pin!(figures.red())));
        let figures = NodeFigures::new(NodeState::Yellow);
        assert!(!is_ready(pin!(figures.red())), "only red cuts");
    }

    /// Connections on every worker slot are woken when their node turns red
    /// on another thread (the admin API's).
    #[test]
    fn turning_red_wakes_the_connections_of_every_worker() {
        let figures = Arc::new(NodeFigures::new(NodeState::Green));
        let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
        let workers: Vec<_> = (0..worker_slots() + 1)
            .map(|worker| {
                let (figures, waiting) = (figures.clone(), waiting_tx.clone());
                std::thread::spawn(move || {
                    bind_worker_slot(worker);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        let mut red = pin!(figures.red());
                        std::future::poll_fn(|cx| {
                            assert!(red.as_mut().poll(cx).is_pending());
                            Poll::Ready(())
                        })
                        .await;
                        waiting.send(()).unwrap();
                        tokio::time::timeout(std::time::Duration::from_secs(10), red).await
                    })
                })
            })
            .collect();
        for _ in &workers {
            waiting_rx.recv().unwrap();
        }
        figures.set_state(NodeState::Red);
        for worker in workers {
            worker.join().unwrap().expect("woken when the node turned red");
        }
    }
}
