//! The admin API's socket and connections: binding `[admin] listen` (an IP
//! and port, or a Unix socket created with `socket_mode`), and an accept
//! loop on a budget of its own, so that no amount of admin traffic takes
//! what the data plane needs:
//!
//! - at most `max_connections` open at once, and never more than a quarter
//!   of the descriptor limit: over that, a new connection is closed at once;
//! - `header_timeout`: a request's headers must arrive within it, counted
//!   from the connection's start or from the previous answer, so it also
//!   closes idle keep-alive connections (hyper's header timeout, given a timer);
//! - `request_timeout`: from the headers to the answer (408 past it);
//! - an accept that fails (out of descriptors) is retried after 100 ms, not
//!   in a spin.
//!
//! HTTP itself is hyper's; the routes are `super::router`'s.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{AdminConfig, AdminListen};

/// Pause after a failed accept (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning this often about refused connections or failed accepts.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The share of the descriptor limit the admin API may hold: 1/4.
const DESCRIPTOR_SHARE: u64 = 4;

/// The admin API's listening socket.
pub enum AdminListener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// The socket file's inode, to remove only our own at the end.
        inode: u64,
        /// Set when the socket went to the process of an upgrade: then its
        /// file is that process's, and stays.
        handed_over: Arc<AtomicBool>,
    },
}

/// What an upgrade needs of the admin API's socket: a copy of it, where it
/// listens, and (a Unix socket) the switch that keeps its file at the end.
pub struct AdminHandOff {
    pub socket: OwnedFd,
    pub listen: AdminListen,
    handed_over: Option<Arc<AtomicBool>>,
}

impl AdminHandOff {
    /// The socket goes (`true`) or went back (`false`) to another process.
    pub fn set_handed_over(&self, yes: bool) {
        if let Some(flag) = &self.handed_over {
            flag.store(yes, Relaxed);
        }
    }
}

impl AdminListener {
    /// Binds `listen`. A Unix socket gets permission bits `mode` and, when
    /// `owner` is given, that user and group, before it listens: nobody
    /// else can connect in between. A stale socket file (nobody listening)
    /// is replaced; a live one, or a file that is not a socket, is an error.
    pub async fn bind(listen: &AdminListen, mode: u32, owner: Option<(u32, u32)>) -> io::Result<AdminListener> {
        match listen {
            AdminListen::Tcp(addr) => Ok(AdminListener::Tcp(TcpListener::bind(addr).await?)),
            AdminListen::Unix(path) => {
                let listener = bind_unix(path, mode, owner)?;
                let inode = std::fs::symlink_metadata(path)?.ino();
                Ok(AdminListener::Unix {
                    listener: UnixListener::from_std(listener)?,
                    path: path.clone(),
                    inode,
                    handed_over: Default::default(),
                })
            }
        }
    }

    /// The admin socket another process handed over (an upgrade), listening
    /// on `listen`.
    pub fn adopt(socket: OwnedFd, listen: &AdminListen) -> io::Result<AdminListener> {
        match listen {
            AdminListen::Tcp(_) => {
                let std = std::net::TcpListener::from(socket);
                std.set_nonblocking(true)?;
                Ok(AdminListener::Tcp(TcpListener::from_std(std)?))
            }
            AdminListen::Unix(path) => {
                let std = std::os::unix::net::UnixListener::from(socket);
                std.set_nonblocking(true)?;
                Ok(AdminListener::Unix {
                    listener: UnixListener::from_std(std)?,
                    path: path.clone(),
                    inode: std::fs::symlink_metadata(path)?.ino(),
                    handed_over: Default::default(),
                })
            }
        }
    }

    /// A copy of the socket for an upgrade to hand over.
    pub fn hand_off(&self) -> io::Result<AdminHandOff> {
        use std::os::fd::AsFd;
        match self {
            AdminListener::Tcp(l) => Ok(AdminHandOff {
                socket: l.as_fd().try_clone_to_owned()?,
                listen: AdminListen::Tcp(l.local_addr()?),
                handed_over: None,
            }),
            AdminListener::Unix {
                listener,
                path,
                handed_over,
                ..
            } => Ok(AdminHandOff {
                socket: listener.as_fd().try_clone_to_owned()?,
                listen: AdminListen::Unix(path.clone()),
                handed_over: Some(handed_over.clone()),
            }),
        }
    }

    /// Where it listens (a TCP port 0 resolved).
    pub fn bound(&self) -> io::Result<AdminListen> {
        match self {
            AdminListener::Tcp(l) => l.local_addr().map(AdminListen::Tcp),
            AdminListener::Unix { path, .. } => Ok(AdminListen::Unix(path.clone())),
        }
    }
}

fn bind_unix(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> io::Result<std::os::unix::net::UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    remove_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let ready = (|| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        socket.listen(128)?;
        socket.set_nonblocking(true)
    })();
    if let Err(e) = ready {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(socket.into())
}

/// Removes a socket file nobody listens on; refuses anything else there.
fn remove_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if !meta.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket (left alone)",
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process listens on this socket",
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
            Err(e) => Err(e),
        },
    }
}

/// The connection budget, fixed when the API starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    pub(super) max_connections: usize,
    pub(super) header_timeout: Duration,
    pub(super) request_timeout: Duration,
}

impl Budget {
    /// `[admin]`'s budget, its connection cap held to a quarter of the
    /// process's descriptor limit (the rest is the data plane's).
    pub(super) fn of(admin: &AdminConfig) -> Budget {
        let limit = descriptor_limit();
        let share = usize::try_from(limit / DESCRIPTOR_SHARE).unwrap_or(usize::MAX).max(1);
        let max_connections = admin.max_connections.min(share);
        if max_connections < admin.max_connections {
            warn!(
                "[admin] max_connections = {} lowered to {max_connections}: the admin API may hold at most \
                 a quarter of the descriptor limit ({limit}), the rest is kept for clients",
                admin.max_connections
            );
        }
        Budget {
            max_connections,
            header_timeout: admin.header_timeout,
            request_timeout: admin.request_timeout,
        }
    }
}

fn descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// Serves `app` on `listener` within `budget` until `stop` is cancelled;
/// then lets requests in flight finish (up to `request_timeout`), closes
/// the rest, and removes a Unix socket's file.
pub(super) async fn serve(listener: AdminListener, app: Router, budget: Budget, stop: CancellationToken) {
    match &listener {
        AdminListener::Tcp(l) => accept_loop(l, app, budget, &stop).await,
        AdminListener::Unix { listener: l, .. } => accept_loop(l, app, budget, &stop).await,
    }
    if let AdminListener::Unix {
        listener,
        path,
        inode,
        handed_over,
    } = listener
    {
        drop(listener);
        // Only our own file: another balancer may have replaced it since,
        // or the process of an upgrade serves on it now.
        if !handed_over.load(Relaxed)
            && std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == inode)
            && let Err(e) = std::fs::remove_file(&path)
        {
            debug!("cannot remove the admin socket {}: {e}", path.display());
        }
    }
}

/// A listener whose connections hyper can serve.
trait Accept {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

async fn accept_loop<L: Accept + Sync>(listener: &L, app: Router, budget: Budget, stop: &CancellationToken) {
    let permits = Arc::new(Semaphore::new(budget.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // half_close: a client that shuts its write side after the request
    // (`curl` with a body, scripts, the fuzz test) still gets its answer;
    // without it, hyper may see the EOF first and close without one.
    http.timer(TokioTimer::new())
        .header_read_timeout(budget.header_timeout)
        .half_close(true);
    let mut warned = Warned::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept_one() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                if due(&mut warned.accept) {
                    warn!("admin API: accept failed ({e}); retrying every {ACCEPT_BACKOFF:?}");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            warned.refused += 1;
            if due(&mut warned.cap) {
                warn!(
                    "admin API: {} connections open, its max_connections: {} new one(s) closed at once",
                    budget.max_connections, warned.refused
                );
                warned.refused = 0;
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                debug!("admin connection ended: {e}");
            }
            drop(permit);
        });
    }
    // Idle connections close now, requests in flight get their answer.
    if tokio::time::timeout(budget.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("admin API: connections still open at the end are closed");
    }
}

/// When each kind of warning was last given, and what it left unsaid.
#[derive(Default)]
struct Warned {
    accept: Option<Instant>,
    cap: Option<Instant>,
    refused: u64,
}

/// Whether a warning last given at `last` may be given again now (and notes it).
fn due(last: &mut Option<Instant>) -> bool {
    let due = last.is_none_or(|t| t.elapsed() >= WARN_EVERY);
    if due {
        *last = Some(Instant::now());
    }
    due
}
