//! Accepting: one loop per listening socket on a worker, which admits each
//! client (`admission`) and spawns its connection task on that worker.
//! Never reads a client's bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connection::{Accepted, connection_task};
use super::shared::Shared;
use super::workers::AcceptCount;
use super::{admission, busy_poll, identity};

/// Pause after a failed accept (out of descriptors, usually).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts clients of `service` on `listener` until `stop` is cancelled,
/// counting each in `accepted_here`. Run on a worker: the listener and every
/// client it accepts live on that worker's runtime.
pub(super) async fn accept_loop(
    listener: std::net::TcpListener,
    service: Arc<str>,
    shared: Arc<Shared>,
    accepted_here: AcceptCount,
    stop: CancellationToken,
) {
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
                if let Some(timeout) = admission::expects_proxy_header(&shared, &service, peer.ip()) {
                    let (service, shared, cut) = (service.clone(), shared.clone(), cut.clone());
                    let task = from_upstream(client, peer, local_port, timeout, service, shared.clone(), cut);
                    shared.connections.spawn(busy_poll::Counted::new(task));
                    continue;
                }
                let Some(accepted) = admit(client, peer, None, local_port, &service, &shared, &cut) else {
                    continue;
                };
                shared
                    .connections
                    .spawn(busy_poll::Counted::new(connection_task(accepted)));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the
                // pending client stays in the backlog until descriptors free up.
                failures += 1;
                if last_failure_log.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(10)) {
                    warn!(service = %service, "accept failed: {e}; backing off 100 ms between tries ({failures} failure(s) so far)");
                    last_failure_log = Some(Instant::now());
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    debug!(service = %service, "listener on {local:?} closed");
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
