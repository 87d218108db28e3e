//! What an operator's tools see of the binary: systemd's notifications
//! (NOTIFY_SOCKET) and socket activation (LISTEN_FDS), JSON log lines, the
//! shell completions and the man page.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::*;

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        NotifySocket {
            socket,
            _dir: dir,
            path,
        }
    }

    /// The next message, as its `KEY=VALUE` lines.
    fn next(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {PATIENCE:?}: {e}"));
        String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()
    }

    /// The next message that is not a periodic `STATUS=` alone.
    fn next_state(&self) -> Vec<String> {
        loop {
            let message = self.next();
            if !message.iter().all(|l| l.starts_with("STATUS=")) {
                return message;
            }
        }
    }
}

fn one_node_config() -> ConfigText {
    let node = blocking(name_backend("a"));
    ConfigText::one_service(Cluster::of("c", &[("a", node)]))
}

#[test]
fn systemd_hears_ready_reloading_and_stopping_in_order() {
    let notify = NotifySocket::new();
    let config = one_node_config();
    let file = config.file();
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config"])
        .arg(file.path())
        .env("NOTIFY_SOCKET", &notify.path);
    let mut proc = Running::start(command);

    let ready = notify.next_state();
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=1 service(s), 1 listener(s)")),
        "{ready:?}"
    );
    // Ready means serving.
    assert_eq!(read_tag_blocking(proc.listen_addr()), "a");

    proc.signal(libc::SIGHUP);
    let reloading = notify.next_state();
    assert_eq!(reloading[0], "RELOADING=1", "{reloading:?}");
    let usec: u64 = reloading[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready_again = notify.next_state();
    assert_eq!(ready_again[0], "READY=1", "{ready_again:?}");

    proc.signal(libc::SIGTERM);
    let stopping = notify.next_state();
    assert_eq!(stopping[0], "STOPPING=1", "{stopping:?}");
    assert_eq!(proc.wait_exit().code(), Some(0));
}

/// A connection's whole answer, from a test without a runtime.
fn read_tag_blocking(addr: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn a_socket_passed_by_systemd_is_served_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The balancer's own bind of this address would fail ("address in use":
    // its first socket never sets SO_REUSEPORT before binding), so serving
    // here means it took the socket it was given.
    let config = {
        let node = blocking(name_backend("a"));
        ConfigText::new()
            .service(Service::new("svc", "c").listen(&[&addr.to_string()]))
            .cluster(Cluster::of("c", &[("a", node)]))
    };
    let file = config.file();
    let fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    // LISTEN_PID must be the balancer's own pid: the shell's, which exec keeps.
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN, "run", "--config"])
        .arg(file.path())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web");
    // SAFETY: dup2 is async-signal-safe; it puts the listener at descriptor 3
    // (without FD_CLOEXEC) in the child only.
    unsafe {
        command.pre_exec(move || {
            // Already at 3, dup2 would do nothing: clear FD_CLOEXEC by hand.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proc = Running::start(command);
    proc.wait_for("socket activation: web is bound to");
    assert_eq!(proc.listen_addr(), addr);
    drop(listener);
    for _ in 0..3 {
        assert_eq!(read_tag_blocking(addr), "a");
    }
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));
}

#[test]
fn every_log_line_is_a_json_object_with_the_documented_fields() {
    let config = one_node_config().top("log_format = \"json\"");
    let mut proc = Running::run(&config, &[]);
    let addr = proc.listen_addr();
    assert_eq!(read_tag_blocking(addr), "a");
    proc.wait_for("\"target\":\"protobalance::access\"");
    // A reload that warns: threads take effect at the next start.
    let path = proc.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("threads = 3\n{text}")).unwrap();
    proc.signal(libc::SIGHUP);
    proc.wait_for("until the next start");
    proc.signal(libc::SIGTERM);
    assert_eq!(proc.wait_exit().code(), Some(0));

    let lines = proc.all_output();
    assert!(lines.len() >= 6, "{lines:?}");
    let mut levels = std::collections::BTreeSet::new();
    let mut access = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field} in {line}");
        }
        levels.insert(v["level"].as_str().unwrap().to_string());
        if v["target"] == "protobalance::access" {
            access = Some(v);
        }
    }
    assert!(levels.contains("INFO") && levels.contains("WARN"), "{levels:?}");
    let access = access.expect("an access line");
    assert!(access["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{access}");
    assert_eq!(access["service"], "svc");
    assert_eq!(access["cluster"], "c");
    assert_eq!(access["node"], "a");
    assert_eq!(access["bytes_in"], 0);
    assert_eq!(access["bytes_out"], 1);
    assert!(access["duration_ms"].is_u64(), "{access}");
    assert_eq!(access["end"], "closed");
}

#[test]
fn the_log_format_flag_overrides_the_file_and_a_failed_start_is_json_too() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let node = blocking(name_backend("a"));
    let config = ConfigText::new()
        .service(Service::new("svc", "c").listen(&[&addr]))
        .cluster(Cluster::of("c", &[("a", node)]));
    let mut proc = Running::run(&config, &["--log-format", "json"]);
    assert_eq!(proc.wait_exit().code(), Some(1));
    let lines = proc.all_output();
    let error = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .find(|v| v["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error event in {lines:?}"));
    assert!(
        error["message"].as_str().unwrap().contains("cannot listen on"),
        "{error}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line_definitions() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef protobalance"),
        ("fish", "complete -c protobalance"),
    ] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        for subcommand in ["run", "check", "forward", "ctl", "completions"] {
            assert!(text.contains(subcommand), "{shell}: no {subcommand}");
        }
    }
    let out = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success(), "only bash, zsh and fish");
    let man = Command::new(BIN).arg("manpage").output().unwrap();
    assert!(man.status.success());
    let roff = String::from_utf8(man.stdout).unwrap();
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH protobalance"),
        "{}",
        &roff[..200.min(roff.len())]
    );
    assert!(roff.contains("Proto Balance"));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&help.stdout).contains("manpage"),
        "the packaging command stays out of --help"
    );
}
