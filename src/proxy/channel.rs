//! Channels: where bytes wait between being read from one socket and written
//! to the other (a user-space buffer, or a kernel pipe for splice(2)), the
//! per-thread pools they come from, and the spare first-bytes buffers of
//! `connect`. Also the one helper for a read or write that clears a socket's
//! readiness when it moved less than asked. Owns no socket: the pump and the
//! connect phase pass theirs in.

use std::cell::RefCell;
use std::io::{self, Write};
use std::thread::LocalKey;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::ForwardMode;

/// Somewhere bytes wait between being read and being written: a user-space
/// buffer (the portable copy path) or a kernel pipe for splice(2). `fill`
/// and `drain` never block: they return `WouldBlock` and clear the socket's
/// readiness, so the loop can await it.
pub(super) enum Channel {
    Copy(Buffer),
    #[cfg(target_os = "linux")]
    Splice(splice::Pipe),
}

impl Channel {
    /// A channel from this thread's pool, or a new one. `bulk` says whether
    /// the last chunk of this direction was large: with `forwarding = "auto"`,
    /// small chunks (requests, responses, chatter) go through a buffer, where
    /// two plain syscalls are cheapest, and a direction that moves big chunks
    /// switches to splice, where the bytes stay in the kernel. HAProxy's
    /// `splice-auto` follows the same idea. Off Linux, every mode copies.
    pub(super) fn take(mode: ForwardMode, bulk: bool) -> io::Result<Channel> {
        #[cfg(target_os = "linux")]
        if mode == ForwardMode::Splice || (mode == ForwardMode::Auto && bulk) {
            return splice::Pipe::take().map(Channel::Splice);
        }
        let _ = (mode, bulk);
        Ok(Channel::Copy(Buffer::take()))
    }

    /// Returns an empty channel to this thread's pool.
    pub(super) fn give_back(self) {
        match self {
            Channel::Copy(b) => b.give_back(),
            #[cfg(target_os = "linux")]
            Channel::Splice(p) => p.give_back(),
        }
    }

    /// Reads what `src` has, up to the channel's capacity; 0 means EOF.
    pub(super) fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            Channel::Copy(b) => b.fill(src),
            #[cfg(target_os = "linux")]
            Channel::Splice(p) => p.fill(src),
        }
    }

    /// Writes up to `len` waiting bytes into `dst`.
    pub(super) fn drain(&mut self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        match self {
            Channel::Copy(b) => b.drain(dst, len),
            #[cfg(target_os = "linux")]
            Channel::Splice(p) => p.drain(dst, len),
        }
    }
}

/// Idle channels kept per thread; more are closed on return.
const POOL_LIMIT: usize = 32;

/// The portable copy path: a user-space buffer.
pub(super) struct Buffer {
    /// Capacity [`BUFFER_SIZE`], never zeroed: a read fills it, so only the
    /// pages that data lands on become resident. (Zeroed, every connection
    /// with a request in flight would touch 64 KiB, and the allocator keeps
    /// the peak.)
    bytes: Vec<u8>,
    /// Where the unwritten bytes start.
    start: usize,
}

const BUFFER_SIZE: usize = 64 * 1024;

/// A thread's spare items of one kind (buffers, pipes), kept for reuse up
/// to a limit, and shed once idle: [`Spares::shed`] drops those that no take
/// reached since the last shed, so that a load's peak is not kept for good.
pub(super) struct Spares<T> {
    items: Vec<T>,
    /// The fewest items held since the last shed: the bottom `untouched` of
    /// the stack sat unused all along.
    untouched: usize,
}

impl<T> Spares<T> {
    pub(super) const fn new() -> Spares<T> {
        Spares {
            items: Vec::new(),
            untouched: 0,
        }
    }

    pub(super) fn take(&mut self) -> Option<T> {
        let item = self.items.pop();
        self.untouched = self.untouched.min(self.items.len());
        item
    }

    /// Keeps `item` unless `limit` are kept already (then it drops).
    pub(super) fn keep(&mut self, item: T, limit: usize) {
        if self.items.len() < limit {
            self.items.push(item);
        }
    }

    /// Drops the items that sat unused since the last shed; returns how many.
    pub(super) fn shed(&mut self) -> usize {
        let idle = self.untouched;
        self.items.drain(..idle);
        self.untouched = self.items.len();
        idle
    }
}

/// A thread's spare byte buffers of one capacity, kept for reuse: buffers
/// this size are too big for the allocator's fast paths.
pub(super) type SpareBuffers = RefCell<Spares<Vec<u8>>>;

/// An empty buffer with room for `capacity` bytes (not zeroed), from `spares`
/// when it has one.
pub(super) fn take_spare(spares: &'static LocalKey<SpareBuffers>, capacity: usize) -> Vec<u8> {
    spares
        .with_borrow_mut(Spares::take)
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// Keeps `buf`, emptied, in `spares` unless it already holds `limit`.
pub(super) fn keep_spare(spares: &'static LocalKey<SpareBuffers>, mut buf: Vec<u8>, limit: usize) {
    buf.clear();
    spares.with_borrow_mut(|spare| spare.keep(buf, limit));
}

thread_local! {
    static BUFFERS: SpareBuffers = const { RefCell::new(Spares::new()) };
}

/// Drops this thread's spare copy buffers and pipes that sat unused since
/// the last call; returns how many.
pub(super) fn shed_idle_spares() -> usize {
    let buffers = BUFFERS.with_borrow_mut(Spares::shed);
    #[cfg(target_os = "linux")]
    return buffers + splice::shed_idle_pipes();
    #[cfg(not(target_os = "linux"))]
    buffers
}

impl Buffer {
    fn take() -> Buffer {
        Buffer {
            bytes: take_spare(&BUFFERS, BUFFER_SIZE),
            start: 0,
        }
    }

    fn give_back(self) {
        keep_spare(&BUFFERS, self.bytes, POOL_LIMIT);
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        self.bytes.clear();
        self.start = 0;
        partial_io(src, Interest::READABLE, BUFFER_SIZE, || {
            src.try_read_buf(&mut self.bytes)
        })
    }

    fn drain(&mut self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        debug_assert_eq!(len, self.bytes.len() - self.start);
        let unwritten = &self.bytes[self.start..];
        let n = partial_io(dst, Interest::WRITABLE, len, || (&*SockRef::from(dst)).write(unwritten))?;
        self.start += n;
        Ok(n)
    }
}

/// Runs one read or write of up to `len` bytes on `socket` and, when it moved
/// fewer, clears the socket's readiness as tokio's own `poll_read` does: a
/// short read means the receive queue is empty (a short write, the send
/// buffer full), so the next call would only fail with EAGAIN. That saves a
/// syscall per chunk of request/response traffic. The readiness is cleared
/// through `try_io` with the event seen *before* the operation, so an edge
/// that arrived meanwhile is never lost.
pub(super) fn partial_io(
    socket: &TcpStream,
    interest: Interest,
    len: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut moved = None;
    let result = socket.try_io(interest, || {
        let n = op()?;
        moved = Some(n);
        if n > 0 && n < len {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (result, moved) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (result, _) => result,
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{POOL_LIMIT, Spares};

    /// Pipe capacity asked for. A large pipe moves more per splice call (fewer
    /// wake-ups per megabyte); when the user's pipe page budget
    /// (`/proc/sys/fs/pipe-user-pages-soft`) is spent the kernel refuses the
    /// resize and the pipe keeps its default size, which still works.
    const PIPE_SIZE: i32 = 1024 * 1024;

    /// A pipe pair used as an in-kernel buffer.
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        capacity: usize,
    }

    thread_local! {
        static PIPES: RefCell<Spares<Pipe>> = const { RefCell::new(Spares::new()) };
    }

    /// Closes this thread's spare pipes that sat unused since the last call.
    pub(super) fn shed_idle_pipes() -> usize {
        PIPES.with_borrow_mut(Spares::shed)
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0i32; 2];
            // SAFETY: pipe2 writes two descriptors into the array on success.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned by nobody else.
            let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: fcntl on a valid descriptor; failure leaves the default size.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
            let capacity = if size > 0 {
                size as usize
            } else {
                // SAFETY: as above; F_GETPIPE_SZ only reads.
                let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
                size.max(4096) as usize
            };
            Ok(Pipe { read, write, capacity })
        }
    }

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors, null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    impl Pipe {
        pub(super) fn take() -> io::Result<Self> {
            match PIPES.with_borrow_mut(Spares::take) {
                Some(pipe) => Ok(pipe),
                None => Pipe::new(),
            }
        }

        pub(super) fn give_back(self) {
            PIPES.with_borrow_mut(|pool| pool.keep(self, POOL_LIMIT));
        }

        pub(super) fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
            // Called only on an empty pipe, so EAGAIN can only mean "no data yet".
            src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), self.write.as_raw_fd(), self.capacity)
            })
        }

        pub(super) fn drain(&mut self, dst: &TcpStream, len: usize) -> io::Result<usize> {
            dst.try_io(Interest::WRITABLE, || {
                splice(self.read.as_raw_fd(), dst.as_raw_fd(), len)
            })
        }
    }
}

#[cfg(test)]
mod spares_tests {
    use super::Spares;

    #[test]
    fn spares_unused_through_a_shed_interval_go() {
        let mut spares = Spares::new();
        for i in 0..4 {
            spares.keep(i, 3);
        }
        assert_eq!(spares.shed(), 0, "the first shed only starts the count");
        // A load takes two and gives them back: one stayed unused all along.
        let (a, b) = (spares.take().unwrap(), spares.take().unwrap());
        spares.keep(a, 3);
        spares.keep(b, 3);
        assert_eq!(spares.shed(), 1, "the one no take reached goes");
        assert_eq!(spares.shed(), 2, "then the rest, unused through a whole interval");
        assert_eq!(spares.take(), None);
    }
}
