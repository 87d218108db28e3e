//! One connection's life: the choice of node (pin or pick, then the
//! candidates), the connect phase, the pump, the cuts that may end it (idle,
//! red, shutdown) and its access-log line. Everything a connection owns sits
//! once in its task ([`Accepted`]). Never touches a listener.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::admission::{self, Admitted};
use super::connect::{self, set_socket_buffer};
use super::pump::{self, PumpError, Side};
use super::shared::{Departing, Shared};
use crate::model::{Cluster, ConnectionState, NodeFigures, NodeState, PinRecord, PinStore, Pins, Refusal};

/// How a connection ended, for the access log.
struct Ending<'a>(&'a Result<(), PumpError>);

impl std::fmt::Display for Ending<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Ok(_) => f.write_str("closed"),
            Err(PumpError {
                side: Side::Balancer,
                error,
            }) => error.fmt(f),
            Err(e) => write!(f, "{} error: {}", e.side.name(), e.error),
        }
    }
}

/// Counts one connection's bytes into its node's figures as they flow, and
/// keeps the connection's own totals for the access log and its last
/// activity for the idle timeout.
struct ConnectionBytes<'a> {
    node: &'a NodeFigures,
    /// When the client was accepted.
    started: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Milliseconds after `started` that the last byte moved, or
    /// [`UNTRACKED`] without an idle timeout: then nobody reads it, and
    /// reading the clock for every chunk would cost about 1.5 % of the
    /// balancer's CPU under keep-alive load.
    last_activity_ms: AtomicU64,
}

/// `last_activity_ms` of a connection whose service has no idle timeout.
const UNTRACKED: u64 = u64::MAX;

impl ConnectionBytes<'_> {
    fn touch(&self) {
        if self.last_activity_ms.load(Relaxed) != UNTRACKED {
            self.last_activity_ms
                .store(self.started.elapsed().as_millis() as u64, Relaxed);
        }
    }

    /// Resolves once no byte has moved either way for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last_activity_ms.load(Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

impl pump::Counter for ConnectionBytes<'_> {
    fn bytes_in(&self, n: u64) {
        self.node.add_bytes_in(n);
        self.bytes_in.fetch_add(n, Relaxed);
        self.touch();
    }
    fn bytes_out(&self, n: u64) {
        self.node.add_bytes_out(n);
        self.bytes_out.fetch_add(n, Relaxed);
        self.touch();
    }
}

/// Everything a connection's task owns, stored once in the task.
///
/// Why one struct behind a reference: an `async fn` keeps its by-value
/// arguments twice in its future (as arguments and as locals), and the task
/// that awaited it would keep its own copies too. The task's size is most of
/// what an idle connection costs, so the spawned block owns this and
/// [`serve_client`] only borrows it.
pub(super) struct Accepted {
    pub(super) client: TcpStream,
    /// The client's address: the socket's peer, or what an upstream
    /// balancer's PROXY header said (`accept_proxy_from`).
    pub(super) peer: SocketAddr,
    /// The address the client connected to, where an upstream balancer's
    /// header said (else the socket's own, looked up when a node needs it).
    /// Boxed: every open connection's task holds this field, and most
    /// clients come without an upstream.
    pub(super) to: Option<Box<SocketAddr>>,
    /// The port the client reached us on (see `NodeAddress::target`).
    pub(super) local_port: u16,
    pub(super) service: Arc<str>,
    pub(super) admitted: Admitted,
    pub(super) shared: Arc<Shared>,
    /// Cancelled to cut the connection at the end of the shutdown grace period.
    pub(super) cut: CancellationToken,
    /// The server name its ClientHello carried, in a service with routes.
    pub(super) sni: Option<Box<str>>,
}

/// The task of one connection: it owns the connection's state for its whole life.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep `accepted` twice in the task (see `Accepted`)"
)]
pub(super) fn connection_task(mut accepted: Accepted) -> impl Future<Output = ()> + Send {
    async move {
        route_by_server_name(&mut accepted).await;
        serve_client(&accepted).await
    }
}

/// In a service with `[[service.route]]`: reads the server name of the
/// client's ClientHello (peeked, not taken) and, when a route matches it,
/// serves the client from the route's cluster instead of the service's.
async fn route_by_server_name(accepted: &mut Accepted) {
    if !accepted.admitted.routed {
        return;
    }
    let Some(name) = super::sni::server_name(&accepted.client).await else {
        return;
    };
    let snapshot = accepted.shared.live.snapshot.load();
    accepted.sni = Some(name.as_str().into());
    let Some(service) = snapshot.services.get(&*accepted.service) else {
        return;
    };
    if let Some((route, count)) = service.route(name.as_str())
        && let Some(cluster) = snapshot.clusters.get(&route.cluster)
    {
        count.fetch_add(1, Relaxed);
        accepted.admitted.cluster = cluster.clone();
    }
}

/// Picks the client's node and connects to it, falling over along the
/// candidates; on success the node's index, the stream to it and the client
/// bytes already forwarded. A client that cannot be served is logged here.
async fn connect_phase(accepted: &Accepted) -> Option<(usize, TcpStream, u64)> {
    let Accepted {
        client,
        peer,
        to,
        local_port,
        service,
        admitted,
        shared,
        cut,
        ..
    } = accepted;
    let (peer, service) = (*peer, &**service);
    let cluster = &admitted.cluster;
    if let Some(size) = admitted.client_buffer
        && let Err(e) = set_socket_buffer(client, size)
    {
        debug!(service, "client {peer}: cannot set its socket_buffer: {e}");
    }

    let mut pinned = pinned_node(&shared.live.pins, cluster, peer);
    // What the store's lookup took of the new client's budget.
    let mut looked_up = Duration::ZERO;
    if pinned.is_none()
        && cluster.affinity
        && let Some(store) = shared.live.store.get()
    {
        // A client this instance has not seen: a twin may have pinned it.
        let asked = Instant::now();
        pinned = shared_pin(&**store, &shared.live.pins, cluster, peer).await;
        looked_up = asked.elapsed();
    }
    // A client's home node (ip-hash), even when it cannot take the client, so
    // that its fall-over chain comes first; else the algorithm's pick.
    let home = pinned.or_else(|| cluster.balancer.home(peer.ip(), &cluster.nodes));
    let first = match home {
        Some(home) => connect::First::Home(home),
        None => connect::First::Pick(cluster.pick(peer.ip())),
    };
    let outcome = tokio::select! {
        outcome = connect::connect_client(client, connect::Ends { client: peer, to: to.as_deref().copied() }, cluster, first, *local_port, admitted.idle_timeout) => outcome,
        _ = shared.must_cut(cut) => return None,
    };
    match outcome {
        connect::Outcome::Connected {
            node,
            stream,
            forwarded,
        } => {
            if cluster.affinity {
                // A pin stays on its node while the client is served by the node's fall-over chain.
                let pin_to = &cluster.nodes[pinned.unwrap_or(node)].name;
                let new_client = pinned.is_none().then_some(looked_up);
                keep_pin(shared, cluster, peer, pin_to, new_client).await;
            }
            Some((node, stream, forwarded))
        }
        connect::Outcome::NoNode => {
            admitted.service.count_refused(Refusal::NoNode);
            warn!(service, cluster = %cluster.name, "no node could take client {peer}; closing it");
            None
        }
        connect::Outcome::Exhausted(e) => {
            // Our fault, not the node's: no other node would do better.
            admitted.service.count_refused(Refusal::Exhausted);
            admission::log_refusal(&admitted.service, service, peer.ip(), Refusal::Exhausted, None);
            debug!(
                service,
                "no descriptor or memory for a node connection: {e}; closing {peer}"
            );
            None
        }
        connect::Outcome::Unbindable(e) => {
            admitted.service.count_refused(Refusal::NoNode);
            let why = format!("cannot bind the connection to a node as `source` says: {e}");
            admission::log_refusal(&admitted.service, service, peer.ip(), Refusal::NoNode, Some(&why));
            None
        }
        connect::Outcome::Idle => {
            debug!(service, cluster = %cluster.name, "client {peer}: idle timeout before the node answered; closing");
            None
        }
        connect::Outcome::ClientGone(e) => {
            debug!(service, cluster = %cluster.name, "client {peer} went away while connecting: {e}");
            None
        }
    }
}

/// One admitted client, from the choice of node to the access log line.
async fn serve_client(accepted: &Accepted) {
    let started = Instant::now();
    // Boxed: the connect phase's state (probation, timers) is large and short-lived;
    // inline, every open connection's task would keep room for it.
    let Some((i, upstream, forwarded)) = Box::pin(connect_phase(accepted)).await else {
        return;
    };
    let progress = Progress {
        started,
        bytes_in: forwarded,
        adopted: false,
        ..Progress::default()
    };
    forward(accepted, i, upstream, progress).await;
}

/// Where a connection stands when it starts forwarding: here, right after
/// the connect phase; or, adopted from the process this one upgraded, where
/// that one left it.
struct Progress {
    started: Instant,
    bytes_in: u64,
    bytes_out: u64,
    /// How long before `started` + age the last byte moved.
    idle: Duration,
    /// (client → node done, node → client done).
    done: (bool, bool),
    /// Adopted: the node's figures counted it, and its bytes so far, already
    /// (they came over with the node's counters).
    adopted: bool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress {
            started: Instant::now(),
            bytes_in: 0,
            bytes_out: 0,
            idle: Duration::ZERO,
            done: (false, false),
            adopted: false,
        }
    }
}

/// How the wait for a connection to leave ended.
enum Left {
    /// Handed to the new process; it carries on there.
    HandedOver,
    /// It ended by itself meanwhile.
    Ended(Result<(), PumpError>),
    /// No hand-over, or its time is up.
    Cut,
}

/// A connection with its node, until it ends: the pump, the cuts, the
/// hand-over of an upgrade, and its access-log line.
///
/// Not an async fn: its body would keep the arguments twice in the task (as
/// arguments and as its own locals), and `progress` for the connection's
/// whole life. The setup runs here, and the future keeps only what the
/// forwarding uses.
fn forward(
    accepted: &Accepted,
    i: usize,
    upstream: TcpStream,
    progress: Progress,
) -> impl Future<Output = ()> + Send + '_ {
    let node = &accepted.admitted.cluster.nodes[i];
    let in_node = if progress.adopted {
        node.figures.adopt_connection()
    } else {
        node.figures.open_connection()
    };
    let age = progress.started.elapsed();
    let bytes = ConnectionBytes {
        node: &node.figures,
        started: progress.started,
        bytes_in: AtomicU64::new(if progress.adopted { progress.bytes_in } else { 0 }),
        bytes_out: AtomicU64::new(progress.bytes_out),
        last_activity_ms: AtomicU64::new(match accepted.admitted.idle_timeout {
            Some(_) => age.saturating_sub(progress.idle).as_millis() as u64,
            None => UNTRACKED,
        }),
    };
    if !progress.adopted {
        // The client's first bytes, forwarded while connecting.
        pump::Counter::bytes_in(&bytes, progress.bytes_in);
    }
    let done = progress.done;
    // `accepted`'s fields are named where they are used rather than bound
    // to locals: a local that lives across an await is stored in the task,
    // and every open connection's task would keep it.
    async move {
        // Keeps the connection counted on its node until the future ends.
        let _in_node = in_node;
        // Boxed, and only for a service with an idle timeout: a timer is big,
        // and the task of every connection would otherwise carry one.
        let mut idle_watch = accepted
            .admitted
            .idle_timeout
            .map(|idle| Box::pin(bytes.idle_for(idle)));
        let idle = std::future::poll_fn(|cx| match &mut idle_watch {
            Some(watch) => watch.as_mut().poll(cx),
            None => Poll::Pending,
        });
        // Boxed for the same reason, and only with a `max_connection_age`.
        let mut age_watch = accepted
            .admitted
            .max_connection_age
            .map(|max| Box::pin(tokio::time::sleep_until((bytes.started + closing_age(max)).into())));
        let aged = std::future::poll_fn(|cx| match &mut age_watch {
            Some(watch) => watch.as_mut().poll(cx),
            None => Poll::Pending,
        });
        let mut pump = std::pin::pin!(pump::Pump::resumed(
            &accepted.client,
            &upstream,
            accepted.admitted.forwarding,
            &bytes,
            done
        ));
        let result = tokio::select! {
            r = &mut pump => r,
            _ = idle => Err(PumpError { side: Side::Balancer, error: io::Error::new(io::ErrorKind::TimedOut, "idle timeout") }),
            _ = accepted.cut.cancelled() => match Box::pin(leave(accepted, pump.as_mut(), &upstream, &bytes, node)).await {
                Left::HandedOver => return,
                Left::Ended(r) => r,
                Left::Cut => Err(PumpError { side: Side::Balancer, error: io::Error::other("cut at shutdown") }),
            },
            _ = node.figures.red() => Err(abort_both(&accepted.client, &upstream, "cut: the node turned red")),
            _ = aged => {
                accepted.admitted.service.count_aged_out();
                close_aged(pump.as_mut(), &accepted.client, &upstream).await
            }
        };
        drop(idle_watch);
        drop(age_watch);
        log_end(accepted, node, &bytes, &result);
    }
}

/// A connection's end: its pin's use, and its access-log line.
fn log_end(
    accepted: &Accepted,
    node: &crate::model::Node,
    bytes: &ConnectionBytes<'_>,
    result: &Result<(), PumpError>,
) {
    let Accepted {
        peer,
        service,
        admitted,
        shared,
        sni,
        ..
    } = accepted;
    let accepted_sni = sni.as_deref();
    let cluster = &admitted.cluster;
    if cluster.affinity {
        shared.live.pins.touch(&cluster.name, peer.ip());
    }
    crate::logging::access(&crate::logging::Access {
        client: *peer,
        service,
        cluster: &cluster.name,
        node: &node.name,
        bytes_in: bytes.bytes_in.load(Relaxed),
        bytes_out: bytes.bytes_out.load(Relaxed),
        duration_ms: bytes.started.elapsed().as_millis(),
        end: &Ending(result),
        sni: accepted_sni,
    });
}

/// The connection's loop was told to stop. With a hand-over under way: stop
/// reading, let what is held here be written, then hand the connection over
/// (its sockets and where it stands) unless it ended meanwhile or the
/// hand-over's time ran out. Without one: cut.
async fn leave(
    accepted: &Accepted,
    mut pump: std::pin::Pin<&mut pump::Pump<'_>>,
    upstream: &TcpStream,
    bytes: &ConnectionBytes<'_>,
    node: &crate::model::Node,
) -> Left {
    let shared = &accepted.shared;
    let Some(out) = shared.hand_over_to() else {
        return Left::Cut;
    };
    let quiet = drained(pump.as_mut());
    let ended = tokio::select! {
        ended = quiet => ended,
        _ = shared.cut_now.cancelled() => return Left::Cut,
    };
    if let Some(result) = ended {
        return Left::Ended(result);
    }
    let departing = match departing(accepted, upstream, bytes, node, pump.done()) {
        Ok(d) => d,
        Err(e) => {
            warn!(service = %accepted.service, "cannot hand over the connection of {}: {e}", accepted.peer);
            return Left::Cut;
        }
    };
    match out.send(departing) {
        Ok(()) => Left::HandedOver,
        Err(_) => Left::Cut,
    }
}

/// The connection as it leaves: where it stands, and copies of its sockets.
fn departing(
    accepted: &Accepted,
    upstream: &TcpStream,
    bytes: &ConnectionBytes<'_>,
    node: &crate::model::Node,
    (client_done, node_done): (bool, bool),
) -> io::Result<Departing> {
    use std::os::fd::AsFd;
    let age = bytes.started.elapsed();
    let last = bytes.last_activity_ms.load(Relaxed);
    let idle_ms = if last == UNTRACKED {
        0
    } else {
        (age.as_millis() as u64).saturating_sub(last)
    };
    Ok(Departing {
        state: ConnectionState {
            service: accepted.service.to_string(),
            cluster: accepted.admitted.cluster.name.clone(),
            node: node.name.clone(),
            node_address: node.address_text.clone(),
            client: accepted.peer,
            local_port: accepted.local_port,
            age_ms: age.as_millis() as u64,
            idle_ms,
            bytes_in: bytes.bytes_in.load(Relaxed),
            bytes_out: bytes.bytes_out.load(Relaxed),
            client_done,
            node_done,
        },
        client: accepted.client.as_fd().try_clone_to_owned()?,
        node: upstream.as_fd().try_clone_to_owned()?,
    })
}

/// The task of a connection adopted from the process this one upgraded:
/// straight to forwarding, where that one left it.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep `accepted` twice in the task (see `Accepted`)"
)]
pub(super) fn adopted_task(
    accepted: Accepted,
    node: usize,
    upstream: std::net::TcpStream,
    state: ConnectionState,
) -> impl Future<Output = ()> + Send {
    async move {
        let upstream = match upstream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(upstream))
        {
            Ok(s) => s,
            Err(e) => {
                warn!(service = %accepted.service, "cannot adopt the connection of {}: {e}", accepted.peer);
                return;
            }
        };
        let age = Duration::from_millis(state.age_ms);
        let progress = Progress {
            started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            bytes_in: state.bytes_in,
            bytes_out: state.bytes_out,
            idle: Duration::from_millis(state.idle_ms),
            done: (state.client_done, state.node_done),
            adopted: true,
        };
        forward(&accepted, node, upstream, progress).await;
    }
}

/// Pins `peer` to `pin_to`, here and in the store. A new client's pin (one
/// whose lookup took `new_client`) is in the store before it hears from
/// its node, within what the lookup left of its budget.
async fn keep_pin(shared: &Shared, cluster: &Cluster, peer: SocketAddr, pin_to: &str, new_client: Option<Duration>) {
    shared.live.pins.pin(&cluster.name, peer.ip(), pin_to);
    let Some(store) = shared.live.store.get() else {
        return;
    };
    let pin = PinRecord {
        cluster: &cluster.name,
        client: peer.ip(),
        node: pin_to,
        last_seen_ms: shared.live.clock().now_ms(),
        ttl: cluster.affinity_ttl,
    };
    match new_client {
        Some(looked_up) => store.write_new(pin, looked_up).await,
        None => store.write(pin),
    }
}

/// The node the store says `peer` is pinned to (by a twin, or by this
/// instance before a restart), within the store's lookup budget; learnt here
/// when this cluster has that node and it is not red. A pin to a node this
/// file does not have is ignored, and left in the store for the twin that has it.
async fn shared_pin(store: &dyn PinStore, pins: &Pins, cluster: &Cluster, peer: SocketAddr) -> Option<usize> {
    let pin = store.lookup(&cluster.name, peer.ip()).await?;
    let i = cluster
        .nodes
        .iter()
        .position(|n| *n.name == *pin.node && n.figures.state() != NodeState::Red)?;
    pins.learn(&cluster.name, peer.ip(), Some(pin));
    Some(i)
}

/// The node `peer` is pinned to, if the cluster keeps affinity and the pin
/// still holds. A pin to a node no longer configured, or to a red one (pins
/// are dropped when a node turns red; this catches a race with that), moves
/// for good: the caller pins the client anew.
fn pinned_node(pins: &Pins, cluster: &Cluster, peer: SocketAddr) -> Option<usize> {
    if !cluster.affinity {
        return None;
    }
    let node = pins.pinned(&cluster.name, peer.ip(), cluster.affinity_ttl)?;
    cluster
        .nodes
        .iter()
        .position(|n| *n.name == *node && n.figures.state() != NodeState::Red)
}

/// When a connection under `max_connection_age = max` closes: at a moment
/// of its own within the last tenth of `max`, so connections opened together
/// do not all close together.
fn closing_age(max: Duration) -> Duration {
    max - max.mul_f64(fastrand::f64() / 10.0)
}

/// How long an aged connection may take to write out what it holds.
const AGED_FLUSH: Duration = Duration::from_secs(5);

/// Closes a connection that reached its maximum age: it stops reading,
/// writes out what it holds (within [`AGED_FLUSH`]), then sends a FIN each
/// way, so both ends see an orderly close rather than a reset.
async fn close_aged(
    mut pump: std::pin::Pin<&mut pump::Pump<'_>>,
    client: &TcpStream,
    node: &TcpStream,
) -> Result<(), PumpError> {
    let quiet = drained(pump.as_mut());
    if let Ok(Some(ended)) = tokio::time::timeout(AGED_FLUSH, quiet).await {
        // It ended by itself meanwhile.
        return ended;
    }
    for stream in [client, node] {
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
    Err(PumpError {
        side: Side::Balancer,
        error: io::Error::other("max age"),
    })
}

/// Makes the pump stop reading and write out what it holds: resolves with
/// the connection's end if it ends meanwhile, or `None` once nothing of it
/// is held here (an upgrade hands it over, a maximum age closes it).
fn drained<'p, 'a>(
    mut pump: std::pin::Pin<&'p mut pump::Pump<'a>>,
) -> impl Future<Output = Option<Result<(), PumpError>>> + use<'p, 'a> {
    pump.drain();
    std::future::poll_fn(move |cx| match pump.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending if pump.is_quiescent() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
}

/// Makes dropping `client` and `node` reset both connections (SO_LINGER 0),
/// for a cut that must not wait for buffered data.
fn abort_both(client: &TcpStream, node: &TcpStream, why: &str) -> PumpError {
    pump::reset_on_drop(&[client, node]);
    PumpError {
        side: Side::Balancer,
        error: io::Error::other(why.to_string()),
    }
}

/// What an idle connection costs is mostly its task: this prints the sizes of
/// the futures involved (`cargo test --release --lib future_sizes --
/// --nocapture`) and holds the connection's task within its budget.
#[cfg(test)]
mod future_sizes {
    /// Tokio allocates a task with 128-byte alignment, with 104 bytes of its
    /// own beside the future (header, scheduler, id, stage and trailer, in
    /// tokio 1.54 without `tokio_unstable`) and the task tracker's 8: a
    /// future of at most 784 bytes keeps the allocation at 896 bytes, one
    /// more byte makes it 1024. The future is 760 bytes in a release build
    /// and 776 in a debug one (which `cargo test` runs).
    const TASK_FUTURE_BUDGET: usize = 784;

    #[test]
    fn future_sizes() {
        let config = crate::config::Config::forward("127.0.0.1:0", &["127.0.0.1:1".to_string()]).unwrap();
        let live = crate::model::Live::new(crate::balance::compile(&config, None), Default::default());
        let shared = std::sync::Arc::new(super::Shared::new(std::sync::Arc::new(live)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            struct Nop;
            impl super::pump::Counter for Nop {
                fn bytes_in(&self, _: u64) {}
                fn bytes_out(&self, _: u64) {}
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let pump = super::pump::pump(&c, &c, crate::config::ForwardMode::Auto, &Nop);
            println!("pump future: {} bytes", std::mem::size_of_val(&pump));
            drop(pump);
            let connect = super::connect::connect(
                "127.0.0.1:1".parse().unwrap(),
                None,
                std::time::Duration::from_secs(1),
                None,
            );
            println!("connect future: {} bytes", std::mem::size_of_val(&connect));
            let peer: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
            let admitted = super::admission::admit(&shared, "forward", peer.ip()).ok().unwrap();
            let accepted = super::Accepted {
                client: c,
                peer,
                to: None,
                local_port: 1,
                service: "forward".into(),
                admitted,
                shared: shared.clone(),
                cut: shared.cut_all.child_token(),
                sni: None,
            };
            let serve = super::serve_client(&accepted);
            println!("serve_client future: {} bytes", std::mem::size_of_val(&serve));
            drop(serve);
            let task = super::connection_task(accepted);
            let size = std::mem::size_of_val(&task);
            println!("connection task future: {size} bytes");
            assert!(
                size <= TASK_FUTURE_BUDGET,
                "an idle connection's task grew to {size} bytes, over its {TASK_FUTURE_BUDGET}: \
                 keep what lives across the pump's await out of the task (see `forward`)"
            );
        });
    }
}
