//! What the bare forwarding loops share: their command line, one
//! SO_REUSEPORT listener per thread, the threads themselves, and for the
//! loops on tokio the listener and the node's connection. A measuring tool
//! only (see bench/README.md): no balancing, no logging, no limits.

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

/// This thread's listener (from [`reuseport_listener`]) as a tokio
/// listener; called inside the thread's runtime.
pub fn tokio_listener(fd: RawFd) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: the listener is this thread's own, handed over once.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// The node's connection for `client`, both sockets with TCP_NODELAY, as
/// every loop has them; None if either fails.
pub async fn connect_nodelay(client: &tokio::net::TcpStream, node: SocketAddrV4) -> Option<tokio::net::TcpStream> {
    let node = tokio::net::TcpStream::connect(node).await.ok()?;
    (client.set_nodelay(true).is_ok() && node.set_nodelay(true).is_ok()).then_some(node)
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
