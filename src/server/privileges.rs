//! Dropping root: once every listener, the admin socket and the state files
//! are open, the process becomes `user` (its group, its supplementary
//! groups) and keeps only the capabilities that `control::privileges`
//! says the file needs, with `PR_SET_NO_NEW_PRIVS` so that nothing it runs
//! later gains any. The system calls only; what to keep is decided there.
//!
//! Capabilities belong to threads, user IDs to the process: glibc's
//! set*id calls change every thread, and a thread that had not asked to
//! keep its capabilities loses them all at the change. So the control
//! thread (which binds the listeners a reload opens) and each worker
//! (which connects to nodes) prepare, then the IDs change once, then each
//! of those threads sets its own capabilities. Other threads (the blocking
//! pool, the log writer) end with none.

use std::collections::HashSet;
use std::io;

use caps::{CapSet, Capability, CapsHashSet};

use crate::config::RunAs;
use crate::control::privileges::{DEFAULT_UNPRIVILEGED_PORT_START, Privilege, Privileges};

/// The kernel's `net.ipv4.ip_unprivileged_port_start`, or its default.
pub(super) fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_UNPRIVILEGED_PORT_START)
}

/// The capabilities that grant `privileges`.
pub(super) fn capabilities(privileges: &Privileges) -> CapsHashSet {
    privileges
        .iter()
        .map(|p| match p {
            Privilege::BindLowPort => Capability::CAP_NET_BIND_SERVICE,
            Privilege::NetAdmin => Capability::CAP_NET_ADMIN,
        })
        .collect()
}

/// Whether this thread holds what grants `privilege` (in its effective set).
pub(super) fn holds(privilege: Privilege) -> bool {
    let caps = capabilities(&Privileges::from([privilege]));
    caps.iter()
        .all(|cap| caps::has_cap(None, caps::CapSet::Effective, *cap).unwrap_or(false))
}

fn failed(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong, what: &str) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } != 0 {
        return Err(failed(what, io::Error::last_os_error()));
    }
    Ok(())
}

/// Step 1, on each thread that goes on with `keep`: keep the permitted
/// capabilities across the change of user, and take every other one out of
/// the bounding set (best effort: without `CAP_SETPCAP` the bounding set
/// stays, and `PR_SET_NO_NEW_PRIVS` still stops an exec from using it).
pub(super) fn prepare_thread(keep: &CapsHashSet) -> io::Result<()> {
    prctl(libc::PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(|e| failed("reading the bounding set", e))?;
        for cap in bounding.difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| failed("dropping from the bounding set", e))?;
        }
    }
    Ok(())
}

/// Step 2, once: the process becomes `run_as` (groups first: after the
/// user changes, they could no longer be set). Checks that root cannot
/// be had back.
pub(super) fn become_user(run_as: &RunAs) -> io::Result<()> {
    // SAFETY: plain system calls on integers and a valid slice.
    unsafe {
        if libc::geteuid() != 0 {
            if libc::geteuid() == run_as.uid && libc::getegid() == run_as.gid {
                return Ok(());
            }
            return Err(failed(
                &format!("cannot become user \"{}\"", run_as.user),
                "the balancer is not running as root",
            ));
        }
        let groups: Vec<libc::gid_t> = run_as
            .groups
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(failed("setgroups", io::Error::last_os_error()));
        }
        if libc::setresgid(run_as.gid, run_as.gid, run_as.gid) != 0 {
            return Err(failed("setresgid", io::Error::last_os_error()));
        }
        if libc::setresuid(run_as.uid, run_as.uid, run_as.uid) != 0 {
            return Err(failed("setresuid", io::Error::last_os_error()));
        }
        if run_as.uid != 0 && libc::setuid(0) == 0 {
            return Err(failed("dropping root", "root could be regained"));
        }
    }
    Ok(())
}

/// Step 3, on each thread that did step 1: exactly `keep`, permitted and
/// effective; nothing inheritable or ambient; no new privileges on exec.
pub(super) fn finish_thread(keep: &CapsHashSet) -> io::Result<()> {
    caps::set(None, CapSet::Permitted, keep).map_err(|e| failed("setting the permitted capabilities", e))?;
    caps::set(None, CapSet::Effective, keep).map_err(|e| failed("setting the effective capabilities", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| failed("clearing the inheritable capabilities", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| failed("clearing the ambient capabilities", e))?;
    prctl(libc::PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_privilege_is_one_capability() {
        let all: Privileges = [Privilege::BindLowPort, Privilege::NetAdmin].into();
        let caps = capabilities(&all);
        assert!(caps.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert!(caps.contains(&Capability::CAP_NET_ADMIN));
        assert!(capabilities(&Privileges::new()).is_empty());
    }
}
