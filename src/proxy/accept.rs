//! Accepting: one loop per listening socket on a worker, which admits each
//! client (`admission`) and spawns its connection task on that worker; on a
//! neighbour's socket, only when the neighbour needs the help
//! ([`help_neighbour`]). Never reads a client's bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::runtime::RuntimeMetrics;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connection::{Accepted, connection_task};
use super::shared::Shared;
use super::workers::AcceptCount;
use super::{admission, busy_poll, identity};

/// Pause after a failed accept (out of descriptors, usually).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a client may wait on a neighbour's socket, its owner no busier
/// than this worker, before this worker takes it (one per wait).
const NEIGHBOUR_PATIENCE: Duration = Duration::from_millis(1);

/// Accepts clients of `service` on `listener` until `stop` is cancelled,
/// counting each in `accepted_here`. Run on a worker: the listener and every
/// client it accepts live on that worker's runtime. With `owner_load`, the
/// listener is a neighbour's socket ([`help_neighbour`]).
pub(super) async fn accept_loop(
    listener: std::net::TcpListener,
    service: Arc<str>,
    shared: Arc<Shared>,
    accepted_here: AcceptCount,
    stop: CancellationToken,
    owner_load: Option<RuntimeMetrics>,
) {
    if let Some(owner) = owner_load {
        return help_neighbour(listener, owner, service, shared, accepted_here, stop).await;
    }
    let local = listener.local_addr().ok();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(service = %service, "cannot watch the listener on {local:?}: {e}");
            return;
        }
    };
    // Each listener has one port: the port clients reached us on, which a node
    // address without a port forwards to.
    let local_port = local.map_or(0, |a| a.port());
    let (mut failures, mut last_failure_log) = (0u64, None);
    // This loop's own child of `cut_all`: its clients wait on it, so a
    // connection's start and end lock this worker's token, never one that
    // every worker's connections contend for.
    let cut = shared.cut_all.child_token();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                accepted_here.add_one();
                serve(client, peer, local_port, &service, &shared, &cut);
            }
            Err(e) => {
                if !back_off(&e, &service, &mut failures, &mut last_failure_log, &stop).await {
                    break;
                }
            }
        }
    }
    debug!(service = %service, "listener on {local:?} closed");
}

/// Spawns the connection task of a client just accepted, on this worker.
fn serve(
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    local_port: u16,
    service: &Arc<str>,
    shared: &Arc<Shared>,
    cut: &CancellationToken,
) {
    if let Some(timeout) = admission::expects_proxy_header(shared, service, peer.ip()) {
        let (service, cut) = (service.clone(), cut.clone());
        let task = from_upstream(client, peer, local_port, timeout, service, shared.clone(), cut);
        shared.connections.spawn(busy_poll::Counted::new(task));
        return;
    }
    if let Some(accepted) = admit(client, peer, None, local_port, service, shared, cut) {
        shared
            .connections
            .spawn(busy_poll::Counted::new(connection_task(accepted)));
    }
}

/// After a failed accept (EMFILE/ENFILE and friends): backs off instead of
/// spinning, logging at most every 10 s; the pending client stays in the
/// backlog until descriptors free up. `false` once `stop` is cancelled.
async fn back_off(
    e: &std::io::Error,
    service: &str,
    failures: &mut u64,
    last_failure_log: &mut Option<Instant>,
    stop: &CancellationToken,
) -> bool {
    *failures += 1;
    if last_failure_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
        warn!(service = %service, "accept failed: {e}; backing off 100 ms between tries ({failures} failure(s) so far)");
        *last_failure_log = Some(Instant::now());
    }
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(ACCEPT_BACKOFF) => true,
    }
}

/// Accepts from a neighbour's socket (`workers::share_with_neighbours`),
/// but only where the neighbour needs the help: at once while this worker
/// runs fewer tasks than the socket's owner (its connections, mostly), else
/// one client per [`NEIGHBOUR_PATIENCE`] that its owner has left waiting.
///
/// Why not whenever this worker wakes first: a burst of new clients (wrk's
/// 64 keep-alive connections, opened at once) then went all to whichever
/// worker woke first, and long-lived connections kept the imbalance: on 2
/// CPUs keep-alive requests per second fell by up to a fifth in those runs
/// (docs/performance.md). Ties go to the owner, so a burst splits as the
/// kernel's hash spread it; a busier or stuck owner is still helped.
///
/// Waits on the socket's readiness itself (tokio's listener has no wait that
/// does not accept): each new client queued on the socket wakes this loop
/// once; it then drains what it may take with non-blocking accepts.
async fn help_neighbour(
    listener: std::net::TcpListener,
    owner: RuntimeMetrics,
    service: Arc<str>,
    shared: Arc<Shared>,
    accepted_here: AcceptCount,
    stop: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let local_port = local.map_or(0, |a| a.port());
    // SAFETY: the listener owns its descriptor, which stays open and the same
    // for as long as the AsyncFd that takes the listener lives.
    let listener = match unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(service = %service, "cannot watch the neighbour's listener on {local:?}: {e}");
            return;
        }
    };
    let mine = tokio::runtime::Handle::current().metrics();
    let (mut failures, mut last_failure_log) = (0u64, None);
    let cut = shared.cut_all.child_token();
    let mut drained = true;
    loop {
        if drained {
            let mut ready = tokio::select! {
                _ = stop.cancelled() => break,
                ready = listener.readable() => match ready {
                    Ok(ready) => ready,
                    Err(_) => break,
                },
            };
            // Cleared before the accepts below: a client queued meanwhile wakes us again.
            ready.clear_ready();
            drained = false;
        }
        if mine.num_alive_tasks() >= owner.num_alive_tasks() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(NEIGHBOUR_PATIENCE) => {}
            }
        }
        let accepted = accept_nonblocking(listener.get_ref())
            .and_then(|(client, peer)| Ok((tokio::net::TcpStream::from_std(client)?, peer)));
        match accepted {
            Ok((client, peer)) => {
                accepted_here.add_one();
                serve(client, peer, local_port, &service, &shared, &cut);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => drained = true,
            Err(e) => {
                if !back_off(&e, &service, &mut failures, &mut last_failure_log, &stop).await {
                    break;
                }
            }
        }
    }
    debug!(service = %service, "neighbour's listener on {local:?} closed");
}

/// One client from a listener that tokio does not own, made non-blocking and
/// close-on-exec by the `accept4` itself: std's `accept` would leave the
/// socket blocking and cost one more system call to change that.
fn accept_nonblocking(listener: &std::net::TcpListener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    let (client, peer) = socket2::SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = peer
        .as_socket()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "a TCP listener accepted a non-IP peer"))?;
    Ok((client.into(), peer))
}

/// A client from `accept_proxy_from`: an upstream balancer's connection,
/// which must start with a PROXY header within `timeout`. The client it
/// names is admitted and served as if it had connected itself; a missing,
/// malformed, oversized or late header closes the connection, counted and
/// logged (at most once a second per service) with the reason.
async fn from_upstream(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    local_port: u16,
    timeout: Duration,
    service: Arc<str>,
    shared: Arc<Shared>,
    cut: CancellationToken,
) {
    let carried = tokio::select! {
        carried = identity::take_header(&client, timeout) => carried,
        _ = cut.cancelled() => return,
    };
    let (peer, to) = match carried {
        Ok(identity::Carried::Client { client, to }) => (client, Some(Box::new(to))),
        Ok(identity::Carried::Own) => (upstream, None),
        Err(e) => {
            admission::refuse_header(&shared, &service, upstream.ip(), &e.to_string());
            return;
        }
    };
    if let Some(accepted) = admit(client, peer, to, local_port, &service, &shared, &cut) {
        connection_task(accepted).await;
    }
}

/// Admits `peer` (the client, as its socket or an upstream's header names
/// it) to `service` and gathers what its connection task owns; a refused
/// client is counted and logged, and closed as `client` drops.
fn admit(
    client: tokio::net::TcpStream,
    peer: SocketAddr,
    to: Option<Box<SocketAddr>>,
    local_port: u16,
    service: &Arc<str>,
    shared: &Arc<Shared>,
    cut: &CancellationToken,
) -> Option<Accepted> {
    let admitted = match admission::admit(shared, service, peer.ip()) {
        Ok(a) => a,
        Err(refused) => {
            refused.record(service, peer.ip());
            return None;
        }
    };
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);
    Some(Accepted {
        client,
        peer,
        to,
        local_port,
        service: service.clone(),
        admitted,
        shared: shared.clone(),
        cut: cut.clone(),
        sni: None,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::accept_nonblocking;

    fn status_flags(socket: &std::net::TcpStream) -> (libc::c_int, libc::c_int) {
        // SAFETY: F_GETFL and F_GETFD only read the flags of a descriptor the stream owns.
        unsafe {
            (
                libc::fcntl(socket.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(socket.as_raw_fd(), libc::F_GETFD),
            )
        }
    }

    #[test]
    fn a_client_taken_from_a_neighbours_socket_is_non_blocking_and_close_on_exec() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = accept_nonblocking(&listener).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let (status, descriptor) = status_flags(&accepted);
        assert_ne!(status & libc::O_NONBLOCK, 0, "tokio needs a non-blocking socket");
        assert_ne!(
            descriptor & libc::FD_CLOEXEC,
            0,
            "no child process may inherit a client"
        );
    }

    #[test]
    fn an_empty_queue_would_block() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let error = accept_nonblocking(&listener).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);
    }
}
