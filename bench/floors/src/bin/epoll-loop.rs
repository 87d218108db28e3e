//! The floor an epoll forwarder reaches on this machine: the same bare loop
//! as uring-loop, on the readiness model the balancer (tokio, mio) uses
//! today, written to ask the kernel as little as epoll allows. One epoll
//! instance per thread, each with its own SO_REUSEPORT listener:
//!
//! - edge-triggered registrations, made once per socket (no re-arming): a
//!   read shorter than the buffer means the socket was emptied, and any byte
//!   that arrives later raises a new edge, so no read ever ends in EAGAIN on
//!   the request path (unless the event says the peer's FIN is in: then it
//!   reads on to the end of the stream);
//! - data is written on as soon as it is read, from one 16 KiB buffer per
//!   direction; only a write the socket can't take whole waits for EPOLLOUT;
//! - the node is connected without blocking as soon as the client is
//!   accepted (accept4, setsockopt TCP_NODELAY on both, connect).
//!
//! Never balancing, never logging, never limiting: a measuring tool only.
//!
//! Usage: epoll-loop LISTEN NODE [THREADS]

use std::net::SocketAddrV4;
use std::os::fd::RawFd;

const BUF_SIZE: usize = 16 * 1024;
/// The listener's token. A socket's token is its descriptor and, above it,
/// the generation of its connection: an event that was already waiting for
/// a socket closed earlier in the same batch must not act on the socket
/// that reused the descriptor.
const LISTENER: u64 = u64::MAX;

/// One socket of a connection: what was read from its peer and not yet
/// written to it, and how its own reading has ended.
struct Side {
    generation: u32,
    peer: RawFd,
    /// Bytes from the peer waiting for this socket to take them.
    pending: Vec<u8>,
    /// This socket's FIN was read (or it failed).
    ended: bool,
    /// Its FIN has arrived (EPOLLRDHUP), read or not.
    fin: bool,
    connected: bool,
}

struct Worker {
    epoll: RawFd,
    listener: RawFd,
    node: libc::sockaddr_in,
    /// Indexed by descriptor.
    sides: Vec<Option<Side>>,
    buffer: Vec<u8>,
    generation: u32,
}

// SAFETY (for every libc call below): the descriptors are this worker's own
// and live until it closes them; pointers and lengths describe live buffers.
impl Worker {
    fn register(&self, fd: RawFd) {
        let token = (u64::from(self.generation) << 32) | fd as u64;
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut event) };
    }

    fn accept(&mut self) {
        loop {
            let client = unsafe {
                libc::accept4(
                    self.listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if client < 0 {
                return;
            }
            let node = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if node < 0 {
                unsafe { libc::close(client) };
                continue;
            }
            set_nodelay(client);
            set_nodelay(node);
            let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = unsafe { libc::connect(node, (&raw const self.node).cast(), len) };
            if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
                unsafe { libc::close(client) };
                unsafe { libc::close(node) };
                continue;
            }
            let need = client.max(node) as usize + 1;
            if self.sides.len() < need {
                self.sides.resize_with(need, || None);
            }
            self.generation = self.generation.wrapping_add(1);
            let generation = self.generation;
            self.sides[client as usize] = Some(Side {
                generation,
                peer: node,
                pending: Vec::new(),
                ended: false,
                fin: false,
                connected: true,
            });
            self.sides[node as usize] = Some(Side {
                generation,
                peer: client,
                pending: Vec::new(),
                ended: false,
                fin: false,
                connected: false,
            });
            self.register(node);
            self.register(client);
        }
    }

    fn ready(&mut self, token: u64, events: u32) {
        let (fd, generation) = (token as u32 as RawFd, (token >> 32) as u32);
        let Some(side) = self.sides.get_mut(fd as usize).and_then(Option::as_mut) else {
            return;
        };
        if side.generation != generation {
            return;
        }
        let peer = side.peer;
        if events & libc::EPOLLERR as u32 != 0 {
            return self.close(fd);
        }
        if events & libc::EPOLLOUT as u32 != 0 {
            side.connected = true;
            if !self.flush(fd) {
                return self.close(fd);
            }
            // The node just connected: what the client sent meanwhile.
            if !self.forward(peer) {
                return self.close(fd);
            }
        }
        let fin = events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
        if fin {
            self.sides[fd as usize].as_mut().expect("live").fin = true;
        }
        if (events & libc::EPOLLIN as u32 != 0 || fin) && !self.forward(fd) {
            return self.close(fd);
        }
        let (a, b) = (&self.sides[fd as usize], &self.sides[peer as usize]);
        if let (Some(a), Some(b)) = (a, b)
            && a.ended
            && b.ended
            && a.pending.is_empty()
            && b.pending.is_empty()
        {
            self.close(fd);
        }
    }

    /// Reads from `fd` and writes to its peer until `fd` is empty (once its
    /// FIN is in: until its end) or the peer is full; false when the
    /// connection is to be closed.
    fn forward(&mut self, fd: RawFd) -> bool {
        let Some(side) = self.sides[fd as usize].as_ref() else {
            return true;
        };
        let (peer, fin) = (side.peer, side.fin);
        let peer_side = self.sides[peer as usize].as_ref().expect("a pair");
        if side.ended || !peer_side.connected || !peer_side.pending.is_empty() {
            return true;
        }
        loop {
            let n = unsafe { libc::read(fd, self.buffer.as_mut_ptr().cast(), BUF_SIZE) };
            if n == 0 {
                self.sides[fd as usize].as_mut().expect("live").ended = true;
                unsafe { libc::shutdown(peer, libc::SHUT_WR) };
                return true;
            }
            if n < 0 {
                return std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
            }
            let n = n as usize;
            let written = unsafe { libc::send(peer, self.buffer.as_ptr().cast(), n, libc::MSG_NOSIGNAL) };
            if written < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return false;
            }
            let written = written.max(0) as usize;
            if written < n {
                let rest = self.buffer[written..n].to_vec();
                self.sides[peer as usize].as_mut().expect("a pair").pending = rest;
                return true;
            }
            if n < BUF_SIZE && !fin {
                return true;
            }
        }
    }

    /// Writes what waits for `fd`; false when the connection is to be closed.
    fn flush(&mut self, fd: RawFd) -> bool {
        let side = self.sides[fd as usize].as_mut().expect("live");
        if side.pending.is_empty() {
            return true;
        }
        let written = unsafe { libc::send(fd, side.pending.as_ptr().cast(), side.pending.len(), libc::MSG_NOSIGNAL) };
        if written < 0 {
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
        }
        side.pending.drain(..written as usize);
        let (peer, drained) = (side.peer, side.pending.is_empty());
        if drained {
            let peer_ended = self.sides[peer as usize].as_ref().is_some_and(|p| p.ended);
            if peer_ended {
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            }
            return self.forward(peer);
        }
        true
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(side) = self.sides[fd as usize].take() {
            self.sides[side.peer as usize] = None;
            unsafe { libc::close(side.peer) };
            unsafe { libc::close(fd) };
        }
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the option's pointer and length describe `one`.
    unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&raw const one).cast(), len) };
}

fn worker(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    // SAFETY: see the impl; the listener becomes non-blocking for accept4's loop.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error());
    }
    unsafe { libc::fcntl(listener, libc::F_SETFL, libc::O_NONBLOCK) };
    let mut w = Worker {
        epoll,
        listener,
        node: floors::socket_address(node),
        sides: Vec::new(),
        buffer: vec![0; BUF_SIZE],
        generation: 0,
    };
    let mut listen = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: LISTENER,
    };
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, listener, &mut listen) };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as libc::c_int, -1) };
        for event in &events[..n.max(0) as usize] {
            let (token, flags) = (event.u64, event.events);
            if token == LISTENER {
                w.accept();
            } else {
                w.ready(token, flags);
            }
        }
    }
}

fn main() {
    let args = floors::args("usage: epoll-loop LISTEN NODE [THREADS]");
    floors::run(&args, worker);
}
