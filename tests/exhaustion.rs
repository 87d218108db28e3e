//! Out of descriptors: with a low RLIMIT_NOFILE the balancer's accept fails
//! with EMFILE; it must back off instead of spinning, keep serving the
//! connections it has, and accept the waiting clients once descriptors free up.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{BIN, PATIENCE, Running};

/// A node that greets with "hi" and holds the connection until the client closes.
fn holding_backend() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let _ = s.write_all(b"hi");
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            });
        }
    });
    addr
}

/// Connects and waits up to `wait` for the greeting.
fn greeted(addr: SocketAddr, wait: Duration) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2];
    let ok = s.read_exact(&mut buf).is_ok();
    (s, ok)
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state field (index 0 here = field 3).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Runs the balancer under `nofile` descriptors, exhausts them, checks it
/// idles and recovers; returns whether an accept failed (EMFILE) on the way.
fn exhaust_and_recover(nofile: u64) -> bool {
    let node = holding_backend();
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:0\"]\ncluster = \"c\"\n\
             [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"a\"\naddress = \"{node}\"\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(BIN);
    command.args(["run", "--config"]).arg(config.path());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proc = Running::start(command);
    let addr = proc.listen_addr();

    // Fill the descriptor table: each served client costs the balancer two.
    // The first client not served either waits in the backlog (accept fails:
    // EMFILE) or is closed at once (one descriptor left, none for the node side).
    let mut held = Vec::new();
    let mut waiting = loop {
        assert!(
            held.len() < nofile as usize,
            "the balancer never ran out of descriptors"
        );
        let (s, ok) = greeted(addr, Duration::from_secs(2));
        if !ok {
            break s;
        }
        held.push(s);
    };

    // Idle, not spinning: a busy retry loop would burn a whole CPU.
    let before = cpu_ticks(proc.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(proc.child.id()) - before;
    assert!(
        used < 30,
        "the balancer used {used} ticks of CPU in 1 s while out of descriptors"
    );

    // Free some descriptors: a waiting client is served, and so are new ones.
    held.truncate(held.len() - 4);
    waiting.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 2];
    if waiting.read(&mut buf).unwrap_or(0) > 0 {
        assert_eq!(&buf, b"hi", "the client that waited in the backlog is served");
    }
    let served = (0..50).any(|_| {
        let ok = greeted(addr, PATIENCE).1;
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(served, "new clients are served once descriptors free up");
    proc.saw("accept failed")
}

/// Whether the free descriptors end at zero (accept fails) or one (the node
/// side fails) depends on how many the process uses itself, so try two
/// neighbouring limits: one of them makes accept fail.
#[test]
fn out_of_descriptors_backs_off_and_recovers() {
    let accept_failed: Vec<bool> = [40, 41].into_iter().map(exhaust_and_recover).collect();
    assert!(
        accept_failed.contains(&true),
        "no accept failed with EMFILE at either limit: {accept_failed:?}"
    );
}
