//! What the two bare forwarding loops share: their command line, one
//! SO_REUSEPORT listener per thread, and the threads themselves. A measuring
//! tool only (see bench/README.md): no balancing, no logging, no limits.

use std::net::SocketAddrV4;
use std::os::fd::RawFd;

/// LISTEN, NODE and THREADS (default: the CPUs this process may use).
pub struct Args {
    pub listen: SocketAddrV4,
    pub node: SocketAddrV4,
    pub threads: usize,
}

pub fn args(usage: &str) -> Args {
    let mut args = std::env::args().skip(1);
    let mut addr = || -> SocketAddrV4 {
        let text = args.next().unwrap_or_else(|| fail(usage));
        text.parse().unwrap_or_else(|_| fail(usage))
    };
    let (listen, node) = (addr(), addr());
    let threads = match args.next() {
        Some(text) => text.parse().unwrap_or_else(|_| fail(usage)),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Args { listen, node, threads }
}

fn fail(usage: &str) -> ! {
    eprintln!("{usage}");
    std::process::exit(2)
}

/// A listening socket on `addr` that other threads may bind too (the kernel
/// spreads new connections over them, as nginx's `reuseport` and the
/// balancer's workers have it).
pub fn reuseport_listener(addr: SocketAddrV4) -> std::io::Result<RawFd> {
    let one: libc::c_int = 1;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // option's pointer and length describe `one`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let len = size_of::<libc::c_int>() as libc::socklen_t;
        let opt = (&raw const one).cast();
        if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, opt, len) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sockaddr = socket_address(addr);
        let addr_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, (&raw const sockaddr).cast(), addr_len) < 0 || libc::listen(fd, 4096) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

pub fn socket_address(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Runs `worker` on `threads` threads, each with its own listener, and
/// waits for them (they run until the process is stopped).
pub fn run(args: &Args, worker: fn(RawFd, SocketAddrV4) -> std::io::Result<()>) {
    // SAFETY: a signal disposition; a peer that went away shows as EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let threads: Vec<_> = (0..args.threads)
        .map(|_| {
            let listener = reuseport_listener(args.listen).unwrap_or_else(|e| {
                eprintln!("listen on {}: {e}", args.listen);
                std::process::exit(1)
            });
            let node = args.node;
            std::thread::spawn(move || worker(listener, node))
        })
        .collect();
    for thread in threads {
        if let Ok(Err(e)) = thread.join() {
            eprintln!("worker: {e}");
            std::process::exit(1);
        }
    }
}
