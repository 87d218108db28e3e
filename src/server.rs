//! The running balancer: owns the published snapshot, the listeners and the
//! connection tasks, and knows how to stop them. The binary and the tests
//! both start it through [`Server::start`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::Config;
use crate::model::Snapshot;
use crate::proxy::{self, DataPlane};

/// A listening socket of a service.
struct Listener {
    service: Arc<str>,
    addr: SocketAddr,
    stop: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("service \"{service}\": cannot listen on {addr}: {source}")]
    Bind {
        service: String,
        addr: SocketAddr,
        source: io::Error,
    },
}

pub struct Server {
    plane: Arc<DataPlane>,
    listeners: Vec<Listener>,
    accept_loops: TaskTracker,
}

impl Server {
    /// Binds every listener of `config` and starts accepting. Fails, having
    /// started nothing, if any address cannot be bound.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let plane = Arc::new(DataPlane {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None)),
            cut_all: CancellationToken::new(),
            connections: TaskTracker::new(),
            open_clients: Default::default(),
        });
        let mut bound = Vec::new();
        for service in &config.services {
            for addr in service.listen.iter().flat_map(|l| l.addrs()) {
                let listener = proxy::bind(addr).map_err(|source| StartError::Bind {
                    service: service.name.clone(),
                    addr,
                    source,
                })?;
                bound.push((Arc::<str>::from(service.name.as_str()), listener));
            }
        }
        tokio::spawn(crate::rates::sample_forever(Arc::downgrade(&plane)));
        tokio::spawn(crate::health::agent::poll_forever(Arc::downgrade(&plane)));
        let accept_loops = TaskTracker::new();
        let mut listeners = Vec::with_capacity(bound.len());
        for (service, listener) in bound {
            let addr = listener.local_addr().expect("a bound listener has an address");
            let stop = CancellationToken::new();
            info!(service = %service, "listening on {addr}");
            accept_loops.spawn(proxy::accept_loop(
                listener,
                service.clone(),
                plane.clone(),
                stop.clone(),
            ));
            listeners.push(Listener { service, addr, stop });
        }
        Ok(Server {
            plane,
            listeners,
            accept_loops,
        })
    }

    /// Every listening address, with its service (ports chosen by the kernel resolved).
    pub fn listen_addrs(&self) -> Vec<(&str, SocketAddr)> {
        self.listeners.iter().map(|l| (&*l.service, l.addr)).collect()
    }

    /// The first listening address of `service`.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| &*l.service == service).map(|l| l.addr)
    }

    /// The snapshot the data plane uses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.plane.snapshot.load_full()
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.plane.connections.len()
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// cuts the rest. Returns how many were cut.
    pub async fn shutdown(self, grace: Duration) -> usize {
        for l in &self.listeners {
            l.stop.cancel();
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
        let open = self.plane.connections.len();
        if open > 0 {
            info!("stopped accepting; waiting up to {grace:?} for {open} open connection(s)");
        }
        self.plane.connections.close();
        if tokio::time::timeout(grace, self.plane.connections.wait()).await.is_ok() {
            return 0;
        }
        let cut = self.plane.connections.len();
        info!("grace period over: cutting {cut} connection(s)");
        self.plane.cut_all.cancel();
        self.plane.connections.wait().await;
        cut
    }
}
