//! The data plane's owner: it starts, holds and stops the worker threads,
//! the listeners and the connection tasks. It carries out what it is told
//! (bind these, open those, close that, stop) and decides nothing about
//! the configuration: that is the control plane's job.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::accept::accept_loop;
use super::admission;
use super::connection::{Accepted, adopted_task};
use super::shared::{Departing, Shared};
use super::workers::{Watch, Workers, bind_group, join_inherited, share_with_neighbours};
use crate::config::{Config, ListenerKey};
use crate::model::{ConnectionState, Live};

/// How the worker threads run; fixed for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSettings {
    /// 0: one per CPU.
    pub threads: usize,
    pub pin_workers: bool,
    pub busy_poll: Option<Duration>,
}

impl WorkerSettings {
    pub fn of(config: &Config) -> WorkerSettings {
        WorkerSettings {
            threads: config.threads,
            pin_workers: config.pin_workers,
            busy_poll: config.busy_poll,
        }
    }
}

/// A listening address that could not be bound; nothing was opened.
#[derive(Debug, thiserror::Error)]
#[error("service \"{service}\": cannot listen on {addr}: {source}")]
pub struct BindError {
    pub service: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Listening sockets this process was handed, used instead of binding anew:
/// by systemd (socket activation: matched by the address they are bound to)
/// or by the process this one upgrades (matched by service and configured
/// address, so a port-0 listener keeps its port).
#[derive(Debug)]
pub struct Inherited {
    /// The listener's key in the process that handed it over, if it says.
    key: Option<ListenerKey>,
    /// One or more sockets of one listening address (an `SO_REUSEPORT` group).
    sockets: Vec<std::net::TcpListener>,
}

impl Inherited {
    /// Sockets matched by the address they are bound to.
    pub fn by_address(sockets: Vec<std::net::TcpListener>) -> Inherited {
        Inherited { key: None, sockets }
    }

    /// Sockets of the listener `key` of the process being upgraded.
    pub fn by_key(key: ListenerKey, sockets: Vec<std::net::TcpListener>) -> Inherited {
        Inherited {
            key: Some(key),
            sockets,
        }
    }

    fn matches(&self, key: &ListenerKey) -> bool {
        match &self.key {
            Some(own) => own == key,
            None => {
                key.addr.port() != 0
                    && self
                        .sockets
                        .first()
                        .and_then(|s| s.local_addr().ok())
                        .is_some_and(|bound| same_address(bound, key.addr))
            }
        }
    }
}

/// Whether a socket bound to `bound` serves the configured `wanted`
/// (an IPv4 listener may be given as `::ffff:a.b.c.d` by the kernel).
fn same_address(bound: SocketAddr, wanted: SocketAddr) -> bool {
    bound.port() == wanted.port() && crate::config::canonical(bound.ip()) == crate::config::canonical(wanted.ip())
}

/// Listening sockets bound but not yet accepting: [`DataPlane::open`] starts
/// them, dropping them closes them.
pub struct Bound(Vec<(ListenerKey, Vec<std::net::TcpListener>)>);

/// A listening socket of a service.
struct Listener {
    service: Arc<str>,
    /// As the file names it (port 0 stays 0): the listener's identity across reloads.
    configured: SocketAddr,
    addr: SocketAddr,
    stop: CancellationToken,
    /// A copy of each socket of the group, to hand over in an upgrade (the
    /// originals belong to the accept loops on the workers).
    sockets: Vec<std::net::TcpListener>,
}

/// The data plane: workers, listeners, connections.
pub struct DataPlane {
    shared: Arc<Shared>,
    workers: Workers,
    listeners: Mutex<Vec<Listener>>,
    /// Handed-over sockets not (yet) used by a listener.
    inherited: Mutex<Vec<Inherited>>,
    /// Spreads adopted connections over the workers in turn.
    next_adopter: AtomicUsize,
    accept_loops: TaskTracker,
}

impl DataPlane {
    /// Starts the worker threads; no listener yet. `inherited`: listening
    /// sockets to use for the addresses they serve instead of binding anew.
    pub fn start(settings: WorkerSettings, live: Arc<Live>, inherited: Vec<Inherited>) -> io::Result<DataPlane> {
        let workers = Workers::start(settings.threads, settings.pin_workers, settings.busy_poll)?;
        Ok(DataPlane {
            shared: Arc::new(Shared::new(live)),
            workers,
            listeners: Mutex::new(Vec::new()),
            inherited: Mutex::new(inherited),
            next_adopter: AtomicUsize::new(0),
            accept_loops: TaskTracker::new(),
        })
    }

    fn listeners(&self) -> MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds every listener named, one socket per worker each, or none: on
    /// the first failure the ones already bound are closed and the error
    /// says which address failed.
    ///
    /// A listener whose address was handed over ([`Inherited`]) takes those
    /// sockets instead; should the bind fail later on, they go back.
    pub fn bind<'a>(&self, keys: impl IntoIterator<Item = &'a ListenerKey>) -> Result<Bound, BindError> {
        let mut bound = Vec::new();
        // Handed-over sockets taken so far, which go back on failure.
        let mut taken = Vec::new();
        for key in keys {
            let group = match self.take_inherited(key) {
                Some(sockets) => {
                    taken.push(key.clone());
                    Ok(join_inherited(sockets, self.workers.count()))
                }
                None => bind_group(key.addr, self.workers.count(), self.workers.steering()),
            };
            match group {
                Ok(group) => bound.push((key.clone(), group)),
                Err(source) => {
                    self.give_back(bound.into_iter().filter(|(k, _)| taken.contains(k)));
                    return Err(BindError {
                        service: key.service.clone(),
                        addr: key.addr,
                        source,
                    });
                }
            }
        }
        Ok(Bound(bound))
    }

    fn take_inherited(&self, key: &ListenerKey) -> Option<Vec<std::net::TcpListener>> {
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        let at = inherited.iter().position(|i| i.matches(key))?;
        Some(inherited.swap_remove(at).sockets)
    }

    /// Keeps handed-over sockets of a bind that failed for a later one.
    fn give_back(&self, bound: impl Iterator<Item = (ListenerKey, Vec<std::net::TcpListener>)>) {
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        for (key, sockets) in bound {
            inherited.push(Inherited::by_key(key, sockets));
        }
    }

    /// Starts the accept loops of each bound listener: each worker accepts
    /// from its own socket of the group and its neighbour's
    /// (`workers::share_with_neighbours`).
    pub fn open(&self, bound: Bound) {
        let mut listeners = self.listeners();
        let steered = self.workers.steering().is_some();
        for (key, group) in bound.0 {
            let addr = group[0].local_addr().expect("a bound listener has an address");
            let service = Arc::<str>::from(key.service.as_str());
            let stop = CancellationToken::new();
            info!(service = %service, "listening on {addr}");
            let sockets = group
                .iter()
                .filter_map(|socket| match socket.try_clone() {
                    Ok(copy) => Some(copy),
                    Err(e) => {
                        warn!(service = %service, "cannot keep a copy of a socket on {addr} for an upgrade: {e}");
                        None
                    }
                })
                .collect();
            for Watch { worker, owner, socket } in share_with_neighbours(group, self.workers.count(), steered) {
                // A neighbour's socket: its owner's load decides when to help.
                let owner_load = (owner != worker).then(|| self.workers.metrics(owner));
                let accept = accept_loop(
                    socket,
                    service.clone(),
                    self.shared.clone(),
                    self.workers.accept_count(worker),
                    stop.clone(),
                    owner_load,
                );
                self.workers.spawn_on(worker, self.accept_loops.track_future(accept));
            }
            listeners.push(Listener {
                service,
                configured: key.addr,
                addr,
                stop,
                sockets,
            });
        }
    }

    /// Stops accepting on the listeners named (connections they accepted go
    /// on); returns the addresses closed.
    pub fn close(&self, keys: &[ListenerKey]) -> Vec<SocketAddr> {
        let mut closed = Vec::new();
        self.listeners().retain(|l| {
            let closing = keys.iter().any(|k| *k.service == *l.service && k.addr == l.configured);
            if closing {
                l.stop.cancel();
                info!(service = %l.service, "closed listener on {}", l.addr);
                closed.push(l.addr);
            }
            !closing
        });
        closed
    }

    /// Every listener's key and a copy of each of its sockets: what an
    /// upgrade hands to the new process.
    pub fn listener_sockets(&self) -> io::Result<Vec<(ListenerKey, Vec<std::net::TcpListener>)>> {
        self.listeners()
            .iter()
            .map(|l| {
                let copies = l.sockets.iter().map(|s| s.try_clone()).collect::<io::Result<_>>()?;
                let key = ListenerKey {
                    service: l.service.to_string(),
                    addr: l.configured,
                };
                Ok((key, copies))
            })
            .collect()
    }

    /// Every listening address, with its service (ports chosen by the kernel resolved).
    pub fn listen_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners()
            .iter()
            .map(|l| (l.service.to_string(), l.addr))
            .collect()
    }

    /// The first listening address of `service`.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        self.listeners().iter().find(|l| &*l.service == service).map(|l| l.addr)
    }

    /// Clients each worker thread has accepted since start.
    pub fn accepted_by_worker(&self) -> Vec<u64> {
        self.workers.accepted()
    }

    /// How many worker threads run.
    pub fn worker_count(&self) -> usize {
        self.workers.count()
    }

    /// Runs `f` once on each worker thread, and returns what each returned,
    /// in worker order (`None` for a worker that has stopped): for what only
    /// a thread can do for itself (setting its capabilities when the process
    /// drops privileges, handing over its allocator's cache).
    pub async fn on_every_worker<T: Send + 'static>(
        &self,
        f: impl Fn() -> T + Send + Sync + 'static,
    ) -> Vec<Option<T>> {
        let f = Arc::new(f);
        let mut answers = Vec::with_capacity(self.workers.count());
        for worker in 0..self.workers.count() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let f = f.clone();
            self.workers.spawn_on(worker, async move {
                let _ = tx.send(f());
            });
            answers.push(rx);
        }
        let mut out = Vec::with_capacity(answers.len());
        for rx in answers {
            out.push(rx.await.ok());
        }
        out
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.shared.connections.len()
    }

    /// Stops accepting on every listener and waits for the accept loops to end.
    pub async fn stop_accepting(&self) {
        for l in self.listeners().iter_mut() {
            l.stop.cancel();
            // The upgrade's copies too (sent already, if one runs): once the
            // accept loops end, nothing holds the sockets and clients are refused.
            l.sockets.clear();
        }
        self.accept_loops.close();
        self.accept_loops.wait().await;
    }

    /// Lets open connections finish for up to `grace`, then cuts the rest.
    /// Returns how many were cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        let connections = &self.shared.connections;
        let open = connections.len();
        if open > 0 {
            info!("stopped accepting; waiting up to {grace:?} for {open} open connection(s)");
        }
        connections.close();
        if tokio::time::timeout(grace, connections.wait()).await.is_ok() {
            return 0;
        }
        let cut = connections.len();
        info!("grace period over: cutting {cut} connection(s)");
        self.shared.cut_all.cancel();
        connections.wait().await;
        cut
    }

    /// Hands every open connection to `out` as soon as nothing of it is in
    /// flight here (see `connection::leave`); connections still here after
    /// `grace` are cut. Call after [`DataPlane::stop_accepting`]. Returns how
    /// many were cut.
    pub async fn hand_over(&self, out: std::sync::mpsc::Sender<Departing>, grace: Duration) -> usize {
        let shared = &self.shared;
        *shared.hand_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
        shared.handing_over.store(true, std::sync::atomic::Ordering::Relaxed);
        let open = shared.connections.len();
        info!("handing over {open} open connection(s)");
        shared.connections.close();
        shared.cut_all.cancel();
        let cut = if tokio::time::timeout(grace, shared.connections.wait()).await.is_ok() {
            0
        } else {
            let cut = shared.connections.len();
            warn!("grace period over: cutting the {cut} connection(s) that could not be handed over");
            shared.cut_now.cancel();
            shared.connections.wait().await;
            cut
        };
        // Ends the sender's last copy: whoever forwards `out` sees the end.
        *shared.hand_over.lock().unwrap_or_else(|p| p.into_inner()) = None;
        cut
    }

    /// Takes over a connection another process handed over: its task starts
    /// forwarding on a worker, where the other process left it.
    pub fn adopt(&self, state: ConnectionState, client: OwnedFd, node: OwnedFd) {
        let worker = self.next_adopter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.workers.count();
        let shared = self.shared.clone();
        let (client, node) = (std::net::TcpStream::from(client), std::net::TcpStream::from(node));
        let task = async move {
            let client = match client
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(client))
            {
                Ok(c) => c,
                Err(e) => {
                    warn!(service = %state.service, "cannot adopt the connection of {}: {e}", state.client);
                    return;
                }
            };
            let (admitted, node_index) = admission::adopt(&shared, &state);
            let accepted = Accepted {
                client,
                peer: state.client,
                // Its node had its PROXY header long ago.
                to: None,
                local_port: state.local_port,
                service: state.service.as_str().into(),
                admitted,
                cut: shared.cut_all.child_token(),
                shared,
                sni: None,
            };
            adopted_task(accepted, node_index, node, state).await;
        };
        self.workers
            .spawn_on(worker, self.shared.connections.track_future(task));
    }

    /// Stops the worker threads (each hands over its batched access-log lines as it ends).
    pub async fn stop_workers(&self) {
        self.workers.stop().await;
    }
}

/// Warns about each `socket_buffer` larger than the kernel grants an
/// unprivileged `setsockopt` (`net.core.rmem_max` / `wmem_max`): Linux caps
/// it there without an error, and an operator who asked for more should
/// know. Reads the two limits only when some `socket_buffer` is set (a start
/// without one pays nothing), and says nothing where they cannot be read.
pub fn warn_capped_socket_buffers(config: &Config) {
    let sized = socket_buffers(config);
    if sized.is_empty() {
        return;
    }
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
    };
    if let (Some(rmem_max), Some(wmem_max)) = (read("rmem_max"), read("wmem_max")) {
        for message in capped_socket_buffers(&sized, rmem_max, wmem_max) {
            warn!("{message}");
        }
    }
}

/// Every `socket_buffer` of `config`: who sets it, and the size in bytes.
fn socket_buffers(config: &Config) -> Vec<(String, usize)> {
    let services = config
        .services
        .iter()
        .map(|s| (format!("service \"{}\"", s.name), s.limits.socket_buffer));
    let clusters = config
        .clusters
        .iter()
        .map(|c| (format!("cluster \"{}\"", c.name), c.socket_buffer));
    services
        .chain(clusters)
        .filter_map(|(owner, size)| Some((owner, size?.bytes())))
        .collect()
}

/// The sizes of `sized` above `rmem_max` or `wmem_max`, each described for the log.
fn capped_socket_buffers(sized: &[(String, usize)], rmem_max: usize, wmem_max: usize) -> Vec<String> {
    sized
        .iter()
        .filter(|(_, size)| *size > rmem_max.min(wmem_max))
        .map(|(owner, size)| {
            format!(
                "{owner}: socket_buffer = {size} bytes is above net.core.rmem_max ({rmem_max}) or \
                 net.core.wmem_max ({wmem_max}); Linux caps each buffer at its maximum: raise them \
                 for the full size"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A data plane of 2 workers for a forwarding config (not yet listening).
    fn two_workers() -> (Config, DataPlane) {
        let config = Config::forward("127.0.0.1:0", &["127.0.0.1:1".to_string()]).unwrap();
        let live = Live::new(crate::balance::compile(&config, None), Default::default());
        let settings = WorkerSettings {
            threads: 2,
            pin_workers: false,
            busy_poll: None,
        };
        let data = DataPlane::start(settings, Arc::new(live), Vec::new()).unwrap();
        (config, data)
    }

    #[tokio::test]
    async fn each_worker_runs_the_step_and_a_stopped_one_answers_none() {
        let (_, data) = two_workers();
        let ran_on = data.on_every_worker(|| std::thread::current().id()).await;
        assert_eq!(ran_on.len(), 2);
        assert!(ran_on.iter().all(Option::is_some), "{ran_on:?}");
        assert_ne!(ran_on[0], ran_on[1], "one step per worker thread");
        assert!(!ran_on.contains(&Some(std::thread::current().id())));
        data.stop_workers().await;
        let after = data.on_every_worker(|| ()).await;
        assert_eq!(after, [None, None], "a stopped worker runs nothing and says so");
    }

    #[tokio::test]
    async fn clients_left_waiting_by_a_stuck_worker_are_taken_by_its_neighbour() {
        let (config, data) = two_workers();
        // Worker 1 is stuck before its accept loops start: its socket's
        // clients wait there, and it is no busier than worker 0 by its tasks.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let (is_stuck, now_stuck) = std::sync::mpsc::channel::<()>();
        data.workers.spawn_on(1, async move {
            is_stuck.send(()).unwrap();
            let _ = stuck.recv();
        });
        now_stuck.recv().unwrap();
        data.open(data.bind(&crate::config::listeners(&config)).unwrap());
        let addr = data.listen_addrs()[0].1;
        // The kernel's hash queues about half of them on worker 1's socket
        // (none of 24: a chance of 6 in 100,000,000).
        let clients: Vec<std::net::TcpStream> = (0..24).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        // A bound for a broken build, not a synchronisation: the counts are polled.
        let deadline = Instant::now() + Duration::from_secs(10);
        while data.accepted_by_worker()[0] < 24 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            data.accepted_by_worker(),
            [24, 0],
            "worker 0 took its own clients and the stuck one's"
        );
        release.send(()).unwrap();
        drop(clients);
        data.stop_workers().await;
    }

    #[test]
    fn socket_buffers_above_the_kernel_maximum_are_named() {
        let config = Config::parse(
            "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"a\"\nsocket_buffer = \"1m\"\n\
             [[cluster]]\nname = \"a\"\nsocket_buffer = \"128k\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n\
             [[cluster]]\nname = \"b\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n",
            "t",
        )
        .unwrap();
        let sized = socket_buffers(&config);
        assert_eq!(sized.len(), 2, "the service and cluster a set one; b does not");
        // Debian's defaults: 208 KiB each.
        let capped = capped_socket_buffers(&sized, 212_992, 212_992);
        assert_eq!(capped.len(), 1, "{capped:?}");
        assert!(
            capped[0].starts_with("service \"web\": socket_buffer = 1048576 bytes is above net.core.rmem_max (212992)"),
            "{}",
            capped[0]
        );
        assert!(capped_socket_buffers(&sized, 4 << 20, 4 << 20).is_empty());
        assert_eq!(
            capped_socket_buffers(&sized, 4 << 20, 100_000).len(),
            2,
            "wmem_max counts too"
        );
    }
}
