//! Out of descriptors: with RLIMIT_NOFILE at what the balancer holds, its
//! accept fails with EMFILE; it must back off instead of spinning, keep
//! serving the connections it has, and accept the client waiting in the
//! listener's backlog once descriptors free up.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// How many of the descriptor numbers below `limit` process `pid` has in
/// use. Only those count against a limit of `limit`: a descriptor inherited
/// with a higher number (a build tool's pipe) does not.
fn used_below(pid: u32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|&fd| fd < limit)
        .count()
}

/// Sets the soft RLIMIT_NOFILE of the running process `pid` (the hard limit
/// stays, so that the soft one may be raised again).
fn set_descriptor_limit(pid: u32, limit: usize) {
    let pid = pid as libc::pid_t;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child, reading into a valid rlimit.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above, setting a soft limit under the hard one.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Reads the node's greeting through `client`, failing the test unless it comes.
fn assert_greeted(mut client: TcpStream, what: &str) -> TcpStream {
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut greeting = [0u8; 2];
    client
        .read_exact(&mut greeting)
        .unwrap_or_else(|e| panic!("{what}: no greeting from the node ({e})"));
    assert_eq!(&greeting, b"hi", "{what}");
    client
}

/// User + system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state field (index 0 here = field 3).
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_backs_off_and_recovers() {
    let node = blocking(holding_backend());
    // One worker: a finished connection's two descriptors are then closed
    // before its accept loop can run again, so descriptors free up two at a
    // time (with two workers, a retry on one could see a single descriptor
    // free between the two closes on the other, accept the waiting client and
    // have none left for its node).
    let config = ConfigText::one_service(Cluster::of("c", &[("a", node)])).top("threads = 1");
    let balancer = Running::run(&config, &[]);
    let addr: SocketAddr = balancer.listen_addr();
    // Ready: every listener is open, and start-up's own descriptors (those
    // it reads /proc through) are closed, so that none but the clients' come
    // and go while the test counts them.
    balancer.ready();
    let pid = balancer.child.id();

    // Limit the balancer to a few descriptors more than it holds, then fill
    // them: each served client costs two (its own and the node's). While two
    // are free a client must be served; with one free it would be accepted
    // and closed (no descriptor for the node side), so the limit is raised
    // by one to end at exactly none free.
    let mut limit = used_below(pid, usize::MAX) + 12;
    set_descriptor_limit(pid, limit);
    let mut held = Vec::new();
    loop {
        let open = used_below(pid, limit);
        if open + 2 <= limit {
            let client = TcpStream::connect(addr).unwrap();
            held.push(assert_greeted(
                client,
                &format!("client {} while descriptors are free", held.len()),
            ));
        } else if open + 1 == limit {
            limit += 1;
            set_descriptor_limit(pid, limit);
        } else {
            break;
        }
    }

    // Out of descriptors: the next client's accept fails, and it waits in the backlog.
    let waiting = TcpStream::connect(addr).unwrap();
    balancer.wait_for("accept failed");

    // Idle, not spinning: a busy retry loop would burn a whole CPU. The
    // second is a measuring window, not a wait for anything.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "the balancer used {used} ticks of CPU in 1 s while out of descriptors"
    );

    // Free some descriptors: the waiting client is served, then new ones are.
    held.truncate(held.len() - 4);
    let _waiting = assert_greeted(waiting, "the client that waited in the backlog");
    wait_until_blocking("the balancer to close the connections the clients left", || {
        used_below(pid, limit) + 6 <= limit
    });
    for i in 0..2 {
        assert_greeted(
            TcpStream::connect(addr).unwrap(),
            &format!("new client {i} after the recovery"),
        );
    }
}
