//! What a test does when this machine cannot run it (a program is missing,
//! there is no IPv6 loopback, too few CPUs, no network namespaces): it fails,
//! saying what is missing and how to get it. `scripts/test` installs every
//! program the suite needs, so a failure means the setup is incomplete.
//!
//! Where that is expected (a developer machine without chromium, say), set
//! `PROTOBALANCE_ALLOW_SKIP=1`: such a test then records a line in
//! [`skip_file`] and returns, and `scripts/test` prints those lines and how
//! many there are after the run. A test never passes silently.

use std::io::Write;
use std::path::PathBuf;

/// The environment variable that turns "cannot run here" from a failure into
/// a counted skip.
pub const ALLOW_SKIP: &str = "PROTOBALANCE_ALLOW_SKIP";

/// Where skipped tests are listed, one line each; `scripts/test` removes it
/// before the run and reports it after.
pub fn skip_file() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt")
}

/// The test that is running: libtest names each test's thread after it (the
/// body of a `#[tokio::test]` runs on that thread too).
fn test_name() -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("an unnamed test");
    format!("{}::{name}", env!("CARGO_CRATE_NAME"))
}

/// Ends a test that cannot run on this machine because of `reason`: fails it,
/// or, with `PROTOBALANCE_ALLOW_SKIP=1`, records the skip. The caller returns
/// right after.
pub fn skip_or_fail(reason: &str) {
    let test = test_name();
    if std::env::var_os(ALLOW_SKIP).is_none_or(|v| v != "1") {
        panic!("{test} cannot run here: {reason}\n(set {ALLOW_SKIP}=1 to count it as skipped instead)");
    }
    record_skip(&test, reason);
}

/// Ends a test whose issue asks for a counted skip, never a failure, where
/// the machine lacks `reason` (network namespaces inside a container that
/// may not make them): records the skip whatever `PROTOBALANCE_ALLOW_SKIP`
/// says. Programs a test needs still go through [`require_tools`].
pub fn skip_counted(reason: &str) {
    record_skip(&test_name(), reason);
}

fn record_skip(test: &str, reason: &str) {
    let line = format!("{test}: {reason}\n");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(skip_file())
        .unwrap_or_else(|e| panic!("cannot record the skip of {test} in {}: {e}", skip_file().display()));
    // One write per line, in append mode: lines from tests running at once do not mix.
    file.write_all(line.as_bytes()).unwrap();
    eprintln!("SKIPPED (counted): {line}");
}

/// The path of `program`: on `PATH`, or in the sbin directories where Debian
/// puts daemons.
pub fn find_tool(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Whether every program in `programs` is installed. When one is not, the
/// test fails saying how to install it, or records a skip (see
/// [`skip_or_fail`]) and gets `false`: `if !require_tools(&[..]) { return; }`.
#[must_use]
pub fn require_tools(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| find_tool(p).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let packages: Vec<&str> = missing.iter().map(|p| debian_package(p)).collect();
    skip_or_fail(&format!(
        "{} not installed: run scripts/test, which installs what the tests need \
         (here: apt-get install {})",
        missing.join(", "),
        packages.join(" ")
    ));
    false
}

/// The Debian package (scripts/test-deps.txt) that brings `program`.
fn debian_package(program: &str) -> &str {
    match program {
        "node" => "nodejs",
        "exim4" => "exim4-daemon-light",
        "dovecot" => "dovecot-imapd dovecot-pop3d",
        "cargo-deb" => "(none: cargo install cargo-deb, as scripts/test.d/cargo-deb.sh does)",
        "dpkg-deb" => "dpkg",
        "systemd-analyze" => "systemd",
        "ip" => "iproute2",
        "dnsmasq" => "dnsmasq-base",
        other => other, // chromium, npm, nginx, vsftpd, curl
    }
}

/// The path of `program`, which the test has required: a failure otherwise,
/// so that a test that forgot [`require_tools`] still cannot pass without it.
pub fn tool(program: &str) -> PathBuf {
    find_tool(program)
        .unwrap_or_else(|| panic!("{program} is not installed: run scripts/test, which installs what the tests need"))
}
