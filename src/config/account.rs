//! `user` and `group`: the account the balancer drops to once its sockets and
//! files are open. Names are looked up when the file is loaded (like node
//! host names), so `check` reports a user that does not exist; the drop
//! itself is `server`'s.

use std::ffi::{CStr, CString};

/// Who the process becomes: a user, its group and its supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    /// `group`, else the user's primary group.
    pub group: String,
    pub gid: u32,
    /// Every group the user belongs to (the primary one included).
    pub groups: Vec<u32>,
}

/// Looks `user` (and `group`, when given) up in the system's account
/// database; the error says what is missing.
pub fn look_up(user: &str, group: Option<&str>) -> Result<RunAs, String> {
    let (uid, primary) = passwd(user)?.ok_or_else(|| format!("no such user on this system: {user:?}"))?;
    let (group, gid) = match group {
        Some(g) => (
            g.to_string(),
            group_id(g)?.ok_or_else(|| format!("no such group on this system: {g:?}"))?,
        ),
        None => (group_name(primary).unwrap_or_else(|| primary.to_string()), primary),
    };
    let groups = member_of(user, gid)?;
    Ok(RunAs {
        user: user.to_string(),
        uid,
        group,
        gid,
        groups,
    })
}

fn c_string(name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("{name:?}: a name cannot hold a NUL byte"))
}

/// Calls a `get*_r` function with a growing buffer until it fits.
fn with_buffer<T>(mut call: impl FnMut(&mut [libc::c_char]) -> Result<Option<T>, i32>) -> Result<Option<T>, String> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        match call(&mut buf) {
            Err(libc::ERANGE) if size < 1 << 20 => size *= 4,
            Err(e) => {
                return Err(format!(
                    "account lookup failed: {}",
                    std::io::Error::from_raw_os_error(e)
                ));
            }
            Ok(found) => return Ok(found),
        }
    }
}

/// (uid, primary gid) of `user`.
fn passwd(user: &str) -> Result<Option<(u32, u32)>, String> {
    let name = c_string(user)?;
    with_buffer(|buf| {
        // SAFETY: an all-zero passwd is a valid out-parameter; every pointer
        // passed is valid for the call and the buffer outlives it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() => Ok(None),
            0 => Ok(Some((pw.pw_uid, pw.pw_gid))),
            e => Err(e),
        }
    })
}

fn group_id(group: &str) -> Result<Option<u32>, String> {
    let name = c_string(group)?;
    with_buffer(|buf| {
        // SAFETY: as in `passwd`.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() => Ok(None),
            0 => Ok(Some(gr.gr_gid)),
            e => Err(e),
        }
    })
}

fn group_name(gid: u32) -> Option<String> {
    with_buffer(|buf| {
        // SAFETY: as in `passwd`; gr_name points into `buf` while it lives.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() => Ok(None),
            0 => Ok(Some(
                unsafe { CStr::from_ptr(gr.gr_name) }.to_string_lossy().into_owned(),
            )),
            e => Err(e),
        }
    })
    .ok()
    .flatten()
}

/// The groups `user` is a member of, with `gid` among them (initgroups(3)'s list).
fn member_of(user: &str, gid: u32) -> Result<Vec<u32>, String> {
    let name = c_string(user)?;
    let mut count: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        let asked = count;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count as usize);
            return Ok(groups);
        }
        if count <= asked {
            count = asked * 2;
        }
        if count > 65_536 {
            return Err(format!("{user:?} is in too many groups"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_a_missing_user() {
        let root = look_up("root", None).unwrap();
        assert_eq!((root.uid, root.gid, root.group.as_str()), (0, 0, "root"));
        assert!(root.groups.contains(&0));
        assert!(look_up("no-such-user-here", None).unwrap_err().contains("no such user"));
        assert!(
            look_up("root", Some("no-such-group-here"))
                .unwrap_err()
                .contains("no such group")
        );
        assert!(look_up("ro\0ot", None).is_err());
    }
}
