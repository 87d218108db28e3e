//! A user for tests that drop privileges (created when missing: CI runs as
//! root), and what `/proc` says a process holds.

use std::process::Command;

use super::tool;

pub const TEST_USER: &str = "protobalance-test";

/// The test user's (uid, gid), created (a system account) if missing.
pub fn test_user() -> (u32, u32) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap();
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, TEST_USER]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().ok()
    };
    if id("-u").is_none() {
        let made = Command::new(tool("useradd"))
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .status()
            .unwrap();
        assert!(made.success() || id("-u").is_some(), "useradd {TEST_USER} failed");
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

/// The value of `key` in `/proc/PID/status` (or a thread's, with `task`).
pub fn proc_status(pid: u32, task: Option<&str>, key: &str) -> String {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .trim()
        .to_string()
}
