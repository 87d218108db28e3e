//! The running balancer, wired together: the data plane (workers, listeners,
//! connections), the control plane's owner (`control::Control`), the
//! background tasks (probes, agents, the rate sampler, the pin flusher, the
//! admin API) under one tracker and one stop token, the order in which all
//! of it stops, and the upgrade in place that hands it to a new process
//! (`upgrade`). The binary and the tests both start it through
//! [`Server::start`]. It decides nothing itself: changes go to `Control`,
//! bytes to `proxy`, and what privileges to keep is `control::privileges`'s
//! (this module's `privileges` only makes the system calls).

mod memory;
mod privileges;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::affinity::{self, Affinity};
use crate::config::{AdminListen, Config, NodeState};
use crate::control::Control;
pub use crate::control::{ControlError, ReloadReport};
use crate::model::{Live, Snapshot, WallClock};
use crate::proxy::{BindError, DataPlane, Inherited, WorkerSettings};

mod upgrade;

pub use memory::release_mapped_pages;
pub use upgrade::{Predecessor, Successor, UpgradeError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("admin API: cannot listen on {addr}: {source}")]
    AdminBind { addr: AdminListen, source: io::Error },
    #[error("cannot start the worker threads: {0}")]
    Workers(io::Error),
    #[error("cannot drop privileges: {0}")]
    Privileges(io::Error),
    #[error("{0}")]
    Transparent(String),
}

/// What a start may choose besides the config.
#[derive(Debug, Default)]
pub struct Options {
    /// The clock client pins age by (tests move a manual one).
    pub wall_clock: WallClock,
    /// Listening sockets handed to this process (socket activation, an
    /// upgrade), used for the listen addresses they serve.
    pub inherited: Vec<Inherited>,
}

/// A handle on the running balancer. Clones share it.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    control: Control,
    data: Arc<DataPlane>,
    affinity: Arc<Affinity>,
    /// Every background task: probes, agents, sampler, pin flusher, admin API.
    tasks: TaskTracker,
    /// Cancelled once the connections are done: every background task stops.
    stop: CancellationToken,
    /// Stops the admin API alone (a child of `stop`): an upgrade's old
    /// process stops taking admin requests as soon as the new one serves them.
    admin_stop: CancellationToken,
    /// A copy of the admin API's socket, for an upgrade to hand over.
    admin_socket: std::sync::Mutex<Option<crate::admin::AdminHandOff>>,
    /// Set while an upgrade runs: a second one is refused.
    upgrading: std::sync::atomic::AtomicBool,
}

impl Server {
    /// Starts the worker threads (`config.threads`), binds every listener of
    /// `config` and starts accepting. Fails, having started nothing, if any
    /// address cannot be bound. The background tasks (probes, agents, the
    /// rate sampler, the pin flusher) run on the caller's runtime.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        Server::start_with(config, Options::default()).await
    }

    /// As [`Server::start`], with `options`.
    pub async fn start_with(config: &Config, options: Options) -> Result<Server, StartError> {
        crate::proxy::warn_capped_socket_buffers(config);
        crate::proxy::identity::transparent_is_possible(config).map_err(StartError::Transparent)?;
        let affinity = {
            let (dir, config, clock) = (config.state_dir.clone(), config.clone(), options.wall_clock.clone());
            tokio::task::spawn_blocking(move || Affinity::open(&dir, &config, affinity::MAX_PINS_PER_CLUSTER, clock))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!("opening the affinity store failed ({e}); keeping pins in memory only");
                    Affinity::in_memory()
                })
        };
        let affinity = Arc::new(affinity);
        let live = Arc::new(Live::new(
            crate::balance::compile(config, None),
            affinity.pins().clone(),
        ));
        let data = Arc::new(
            DataPlane::start(WorkerSettings::of(config), live.clone(), options.inherited)
                .map_err(StartError::Workers)?,
        );
        let bound = data.bind(&crate::config::listeners(config))?;
        let stop = CancellationToken::new();
        let server = Server {
            shared: Arc::new(Shared {
                control: Control::new(config.clone(), live.clone(), data.clone()),
                data,
                affinity: affinity.clone(),
                tasks: TaskTracker::new(),
                admin_stop: stop.child_token(),
                stop,
                admin_socket: std::sync::Mutex::new(None),
                upgrading: Default::default(),
            }),
        };
        let (tasks, stop) = (&server.shared.tasks, &server.shared.stop);
        tasks.spawn(crate::model::rates::sample_forever(live.clone(), stop.clone()));
        tasks.spawn(crate::health::agent::poll_forever(live.clone(), stop.clone()));
        tasks.spawn(crate::health::check::run(live.clone(), stop.clone()));
        tasks.spawn(crate::health::slow_start::run(live.clone(), stop.clone()));
        tasks.spawn(crate::health::probe::run(live, stop.clone()));
        tasks.spawn(affinity::run_flusher(affinity, stop.clone()));
        tasks.spawn(memory::trim_after_load(server.shared.data.clone(), stop.clone()));
        tasks.spawn(server.shared.control.clone().enforce_drain_deadlines(stop.clone()));
        tasks.spawn(crate::dns::follow(server.shared.control.clone(), stop.clone()));
        if let Some(shared) = &config.shared
            && let Some(store) = crate::shared::start(shared, server.shared.control.clone(), stop.clone())
        {
            tasks.spawn(store);
        }
        server.shared.data.open(bound);
        Ok(server)
    }

    /// Starts the admin API on the config's `[admin] listen` and returns the
    /// bound address (`IP:PORT`, or `unix:PATH`). It stops with the other
    /// background tasks. A Unix socket belongs to `user` and `group` when
    /// the config names them.
    pub async fn start_admin(&self) -> Result<AdminListen, StartError> {
        let file = self.shared.control.state().file;
        let addr = file.admin.listen.clone();
        let owner = file.run_as.as_ref().map(|r| (r.uid, r.gid));
        let failed = |source| StartError::AdminBind {
            addr: addr.clone(),
            source,
        };
        let listener = crate::admin::AdminListener::bind(&addr, file.admin.socket_mode, owner)
            .await
            .map_err(failed)?;
        self.serve_admin(listener, &addr)
    }

    /// Starts the admin API on `listener` (bound here, or handed over by an
    /// upgrade), configured as `addr`.
    fn serve_admin(
        &self,
        listener: crate::admin::AdminListener,
        addr: &AdminListen,
    ) -> Result<AdminListen, StartError> {
        let failed = |source| StartError::AdminBind {
            addr: addr.clone(),
            source,
        };
        let bound = listener.bound().map_err(failed)?;
        *self.shared.admin_socket.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(listener.hand_off().map_err(failed)?);
        self.shared.control.note_admin_bound(bound.clone());
        info!("admin listening on {bound}");
        self.shared.tasks.spawn(crate::admin::serve(
            listener,
            self.shared.control.clone(),
            self.shared.admin_stop.clone(),
        ));
        Ok(bound)
    }

    /// With `user` in the config, becomes that user, its group and its
    /// supplementary groups, keeping only the capabilities the config needs
    /// (`control::privileges`) and setting `PR_SET_NO_NEW_PRIVS`. Call it
    /// once every listener, the admin socket and the state files are open
    /// (after [`Server::start_admin`]); a reload then refuses a file that
    /// needs a capability dropped here. Without `user`, does nothing.
    pub async fn drop_privileges(&self) -> Result<(), StartError> {
        use crate::control::privileges::needed;
        let file = self.shared.control.state().file;
        let Some(run_as) = &file.run_as else {
            return Ok(());
        };
        let start = privileges::unprivileged_port_start();
        let keep: crate::control::privileges::Privileges = needed(&file, &crate::config::listeners(&file), start)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && euid == run_as.uid {
            // Already this user: started by an upgrade of a process that
            // dropped, or by a service manager. Nothing to drop; it may do
            // what the capabilities it holds allow.
            let held: crate::control::privileges::Privileges =
                keep.into_iter().filter(|p| privileges::holds(*p)).collect();
            info!("running as user {} already", run_as.user);
            self.shared.control.note_dropped(crate::control::Dropped {
                user: run_as.user.clone(),
                kept: held,
                unprivileged_port_start: start,
            });
            return Ok(());
        }
        let caps = privileges::capabilities(&keep);
        let on_workers = |step: fn(&caps::CapsHashSet) -> io::Result<()>| {
            let caps = caps.clone();
            self.shared.data.on_every_worker(move || step(&caps))
        };
        for done in on_workers(privileges::prepare_thread).await {
            done.unwrap_or_else(worker_stopped).map_err(StartError::Privileges)?;
        }
        // No await from here to the change of user: a thread this one
        // started meanwhile (the blocking pool's) would inherit its
        // "keep capabilities" and keep them.
        privileges::prepare_thread(&caps).map_err(StartError::Privileges)?;
        privileges::become_user(run_as).map_err(StartError::Privileges)?;
        privileges::finish_thread(&caps).map_err(StartError::Privileges)?;
        for done in on_workers(privileges::finish_thread).await {
            done.unwrap_or_else(worker_stopped).map_err(StartError::Privileges)?;
        }
        let kept: Vec<String> = keep.iter().map(ToString::to_string).collect();
        info!(
            "running as user {} (uid {}), group {} (gid {}); capabilities kept: {}",
            run_as.user,
            run_as.uid,
            run_as.group,
            run_as.gid,
            if kept.is_empty() {
                "none".to_string()
            } else {
                kept.join(", ")
            }
        );
        self.shared.control.note_dropped(crate::control::Dropped {
            user: run_as.user.clone(),
            kept: keep,
            unprivileged_port_start: start,
        });
        Ok(())
    }

    /// The control plane: state changes and reloads.
    pub fn control(&self) -> &Control {
        &self.shared.control
    }

    /// The run-time redirects in force: service → the file's cluster it overrides.
    pub fn redirects(&self) -> BTreeMap<String, String> {
        self.shared.control.redirects()
    }

    /// Remembers the file that [`Server::reload`] re-reads.
    pub fn set_config_path(&self, path: PathBuf) {
        self.shared.control.set_config_path(path);
    }

    /// The admin token in force now (a reload may change it).
    pub fn admin_token(&self) -> Option<String> {
        self.shared.control.admin_token()
    }

    /// Every listening address, with its service (ports chosen by the kernel resolved).
    pub fn listen_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.shared.data.listen_addrs()
    }

    /// The first listening address of `service`.
    pub fn addr_of(&self, service: &str) -> Option<SocketAddr> {
        self.shared.data.addr_of(service)
    }

    /// The snapshot the data plane uses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.control.snapshot()
    }

    /// Clients each worker thread has accepted since start.
    pub fn accepted_by_worker(&self) -> Vec<u64> {
        self.shared.data.accepted_by_worker()
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.shared.data.open_connections()
    }

    /// Sets a node's state (see `Control::set_node_state`).
    pub fn set_node_state(&self, cluster: &str, node: &str, state: NodeState) -> Result<(), ControlError> {
        self.shared.control.set_node_state(cluster, node, state)
    }

    /// Drains a node, red after `deadline` (see `Control::drain_until`).
    pub fn drain_until(&self, cluster: &str, node: &str, deadline: std::time::Duration) -> Result<(), ControlError> {
        self.shared.control.drain_until(cluster, node, deadline)
    }

    /// The client pins of every cluster, and their file.
    pub fn affinity(&self) -> &Affinity {
        &self.shared.affinity
    }

    /// Moves `service`'s new connections to `cluster` (see `Control::set_service_cluster`).
    pub async fn set_service_cluster(&self, service: &str, cluster: &str) -> Result<(), ControlError> {
        self.shared.control.set_service_cluster(service, cluster)
    }

    /// Re-reads the config file (SIGHUP, `POST /api/v1/reload`).
    pub async fn reload(&self) -> Result<ReloadReport, ControlError> {
        self.shared.control.reload().await
    }

    /// Stops accepting, lets open connections finish for up to `grace`, then
    /// cuts the rest; then stops every background task (the pin flusher
    /// writes the pins of the connections just ended) and waits for them.
    /// Returns how many connections were cut.
    pub async fn shutdown(self, grace: Duration) -> usize {
        // An upgrade given up on may have left the pin file lent.
        self.shared.affinity.take_back();
        let data = &self.shared.data;
        data.stop_accepting().await;
        let cut = data.drain(grace).await;
        self.stop_tasks_and_workers().await;
        cut
    }

    /// Stops every background task (the pin flusher writes the pins of the
    /// connections just ended), waits for them, then stops the workers.
    async fn stop_tasks_and_workers(&self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        // Last: a worker hands over its batched access-log lines as it ends.
        self.shared.data.stop_workers().await;
    }
}

/// What a worker thread that has stopped did of a step of the privilege drop.
fn worker_stopped() -> io::Result<()> {
    Err(io::Error::other("a worker thread has stopped"))
}
