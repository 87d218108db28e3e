//! Upgrade in place with the real binary: SIGUSR2 or the API starts the
//! executable on disk, which takes over every listener and every established
//! connection; the old process exits. Under load nothing is refused, reset,
//! lost or doubled; a new executable that cannot start leaves the old one
//! serving; systemd hears the new main pid.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// An echo server on a thread per connection (blocking: the test's load
/// runs on plain threads too).
fn echo_node() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The pid the admin API answers from.
fn serving_pid(admin: &str) -> u32 {
    blocking(status(admin, None))["pid"].as_u64().expect("status has pid") as u32
}

/// The pid the admin API answers from, or `None` when the request went
/// unanswered (the switch between two processes).
fn answering_pid(admin: &str) -> Option<u32> {
    let reply = blocking(protobalance::admin::client::request(
        admin,
        None,
        hyper::Method::GET,
        "/api/v1/status",
        None,
    ))
    .ok()?;
    let status: serde_json::Value = serde_json::from_str(&reply.text()).ok()?;
    status["pid"].as_u64().map(|p| p as u32)
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn upgrade_by_signal(pid: u32) {
    // SAFETY: kill(2) on a balancer process this test started (or its successor).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
}

/// Kills the balancer process that serves last (not a child of the test once
/// an upgrade has happened) when the test ends.
struct KillAtEnd(Arc<AtomicU64>);

impl Drop for KillAtEnd {
    fn drop(&mut self) {
        let pid = self.0.load(SeqCst) as i32;
        if pid > 0 {
            // SAFETY: the pid of a balancer this test started, by way of upgrades.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Sends `size` bytes from a seeded generator and reads them back, checking
/// every byte: a lost, doubled or reordered byte fails.
fn bulk_echo(addr: SocketAddr, size: usize) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("bulk connect: {e}"))?;
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let pattern = |i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut sent = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        while sent < size {
            let n = chunk.len().min(size - sent);
            for (j, b) in chunk[..n].iter_mut().enumerate() {
                *b = pattern(sent + j);
            }
            stream
                .write_all(&chunk[..n])
                .map_err(|e| format!("bulk write at {sent}: {e}"))?;
            sent += n;
        }
        stream.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())
    });
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("bulk read at {got}: {e}"))?;
        if n == 0 {
            break;
        }
        for (j, b) in buf[..n].iter().enumerate() {
            if *b != pattern(got + j) {
                return Err(format!("bulk: byte {} is wrong", got + j));
            }
        }
        got += n;
    }
    writer.join().unwrap()?;
    if got != size {
        return Err(format!("bulk: {got} bytes came back of {size}"));
    }
    Ok(())
}

/// One request on a kept-alive connection: `ping N` echoed back.
fn exchange(stream: &mut TcpStream, n: u64) -> Result<(), String> {
    let request = format!("ping {n:08}\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = vec![0u8; request.len()];
    stream.read_exact(&mut answer).map_err(|e| format!("read: {e}"))?;
    if answer != request.as_bytes() {
        return Err(format!("answer {:?} to {request:?}", String::from_utf8_lossy(&answer)));
    }
    Ok(())
}

#[test]
fn three_upgrades_under_load_lose_nothing() {
    let node = echo_node();
    let other = echo_node();
    let config = ConfigText::new()
        .admin_listen("127.0.0.1:0")
        .shutdown_grace("20s")
        .service(Service::new("svc", "c"))
        .cluster(
            Cluster::new("c")
                .key("affinity = true")
                .node(Node::new("a", node))
                .node(Node::new("b", other)),
        );
    let proc = Running::run(&config, &[]);
    let addr = proc.listen_addr();
    let admin = proc.admin_addr();
    let last_pid = Arc::new(AtomicU64::new(u64::from(proc.child.id())));
    let _kill = KillAtEnd(last_pid.clone());
    // State set before: b drained (yellow), so every new client pins to a.
    let reply = blocking(api(
        &admin,
        None,
        hyper::Method::PUT,
        "/api/v1/clusters/c/nodes/b/state",
        Some(r#"{"state":"yellow"}"#),
    ));
    assert_eq!(reply.status, 200, "{}", reply.text());
    // A client pinned to a (b takes no new client).
    exchange(&mut connect_std_from(ip(0, 5, 1), addr), 0).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let fail = |failures: &Arc<std::sync::Mutex<Vec<String>>>, e: String| failures.lock().unwrap().push(e);

    // 100 MB each way through one connection.
    let bulk = {
        let failures = failures.clone();
        thread::spawn(move || {
            if let Err(e) = bulk_echo(addr, 100 << 20) {
                fail(&failures, e);
            }
        })
    };
    // 50 kept-alive connections, one request each every 100 ms.
    let idle: Vec<_> = (0..50)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("keep-alive connect");
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut n = 0;
                while !stop.load(SeqCst) {
                    if let Err(e) = exchange(&mut stream, n) {
                        fail(&failures, format!("keep-alive request {n}: {e}"));
                        return 0;
                    }
                    n += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                n
            })
        })
        .collect();
    // New connections, about 300 a second.
    let fresh = {
        let (stop, failures) = (stop.clone(), failures.clone());
        thread::spawn(move || {
            let (start, mut made) = (Instant::now(), 0u64);
            while !stop.load(SeqCst) {
                match TcpStream::connect(addr)
                    .map_err(|e| format!("connect: {e}"))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(PATIENCE)).unwrap();
                        exchange(&mut s, made)
                    }) {
                    Ok(()) => made += 1,
                    Err(e) => fail(&failures, format!("new connection {made}: {e}")),
                }
                // Paced, not synchronising: 300 a second.
                let due = start + Duration::from_millis(made * 1000 / 300);
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            made
        })
    };

    for round in 1..=3 {
        let old = serving_pid(&admin);
        upgrade_by_signal(old);
        let mut new = old;
        wait_until_blocking(&format!("upgrade {round}: a new process serves"), || {
            // A request the old process accepted as it stopped its admin API
            // may be closed unanswered (HTTP graceful shutdown); ask again.
            match answering_pid(&admin) {
                Some(pid) => {
                    new = pid;
                    new != old
                }
                None => false,
            }
        });
        last_pid.store(u64::from(new), SeqCst);
        wait_until_blocking(&format!("upgrade {round}: the old process {old} exits"), || exited(old));
        // The old process has sent every connection once it exits, but the
        // new one adopts them from the channel's queue as it reads it, each
        // on a worker of its own: wait until all 50 kept-alive ones are here.
        wait_until_blocking(
            &format!("upgrade {round}: the new process {new} holds the 50 kept-alive connections to a"),
            || {
                let status = blocking(status(&admin, None));
                node_status(&status, "c", "a")["active_connections"].as_u64().unwrap() >= 50
            },
        );
        let status = blocking(status(&admin, None));
        assert_eq!(node_status(&status, "c", "b")["state"], "yellow", "upgrade {round}");
        assert!(
            failures.lock().unwrap().is_empty(),
            "upgrade {round}: {:?}",
            failures.lock().unwrap()
        );
    }
    bulk.join().unwrap();
    stop.store(true, SeqCst);
    let requests: u64 = idle.into_iter().map(|t| t.join().unwrap()).sum();
    let made = fresh.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failure(s): {failures:?}", failures.len());
    assert!(requests > 50 * 3, "{requests} keep-alive requests");
    assert!(made > 100, "{made} new connections");
    // The pin made before the upgrades holds: the client still reaches a,
    // even with b green again (round robin would send every other client there).
    let reply = blocking(api(
        &admin,
        None,
        hyper::Method::PUT,
        "/api/v1/clusters/c/nodes/b/state",
        Some(r#"{"state":"green"}"#),
    ));
    assert_eq!(reply.status, 200);
    let pins_before = blocking(status(&admin, None));
    let a_total = node_status(&pins_before, "c", "a")["total_connections"]
        .as_u64()
        .unwrap();
    for n in 0..4 {
        exchange(&mut connect_std_from(ip(0, 5, 1), addr), n).unwrap();
    }
    let after = blocking(status(&admin, None));
    assert_eq!(
        node_status(&after, "c", "a")["total_connections"].as_u64().unwrap(),
        a_total + 4,
        "the pinned client stays on a"
    );
    assert!(
        a_total > made,
        "a's counters went on across the upgrades: {a_total}, {made} new connections"
    );
}

/// A copy of the balancer binary in `dir`, which a test may replace.
fn own_copy(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("protobalance");
    std::fs::copy(BIN, &path).unwrap();
    path
}

/// Replaces the executable at `path` (as a package upgrade does: a new file
/// renamed over it) with a shell script.
fn replace_with_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let new = path.with_extension("new");
    std::fs::write(&new, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// A blocking connection to `to` from the loopback address `from`.
fn connect_std_from(from: std::net::IpAddr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn an_executable_that_cannot_start_leaves_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    let exe = own_copy(dir.path());
    let node = echo_node();
    let config = ConfigText::one_service(Cluster::of("c", &[("a", node)]));
    let file = config.file();
    let mut command = Command::new(&exe);
    command.args(["run", "--config"]).arg(file.path());
    let proc = Running::start(command);
    let (addr, admin) = (proc.listen_addr(), proc.admin_addr());
    let pid = proc.child.id();
    let mut open = TcpStream::connect(addr).unwrap();
    open.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut open, 0).unwrap();

    replace_with_script(&exe, "exit 1");
    let reply = blocking(api(&admin, None, hyper::Method::POST, "/api/v1/upgrade", None));
    assert_eq!(reply.status, 409, "{}", reply.text());
    assert!(reply.text().contains("exited before it was ready"), "{}", reply.text());
    proc.wait_for("upgrade failed, still serving");
    assert_eq!(serving_pid(&admin), pid);
    exchange(&mut open, 1).expect("the open connection was not cut");
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut fresh, 2).expect("new clients are served");

    // A new process that never reports ready: given up on after 10 s, and
    // meanwhile a second upgrade is refused.
    replace_with_script(&exe, "exec sleep 60");
    let first = {
        let admin = admin.clone();
        thread::spawn(move || blocking(api(&admin, None, hyper::Method::POST, "/api/v1/upgrade", None)))
    };
    proc.wait_for("upgrade: started");
    let second = blocking(api(&admin, None, hyper::Method::POST, "/api/v1/upgrade", None));
    assert_eq!(second.status, 409);
    assert!(second.text().contains("already running"), "{}", second.text());
    let first = first.join().unwrap();
    assert_eq!(first.status, 409);
    assert!(first.text().contains("not ready within 10s"), "{}", first.text());
    exchange(&mut open, 3).expect("still not cut");

    // The real executable back: the upgrade goes through.
    std::fs::copy(BIN, dir.path().join("protobalance.real")).unwrap();
    std::fs::rename(dir.path().join("protobalance.real"), &exe).unwrap();
    let ok = Command::new(BIN)
        .args(["ctl", "--admin", &admin, "upgrade"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let new = serving_pid(&admin);
    assert_ne!(new, pid);
    exchange(&mut open, 4).expect("handed over");
    // SAFETY: the pid of the balancer this test's upgrade started.
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    wait_until_blocking("the new process to stop", || exited(new));
}

#[test]
fn systemd_learns_the_new_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let next = || {
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).expect("a notification");
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if !text.lines().all(|l| l.starts_with("STATUS=")) {
                return text;
            }
        }
    };
    let node = echo_node();
    let config = ConfigText::one_service(Cluster::of("c", &[("a", node)]));
    let file = config.file();
    let mut command = Command::new(BIN);
    command
        .args(["run", "--config"])
        .arg(file.path())
        .env("NOTIFY_SOCKET", &notify_path);
    let proc = Running::start(command);
    assert!(next().starts_with("READY=1"));
    let old = proc.child.id();
    proc.signal(libc::SIGUSR2);
    let message = next();
    let new: u32 = message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"))
        .parse()
        .unwrap();
    assert_ne!(new, old);
    assert!(message.contains("READY=1"), "{message}");
    wait_until_blocking("the old process to exit", || exited(old));
    // SAFETY: the pid the new balancer reported.
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    assert!(next().starts_with("STOPPING=1"), "only the last process says it stops");
    wait_until_blocking("the new process to stop", || exited(new));
}

#[test]
fn a_balancer_that_dropped_to_its_user_upgrades_and_keeps_its_unix_admin_socket() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("dropping privileges needs root");
        return;
    }
    let (uid, _) = test_user();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
    let socket = dir.path().join("admin.sock");
    let node = echo_node();
    let config = ConfigText::one_service(Cluster::of("c", &[("a", node)]))
        .top(&format!("user = {TEST_USER:?}"))
        .admin_listen(&format!("unix:{}", socket.display()));
    let proc = Running::run(&config, &[]);
    // The new process reads the file as the user, as a reload would.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(proc.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (addr, admin) = (proc.listen_addr(), proc.admin_addr());
    proc.wait_for("running as user protobalance-test");
    let old = proc.child.id();
    let mut open = TcpStream::connect(addr).unwrap();
    open.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut open, 0).unwrap();
    proc.signal(libc::SIGUSR2);
    proc.wait_for("upgrade: the new process serves");
    let mut new = old;
    wait_until_blocking("a new process serves the unix socket", || {
        new = serving_pid(&admin);
        new != old
    });
    wait_until_blocking("the old process exits", || exited(old));
    assert!(socket.exists(), "the socket file stays: the new process serves on it");
    assert_eq!(
        proc_status(new, None, "Uid").split('\t').next(),
        Some(uid.to_string().as_str())
    );
    exchange(&mut open, 1).expect("handed over");
    // SAFETY: the pid of the balancer the upgrade started.
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    wait_until_blocking("the new process to stop", || exited(new));
}
