//! The data plane: listeners accept clients, each client gets a node from its
//! service's cluster (pick, then fall-over candidates), and the pump moves the
//! bytes. One tokio task per connection on a fixed pool of worker threads.

mod candidates;
mod pump;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use candidates::Candidates;
pub use pump::{PumpError, Side};

use crate::model::{NodeFigures, Snapshot};

/// Where the access log goes: `RUST_LOG=protobalance::access=info`.
pub const ACCESS_LOG: &str = "protobalance::access";

/// What every connection task shares.
pub struct DataPlane {
    pub snapshot: ArcSwap<Snapshot>,
    /// Cancelled when the shutdown grace period ends: open connections are cut.
    pub cut_all: CancellationToken,
    pub connections: TaskTracker,
}

/// Binds a listening socket with the options a server wants.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt per listener instead of one per client.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Accepts clients of `service` on `listener` until `stop` is cancelled.
pub async fn accept_loop(listener: TcpListener, service: Arc<str>, plane: Arc<DataPlane>, stop: CancellationToken) {
    let local = listener.local_addr().ok();
    // Each listener has one port: the port clients reached us on, which a node
    // address without a port forwards to.
    let local_port = local.map_or(0, |a| a.port());
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                #[cfg(not(target_os = "linux"))]
                let _ = client.set_nodelay(true);
                let plane2 = plane.clone();
                let service = service.clone();
                plane.connections.spawn(async move {
                    serve_client(client, peer, local_port, &service, &plane2).await;
                });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the
                // pending client stays in the backlog until descriptors free up.
                warn!(service = %service, "accept failed: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    debug!(service = %service, "listener on {local:?} closed");
}

/// How a connection ended, for the access log.
fn ending(result: &Result<(), PumpError>) -> String {
    match result {
        Ok(_) => "closed".to_string(),
        Err(e) => format!("{} error: {}", e.side.name(), e.error),
    }
}

/// Counts one connection's bytes into its node's figures as they flow, and
/// keeps the connection's own totals for the access log.
struct ConnectionBytes<'a> {
    node: &'a NodeFigures,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl pump::Counter for ConnectionBytes<'_> {
    fn bytes_in(&self, n: u64) {
        self.node.add_bytes_in(n);
        self.bytes_in.fetch_add(n, Relaxed);
    }
    fn bytes_out(&self, n: u64) {
        self.node.add_bytes_out(n);
        self.bytes_out.fetch_add(n, Relaxed);
    }
}

/// One client, from the choice of node to the access log line.
async fn serve_client(client: TcpStream, peer: SocketAddr, local_port: u16, service: &str, plane: &DataPlane) {
    let started = Instant::now();
    let (service_figures, cluster, forwarding) = {
        let snapshot = plane.snapshot.load();
        let Some((s, c)) = snapshot.cluster_of(service) else {
            debug!(service, "service no longer configured; closing {peer}");
            return;
        };
        (s.figures.clone(), c.clone(), snapshot.forwarding)
    };
    let _in_service = service_figures.accept();

    let mut connected = None;
    for i in Candidates::new(&cluster.nodes, cluster.pick(peer.ip())) {
        let node = &cluster.nodes[i];
        let target = node.address.target(local_port);
        match connect(target, cluster.connect_timeout).await {
            Ok(stream) => {
                connected = Some((i, stream));
                break;
            }
            Err(e) => {
                node.figures.count_connect_failure();
                warn!(service, cluster = %cluster.name, node = %node.name, "connect to {target} failed: {e}; trying the next node");
            }
        }
    }
    let Some((i, upstream)) = connected else {
        service_figures.count_no_node();
        warn!(service, cluster = %cluster.name, "no node could take client {peer}; closing it");
        return;
    };
    let node = &cluster.nodes[i];
    let _in_node = node.figures.open_connection();

    let bytes = ConnectionBytes {
        node: &node.figures,
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
    };
    let result = tokio::select! {
        r = pump::pump(&client, &upstream, forwarding, &bytes) => r,
        _ = plane.cut_all.cancelled() => Err(PumpError { side: Side::Balancer, error: io::Error::other("cut at shutdown") }),
    };
    info!(
        target: ACCESS_LOG,
        "{peer} service={service} cluster={} node={} in={} out={} ms={} end=\"{}\"",
        cluster.name,
        node.name,
        bytes.bytes_in.into_inner(),
        bytes.bytes_out.into_inner(),
        started.elapsed().as_millis(),
        ending(&result),
    );
}

/// Connects to a node within `timeout`, with TCP_NODELAY set.
async fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_clients_inherit_tcp_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
/// What an idle connection costs is mostly its task: this prints the sizes of
/// the futures involved. `cargo test --release --lib future_sizes -- --ignored --nocapture`
#[cfg(test)]
mod future_sizes {
    #[test]
    #[ignore = "a figure to read, not a check: sizes differ between builds"]
    fn future_sizes() {
        let plane = super::DataPlane {
            snapshot: arc_swap::ArcSwap::from_pointee(crate::model::Snapshot {
                forwarding: crate::config::ForwardMode::Auto,
                services: Default::default(),
                clusters: Default::default(),
            }),
            cut_all: Default::default(),
            connections: Default::default(),
        };
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
            let connect = super::connect("127.0.0.1:1".parse().unwrap(), std::time::Duration::from_secs(1));
            println!("connect future: {} bytes", std::mem::size_of_val(&connect));
            let serve = super::serve_client(c, "127.0.0.1:1".parse().unwrap(), 1, "x", &plane);
            println!("serve_client future: {} bytes", std::mem::size_of_val(&serve));
        });
    }
}
