//! Upgrade in place: the running process starts the executable at its own
//! path (as that file is on disk now) with the same arguments, hands it its
//! listening sockets, its run-time state and, once it is ready, its pins and
//! established connections, then exits. The wire is `control::handover`.
//!
//! The old process's side: [`Server::upgrade`] (start the new one, hand over
//! the state, wait up to [`READY_TIMEOUT`] for it to be ready; on any
//! failure the new process is stopped and this one serves on as before),
//! then [`Server::retire`]. The new process's side: [`Predecessor::receive`]
//! before it starts, then [`Server::take_over`].
//!
//! Order matters:
//! 1. the old process lends its pin file (flushed and closed) before the new
//!    one starts, so that the new one opens it and loads every pin;
//! 2. the old process keeps accepting until the new one says it is ready,
//!    so no client waits on a process that is still starting; both accept
//!    from the same sockets meanwhile, and a client queued in a socket is
//!    taken by whichever accepts first;
//! 3. only then does the old one stop accepting, send the pins it made in
//!    between, and hand over or finish its connections.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use tracing::{info, warn};

use super::{Server, StartError};
use crate::config::AdminListen;
use crate::control::Overrides;
use crate::control::handover::{CHANNEL_ENV, Channel, Message, NodeRecord, PinRecord, VERSION};
use crate::model::Pin;
use crate::proxy::{DataPlane, Departing, Inherited};

/// How long the new process has to report ready before the old one gives up on it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pins per hand-over record.
const PINS_PER_RECORD: usize = 1000;

/// Why an upgrade did not happen; the running process serves on, unchanged.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already running")]
    Busy,
    #[error("cannot find this executable on disk: {0}")]
    Executable(io::Error),
    #[error("cannot start {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("the new process could not start: {0}")]
    Failed(String),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process was not ready within {READY_TIMEOUT:?}")]
    Timeout,
    #[error("the hand-over to the new process failed: {0}")]
    Channel(io::Error),
    #[error("the new process answered out of turn: {0}")]
    Protocol(String),
}

/// The new process, ready and serving: what [`Server::retire`] finishes with.
pub struct Successor {
    channel: Channel,
    pub pid: u32,
    /// Never waited for: it outlives this process.
    _child: Child,
    /// The node counters handed over with the state: what this process
    /// counts after them goes over at the end.
    counted: Vec<NodeRecord>,
}

/// What the process this one replaces handed over before it started.
pub struct Predecessor {
    channel: Channel,
    pid: u32,
    listeners: Vec<Inherited>,
    /// The admin API's socket and where it listens.
    admin: Option<(OwnedFd, AdminListen)>,
    overrides: Overrides,
    figures: Vec<NodeRecord>,
}

impl Server {
    /// Starts the new process and hands it the listeners and the state; once
    /// it reports ready, returns it. On failure the new process is stopped,
    /// the pin file is taken back, and this process serves on.
    pub async fn upgrade(&self) -> Result<Successor, UpgradeError> {
        if self.shared.upgrading.swap(true, SeqCst) {
            return Err(UpgradeError::Busy);
        }
        let result = self.start_successor().await;
        if let Err(e) = &result {
            warn!("upgrade failed, still serving: {e}");
            self.admin_handed_over(false);
            self.shared.affinity.take_back();
            self.shared.upgrading.store(false, SeqCst);
        }
        result
    }

    async fn start_successor(&self) -> Result<Successor, UpgradeError> {
        let exe = executable_on_disk().map_err(UpgradeError::Executable)?;
        let counted = self.node_records();
        let state = self.state_records(&counted).map_err(UpgradeError::Channel)?;
        let affinity = self.shared.affinity.clone();
        // Before the new process starts: it must find the pin file free.
        let _ = tokio::task::spawn_blocking(move || affinity.lend()).await;
        self.admin_handed_over(true);
        let (channel, theirs) = Channel::pair().map_err(UpgradeError::Channel)?;
        let mut child = Starting(Some(spawn(&exe, theirs)?));
        info!(pid = child.id(), "upgrade: started {}", exe.display());
        let handing = tokio::task::spawn_blocking(move || {
            let sent = send_all(&channel, &state).and_then(|()| channel.set_recv_timeout(Some(READY_TIMEOUT)));
            let answer = sent.and_then(|()| channel.recv());
            (channel, answer)
        });
        let (channel, answer) = handing
            .await
            .map_err(|e| UpgradeError::Channel(io::Error::other(e.to_string())))?;
        match answer {
            Ok(Some((Message::Ready { pid }, _))) => {
                let _ = channel.set_recv_timeout(None);
                info!(pid, "upgrade: the new process serves");
                Ok(Successor {
                    channel,
                    pid,
                    _child: child.serves(),
                    counted,
                })
            }
            Ok(Some((Message::Failed { reason }, _))) => Err(UpgradeError::Failed(reason)),
            Ok(Some((other, _))) => Err(UpgradeError::Protocol(format!("{other:?}"))),
            Ok(None) => Err(UpgradeError::Exited(child.exit_status())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(UpgradeError::Timeout)
            }
            // The new process exiting at once breaks the hand-over while it is sent.
            Err(e) => match child.exited_soon() {
                Some(status) => Err(UpgradeError::Exited(status)),
                None => Err(UpgradeError::Channel(e)),
            },
        }
    }

    /// The admin socket's file (a Unix socket) is, or is no longer, the new process's.
    fn admin_handed_over(&self, yes: bool) {
        if let Some(admin) = &*self.shared.admin_socket.lock().unwrap_or_else(|p| p.into_inner()) {
            admin.set_handed_over(yes);
        }
    }

    /// Every node's identity and counters now.
    fn node_records(&self) -> Vec<NodeRecord> {
        let snapshot = self.snapshot();
        let mut records = Vec::new();
        for cluster in snapshot.clusters.values() {
            for node in &cluster.nodes {
                records.push(NodeRecord {
                    cluster: cluster.name.clone(),
                    node: node.name.clone(),
                    address: node.address_text.clone(),
                    counters: node.figures.counters(),
                    available: node.figures.is_available(),
                });
            }
        }
        records
    }

    /// Everything the new process needs before it starts, with the
    /// descriptors that go with each record.
    fn state_records(&self, nodes: &[NodeRecord]) -> io::Result<Vec<(Message, Vec<OwnedFd>)>> {
        let mut records = vec![(
            Message::Hello {
                version: VERSION,
                pid: std::process::id(),
            },
            Vec::new(),
        )];
        if let Some(admin) = &*self.shared.admin_socket.lock().unwrap_or_else(|p| p.into_inner()) {
            let listen = admin.listen.to_string();
            records.push((Message::Admin { listen }, vec![admin.socket.try_clone()?]));
        }
        for (key, sockets) in self.shared.data.listener_sockets()? {
            let message = Message::Listener {
                service: key.service,
                configured: key.addr,
                sockets: sockets.len(),
            };
            records.push((message, sockets.into_iter().map(OwnedFd::from).collect()));
        }
        let overrides = self.shared.control.state().overrides;
        records.push((
            Message::Overrides {
                node_states: overrides
                    .node_states
                    .into_iter()
                    .map(|((c, n), state)| (c, n, state))
                    .collect(),
                redirects: overrides.redirects.into_iter().collect(),
            },
            Vec::new(),
        ));
        for record in nodes {
            records.push((Message::Figures(record.clone()), Vec::new()));
        }
        records.push((Message::StateDone, Vec::new()));
        Ok(records)
    }

    /// After [`Server::upgrade`]: stops taking clients and admin requests,
    /// hands over the pins made meanwhile and every open connection, each
    /// once nothing of it is in flight here; after `grace` the connections
    /// still here are cut. Then stops everything. Returns how many were cut.
    pub async fn retire(self, successor: Successor, grace: Duration) -> usize {
        self.shared.admin_stop.cancel();
        self.shared.data.stop_accepting().await;
        info!(
            pid = successor.pid,
            "upgrade: stopped accepting; the new process takes every new client"
        );
        let pins = pin_records(&self.shared.affinity.pins().take_dirty());
        let (out, departing) = std::sync::mpsc::channel::<Departing>();
        let Successor { channel, counted, .. } = successor;
        // The channel's own thread: records go out in the order they come.
        let sender = std::thread::Builder::new()
            .name("protobalance-up".into())
            .spawn(move || send_departures(&channel, &pins, &departing).map(|handed| (channel, handed)));
        let cut = self.shared.data.hand_over(out, grace).await;
        match sender.map(|t| t.join()) {
            Ok(Ok(Ok((channel, handed)))) => {
                info!("upgrade: handed over {handed} connection(s)");
                // What was counted here since the state went over: the totals go on there.
                let since = counted_since(&counted, &self.node_records());
                let done = since
                    .into_iter()
                    .try_for_each(|r| channel.send(&Message::Figures(r), &[]))
                    .and_then(|()| channel.send(&Message::Done { cut }, &[]));
                if let Err(e) = done {
                    warn!("upgrade: cannot tell the new process the hand-over is done: {e}");
                }
            }
            Ok(Ok(Err(e))) => warn!("upgrade: the hand-over broke off: {e}"),
            Ok(Err(_)) | Err(_) => warn!("upgrade: the hand-over's thread stopped"),
        }
        self.stop_tasks_and_workers().await;
        if cut > 0 {
            warn!("upgrade: {cut} connection(s) cut at the end of the grace period");
        }
        cut
    }

    /// In the new process, once started on the predecessor's listeners:
    /// takes over its run-time overrides and its nodes' counters, serves the
    /// admin API on its socket, and tells it this process is ready; then
    /// takes the pins it sends until it is done.
    pub async fn take_over(&self, predecessor: Predecessor) -> Result<AdminListen, StartError> {
        let Predecessor {
            channel,
            pid,
            admin,
            overrides,
            figures,
            ..
        } = predecessor;
        self.shared.control.adopt_overrides(overrides);
        let snapshot = self.snapshot();
        for record in &figures {
            let node = snapshot
                .clusters
                .get(&record.cluster)
                .and_then(|c| c.node(&record.node));
            if let Some(node) = node.filter(|n| n.address_text == record.address) {
                node.figures.carry_on(&record.counters);
                node.figures.mark_available(record.available);
            }
        }
        let admin = match admin {
            Some((socket, listen)) => {
                let listener =
                    crate::admin::AdminListener::adopt(socket, &listen).map_err(|source| StartError::AdminBind {
                        addr: listen.clone(),
                        source,
                    })?;
                self.serve_admin(listener, &listen)?
            }
            None => self.start_admin().await?,
        };
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        channel.send(&ready, &[]).map_err(|source| StartError::AdminBind {
            addr: admin.clone(),
            source,
        })?;
        info!(predecessor = pid, "upgrade: took over from process {pid}");
        let live = self.shared.control.live().clone();
        let data = self.shared.data.clone();
        self.shared.tasks.spawn(async move {
            let received = tokio::task::spawn_blocking(move || receive_rest(&channel, &live, &data)).await;
            match received {
                Ok(Ok(cut)) => {
                    info!("upgrade complete: the old process cut {cut} connection(s) it could not hand over")
                }
                Ok(Err(e)) => warn!("upgrade: the old process's hand-over ended early: {e}"),
                Err(e) => warn!("upgrade: the hand-over stopped: {e}"),
            }
        });
        Ok(admin)
    }
}

impl Predecessor {
    /// Reads what the old process hands over before this one starts, up to
    /// its end of state. Blocking.
    pub fn receive(channel: Channel) -> Result<Predecessor, String> {
        let mut predecessor = Predecessor {
            channel,
            pid: 0,
            listeners: Vec::new(),
            admin: None,
            overrides: Overrides::default(),
            figures: Vec::new(),
        };
        loop {
            let (message, fds) = match predecessor.channel.recv() {
                Ok(Some(received)) => received,
                Ok(None) => return Err("the old process closed the hand-over".into()),
                Err(e) => return Err(format!("cannot read the hand-over: {e}")),
            };
            if predecessor.take(message, fds)? {
                return Ok(predecessor);
            }
        }
    }

    /// Takes one record; `true` at the end of the state.
    fn take(&mut self, message: Message, mut fds: Vec<OwnedFd>) -> Result<bool, String> {
        match message {
            Message::Hello { version, pid } if version == VERSION => self.pid = pid,
            Message::Hello { version, .. } => {
                let reason = format!("hand-over version {version}, this build speaks {VERSION}");
                self.fail(&reason);
                return Err(reason);
            }
            Message::Admin { listen } => {
                let listen = AdminListen::parse(&listen).map_err(|e| format!("bad admin address {listen:?}: {e}"))?;
                self.admin = fds.pop().map(|fd| (fd, listen));
            }
            Message::Listener {
                service, configured, ..
            } => {
                let key = crate::config::ListenerKey {
                    service,
                    addr: configured,
                };
                let sockets = fds.into_iter().map(std::net::TcpListener::from).collect();
                self.listeners.push(Inherited::by_key(key, sockets));
            }
            Message::Overrides { node_states, redirects } => {
                self.overrides.node_states = node_states.into_iter().map(|(c, n, s)| ((c, n), s)).collect();
                self.overrides.redirects = redirects.into_iter().collect();
            }
            Message::Figures(record) => self.figures.push(record),
            Message::StateDone => return Ok(true),
            other => {
                return Err(format!(
                    "unexpected hand-over record before the state was complete: {other:?}"
                ));
            }
        }
        Ok(false)
    }

    /// The listening sockets handed over, for the new server to start on.
    pub fn take_listeners(&mut self) -> Vec<Inherited> {
        std::mem::take(&mut self.listeners)
    }

    /// Tells the old process why this one cannot start.
    pub fn fail(&self, reason: &str) {
        let _ = self.channel.send(
            &Message::Failed {
                reason: reason.to_string(),
            },
            &[],
        );
    }
}

/// Sends the pins, then each connection as it leaves, until the last has
/// left; returns how many connections went. Blocking.
fn send_departures(
    channel: &Channel,
    pins: &[PinRecord],
    departing: &std::sync::mpsc::Receiver<Departing>,
) -> io::Result<usize> {
    for chunk in pins.chunks(PINS_PER_RECORD) {
        channel.send(&Message::Pins(chunk.to_vec()), &[])?;
    }
    let mut handed = 0;
    for d in departing {
        channel.send(&Message::Connection(d.state), &[d.client.as_fd(), d.node.as_fd()])?;
        handed += 1;
    }
    Ok(handed)
}

/// Reads the pins and connections the old process sends after this one is
/// ready, until it is done; returns how many connections it cut. Blocking.
fn receive_rest(channel: &Channel, live: &crate::model::Live, data: &DataPlane) -> io::Result<usize> {
    let mut adopted = 0;
    loop {
        match channel.recv()? {
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before it was done",
                ));
            }
            Some((Message::Pins(records), _)) => {
                for r in records {
                    let pin = r.node.map(|node| Pin {
                        node: node.into(),
                        last_seen_ms: r.last_seen_ms,
                    });
                    live.pins.learn(&r.cluster, r.client, pin);
                }
            }
            Some((Message::Connection(state), fds)) => {
                let mut fds = fds.into_iter();
                match (fds.next(), fds.next()) {
                    (Some(client), Some(node)) => {
                        data.adopt(state, client, node);
                        adopted += 1;
                    }
                    _ => warn!("upgrade: a handed-over connection came without its sockets"),
                }
            }
            Some((Message::Figures(record), _)) => {
                let snapshot = live.snapshot.load();
                let node = snapshot
                    .clusters
                    .get(&record.cluster)
                    .and_then(|c| c.node(&record.node));
                if let Some(node) = node.filter(|n| n.address_text == record.address) {
                    node.figures.carry_on(&record.counters);
                }
            }
            Some((Message::Done { cut }, _)) => {
                info!("upgrade: adopted {adopted} connection(s)");
                return Ok(cut);
            }
            Some((other, _)) => warn!("upgrade: ignoring an unexpected hand-over record: {other:?}"),
        }
    }
}

/// Changed pins as hand-over records.
fn pin_records(changes: &[crate::model::Change]) -> Vec<PinRecord> {
    changes
        .iter()
        .map(|(cluster, client, pin)| PinRecord {
            cluster: cluster.clone(),
            client: *client,
            node: pin.as_ref().map(|(node, _)| node.to_string()),
            last_seen_ms: pin.as_ref().map_or(0, |(_, seen)| *seen),
        })
        .collect()
}

fn send_all(channel: &Channel, records: &[(Message, Vec<OwnedFd>)]) -> io::Result<()> {
    for (message, fds) in records {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        channel.send(message, &borrowed)?;
    }
    Ok(())
}

/// The path of this process's executable as it is on disk now: a package
/// upgrade replaces the file, and the kernel then names the running one
/// "PATH (deleted)".
fn executable_on_disk() -> io::Result<PathBuf> {
    let running = std::fs::read_link("/proc/self/exe").or_else(|_| std::env::current_exe())?;
    let text = running.to_string_lossy();
    let path = PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(&text).to_string());
    std::fs::metadata(&path)?;
    Ok(path)
}

/// Starts `exe` with this process's arguments and the channel's end at the
/// same descriptor number. What systemd gave this process alone (its
/// listening sockets, the watchdog's pid) is not passed on.
fn spawn(exe: &PathBuf, channel: OwnedFd) -> Result<Child, UpgradeError> {
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHANNEL_ENV, channel.as_raw_fd().to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            path: exe.clone(),
            source,
        });
    // Closed here: the new process's exit then reads as the channel's end.
    drop(channel);
    child
}

/// What each node counted since `before`, as records to add there.
fn counted_since(before: &[NodeRecord], now: &[NodeRecord]) -> Vec<NodeRecord> {
    now.iter()
        .filter_map(|n| {
            let b = before
                .iter()
                .find(|b| b.cluster == n.cluster && b.node == n.node && b.address == n.address);
            let zero = crate::model::NodeCounters::default();
            let b = b.map_or(&zero, |b| &b.counters);
            let c = &n.counters;
            let counters = crate::model::NodeCounters {
                total_connections: c.total_connections.saturating_sub(b.total_connections),
                bytes_in: c.bytes_in.saturating_sub(b.bytes_in),
                bytes_out: c.bytes_out.saturating_sub(b.bytes_out),
                connect_failures: c.connect_failures.saturating_sub(b.connect_failures),
                health_transitions: c.health_transitions.saturating_sub(b.health_transitions),
                check_failures: c.check_failures.saturating_sub(b.check_failures),
            };
            (counters != zero).then(|| NodeRecord { counters, ..n.clone() })
        })
        .collect()
}

/// The new process while it starts: stopped (and reaped) if the upgrade
/// is given up, for whatever reason, before it serves.
struct Starting(Option<Child>);

impl Starting {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    /// It serves: it outlives this process from now on.
    fn serves(mut self) -> Child {
        self.0.take().expect("a starting process")
    }

    /// How it ended, once it closed the channel.
    fn exit_status(&mut self) -> String {
        match self.0.take().map(|mut c| c.wait()) {
            Some(Ok(status)) => status.to_string(),
            Some(Err(e)) => format!("cannot wait for it: {e}"),
            None => "unknown".into(),
        }
    }

    /// Its exit, if it exits within a moment (a broken hand-over may be seen
    /// just before the exit is).
    fn exited_soon(&mut self) -> Option<String> {
        let child = self.0.as_mut()?;
        for _ in 0..50 {
            if let Ok(Some(status)) = child.try_wait() {
                self.0 = None;
                return Some(status.to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            // Off the runtime: a killed process is reaped in a moment.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}
