//! Real protocols end to end: servers and clients that nobody here wrote
//! (nginx, exim, dovecot, vsftpd, omniORB, curl), two backends of each behind
//! the balancer, assertions on the content that comes through.
//!
//! Each test starts its daemons itself, in the foreground, as child processes
//! with private config and data under a temporary directory, on loopback
//! ports, and kills them when it ends. Nothing system-wide is read or changed
//! beyond the users the Debian packages create. The programs come from
//! `scripts/test` (scripts/test-deps.txt, scripts/test.d/omniorb.sh); a test
//! whose program is missing fails and says so, or is counted as skipped under
//! PROTOBALANCE_ALLOW_SKIP=1 (tests/common/skip.rs).

#[path = "../common/mod.rs"]
mod common;

mod checks;
mod ftp;
mod http;
mod iiop;
mod mail;
mod tls;

use common::{PATIENCE, skip_or_fail, tool, wait_until_blocking};
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The daemons drop privileges to their own users (Debian-exim, dovecot's
/// login users, ftp): only root can start them with a private config.
/// `if !require_root() { return; }`, as for [`common::require_tools`].
#[must_use]
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail("it starts exim, dovecot or vsftpd, which switch users: run it as root (as scripts/test does in CI)");
    false
}

/// uid and gid of a system user.
pub fn user_ids(name: &str) -> (u32, u32) {
    let c_name = std::ffi::CString::new(name).unwrap();
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once,
    // before any other call that could reuse its static buffer.
    let pw = unsafe { libc::getpwnam(c_name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "system user {name} is missing: run scripts/test to install the packages that create it"
    );
    // SAFETY: non-null pointer returned by getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// A private working directory that the daemons' own users may traverse.
pub fn work_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("protobalance-proto").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Gives `path` (and, for a directory, what is in it) to `user`.
pub fn chown_to(path: &Path, user: &str) {
    let (uid, gid) = user_ids(user);
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_to(&entry.unwrap().path(), user);
        }
    }
}

/// A port on `ip` that nothing listens on now (bound, then released).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon running in the foreground, its output kept in a log file that a
/// failure prints (a test that panics while the daemon runs shows it); killed
/// when dropped.
pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command`, logging to `log`, and waits until every address in
    /// `ready` accepts connections.
    pub fn start(name: &str, mut command: Command, log: PathBuf, ready: &[SocketAddr]) -> Daemon {
        let out = File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let mut daemon = Daemon {
            name: name.to_string(),
            child,
            log,
        };
        for addr in ready {
            daemon.wait_listening(*addr);
        }
        daemon
    }

    /// Polls until `addr` accepts a connection (a daemon's only readiness
    /// sign here); fails if the daemon exits first.
    fn wait_listening(&mut self, addr: SocketAddr) {
        wait_until_blocking(&format!("{} to listen on {addr}", self.name), || {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before listening on {addr}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            TcpStream::connect(addr).is_ok()
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log_text());
        }
    }
}

/// Runs a client program to completion (off the runtime's threads), bounded by
/// [`PATIENCE`]; fails with its output unless it succeeds.
pub async fn run_client(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let output = common::within(&shown, tokio::task::spawn_blocking(move || command.output()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        output.status.success(),
        "{shown} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A curl command that fails on any error and gives up after [`PATIENCE`].
pub fn curl() -> Command {
    let mut command = Command::new(tool("curl"));
    command.args(["--silent", "--show-error", "--fail", "--max-time"]);
    command.arg(PATIENCE.as_secs().to_string());
    command
}
