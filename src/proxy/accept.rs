//! Accepting: one loop per listening socket on a worker, which admits each
//! client (`admission`) and spawns its connection task on that worker.
//! Never reads a client's bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connection::{Accepted, connection_task};
use super::shared::Shared;
use super::workers::AcceptCount;
use super::{admission, busy_poll};

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
                let admitted = match admission::admit(&shared, &service, peer.ip()) {
                    Ok(a) => a,
                    Err(refused) => {
                        refused.record(&service, peer.ip());
                        continue; // dropping `client` closes it
                    }
                };
                #[cfg(not(target_os = "linux"))]
                let _ = client.set_nodelay(true);
                let accepted = Accepted {
                    client,
                    peer,
                    local_port,
                    service: service.clone(),
                    admitted,
                    shared: shared.clone(),
                    cut: cut.clone(),
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
