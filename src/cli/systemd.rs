//! systemd integration, all of it optional: state notifications to
//! `NOTIFY_SOCKET` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `MAINPID=`,
//! `STATUS=`), the watchdog (`WATCHDOG_USEC`), and socket activation
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`). Without those variables every function
//! here does nothing. Never decides anything about the balancer.

use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

/// Whether a service manager listens for notifications.
pub fn notifying() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `states` to the service manager, if there is one.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// Every listener is open: `READY=1`, with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// This process took over from the one it upgraded: it is the main process now.
pub fn took_over(status: &str) {
    notify(&[
        NotifyState::MainPid(std::process::id()),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
}

/// A reload begins (`RELOADING=1` with the monotonic time, as systemd wants
/// for `Type=notify-reload` and accepts for `Type=notify`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => {
            debug!("no monotonic clock for MONOTONIC_USEC: {e}");
            notify(&[NotifyState::Reloading]);
        }
    }
}

/// A status line (`STATUS=`), shown by `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// The balancer is stopping.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Keeps the watchdog fed, from the runtime this is spawned on, at half its
/// interval, while that runtime runs: a control plane stuck for longer than
/// `WatchdogSec=` stops feeding it and systemd restarts the service.
pub async fn feed_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return std::future::pending().await;
    };
    info!("systemd watchdog: every {:?}", interval / 2);
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(10)));
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// The listening TCP sockets systemd passed (socket activation), each with
/// its name from `LISTEN_FDNAMES`, and a warning for each passed descriptor
/// that is not a listening TCP socket (closed). Call it first thing in the
/// process: until then nothing else has opened a descriptor that a wrong
/// `LISTEN_FDS` could name.
pub fn activated_listeners() -> (Vec<(TcpListener, String)>, Vec<String>) {
    let fds: Vec<(RawFd, String)> = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            return (
                Vec::new(),
                vec![format!("socket activation: cannot use LISTEN_FDS: {e}")],
            );
        }
    };
    let (mut listeners, mut warnings) = (Vec::new(), Vec::new());
    for (fd, name) in fds {
        // SAFETY: LISTEN_PID names this process, so systemd passed these
        // descriptors to it (listen_fds checked each is open), and nothing
        // else in the process has opened a descriptor yet.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match listening_tcp(owned) {
            Ok(listener) => listeners.push((listener, name)),
            Err(e) => warnings.push(format!(
                "socket activation: descriptor {fd} ({name}) is not usable: {e}"
            )),
        }
    }
    (listeners, warnings)
}

/// `fd` as a non-blocking listening TCP socket, or why it is not one.
fn listening_tcp(fd: OwnedFd) -> io::Result<TcpListener> {
    let socket = socket2::Socket::from(fd);
    if socket.r#type()? != socket2::Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening stream socket",
        ));
    }
    let local = socket.local_addr()?;
    if local.as_socket().is_none() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"));
    }
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
