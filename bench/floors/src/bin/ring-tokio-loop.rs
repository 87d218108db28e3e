//! The floor of io_uring inside the balancer's runtime: one tokio task per
//! connection, as the balancer has it, whose every socket operation goes
//! through one io_uring per thread instead of epoll readiness. It tells
//! whether a data plane on io_uring can keep tokio's task model (timers,
//! the fall-over's logic and the access log staying async code) and still
//! get what uring-loop gets, or whether it needs a loop of its own.
//!
//! One current-thread runtime and one ring per thread, each with its own
//! SO_REUSEPORT listener:
//!
//! - an operation is a future: it queues its entry and sleeps until the
//!   completion carrying its slot wakes it;
//! - what the tasks queued in one pass of the runtime goes to the kernel in
//!   one `io_uring_enter`, made just before the runtime would sleep
//!   (`on_thread_park`); completions already posted are handed out there
//!   too, so the runtime goes on without sleeping;
//! - later completions wake the runtime through the ring's descriptor,
//!   registered with tokio's epoll like any socket;
//! - one multishot accept; the node's socket made, set (TCP_NODELAY) and
//!   connected through the ring; one receive at a time per direction into a
//!   16 KiB buffer from the thread's pool, sent on as it is; the sockets
//!   closed through the ring; a half-close is shutdown(2) inline (see
//!   uring-loop for why).
//!
//! `RING_TOKIO_DATA=epoll` leaves only accept, socket, connect and
//! TCP_NODELAY on the ring: the connected sockets become tokio streams and
//! tokio's copy moves the bytes and closes them, as in tokio-loop. It
//! splits the ring's gain between setting a connection up and the rest.
//! `RING_TOKIO_SETUP=epoll` is the other half: tokio accepts, connects and
//! closes (the streams registered with its epoll, as the balancer's are),
//! and only the bytes go through the ring; `RING_TOKIO_SETUP=epoll-out`
//! takes the streams out of tokio's epoll before the ring pumps. They tell
//! whether a pump on the ring pays behind today's setting-up.
//!
//! The ring runs its completions' task work as the kernel posts them, not
//! deferred (`DEFER_TASKRUN`): deferred work runs only inside an
//! `io_uring_enter` that asks for completions, and a runtime asleep in
//! epoll_wait learns of it never through the ring's descriptor and late
//! through a registered eventfd (both tried; docs/performance.md).
//!
//! An operation's future is never dropped while in flight (no task here is
//! cancelled: a failing direction shuts both sockets down, which ends the
//! other direction's receive), so the buffers it points at outlive it.
//!
//! Never balancing, never logging, never limiting: a measuring tool only.
//!
//! Usage: ring-tokio-loop LISTEN NODE [THREADS]

use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::Fd;
use io_uring::{IoUring, cqueue};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Poll, Waker};
use tokio::io::unix::AsyncFd;

const BUF_SIZE: usize = 16 * 1024;
/// The user data of operations nobody waits for (TCP_NODELAY, close).
const IGNORED: u64 = u64::MAX;
static ONE: libc::c_int = 1;

enum Slot {
    Free,
    /// Submitted; the waker of the task that waits for it.
    Waiting(Option<Waker>),
    Done(i32),
    /// A multishot operation: its completions so far, and who waits.
    Multi(VecDeque<i32>, Option<Waker>),
}

struct Driver {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    buffers: Vec<Box<[u8]>>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

fn with<T>(f: impl FnOnce(&mut Driver) -> T) -> T {
    DRIVER.with(|d| f(d.borrow_mut().as_mut().expect("the thread's ring")))
}

impl Driver {
    fn push(&mut self, entry: &Entry) {
        // SAFETY: every entry points at memory that outlives its operation
        // (see the module's docs).
        while unsafe { self.ring.submission().push(entry) }.is_err() {
            self.ring.submit().expect("io_uring_enter");
        }
    }

    fn slot(&mut self, slot: Slot) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    /// Hands out every completion posted so far; the wakes land in the
    /// runtime's own queue (this is its thread).
    fn reap(&mut self) {
        let mut wakers = Vec::new();
        for cqe in self.ring.completion() {
            if cqe.user_data() == IGNORED {
                continue;
            }
            let slot = &mut self.slots[cqe.user_data() as usize];
            match slot {
                Slot::Waiting(waker) => {
                    wakers.extend(waker.take());
                    *slot = Slot::Done(cqe.result());
                }
                Slot::Multi(results, waker) => {
                    results.push_back(cqe.result());
                    if !cqueue::more(cqe.flags()) {
                        results.push_back(-libc::ECANCELED);
                    }
                    wakers.extend(waker.take());
                }
                Slot::Free | Slot::Done(_) => unreachable!("a completion for no operation"),
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Before the runtime sleeps: submits what its tasks queued, and hands
    /// out what completed meanwhile.
    fn before_park(&mut self) {
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
        self.reap();
    }
}

/// Submits `entry` and waits for its completion's result.
async fn op(entry: Entry) -> i32 {
    let slot = with(|d| {
        let slot = d.slot(Slot::Waiting(None));
        d.push(&entry.user_data(slot as u64));
        slot
    });
    poll_fn(|cx| {
        with(|d| match &mut d.slots[slot] {
            Slot::Done(result) => {
                let result = *result;
                d.slots[slot] = Slot::Free;
                d.free.push(slot);
                Poll::Ready(result)
            }
            Slot::Waiting(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => unreachable!("a single operation's slot"),
        })
    })
    .await
}

fn fire_and_forget(entry: Entry) {
    with(|d| d.push(&entry.user_data(IGNORED)));
}

fn set_nodelay(fd: RawFd) {
    let optlen = size_of::<libc::c_int>() as u32;
    let level = libc::IPPROTO_TCP as u32;
    let option = libc::TCP_NODELAY as u32;
    fire_and_forget(opcode::SetSockOpt::new(Fd(fd), level, option, (&raw const ONE).cast(), optlen).build());
}

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: the connection's own socket, open until its task closes it.
    unsafe { libc::shutdown(fd, how) };
}

/// One direction: receives from `from` and sends it all on to `to`, then
/// passes the half-close on; on an error, ends both directions.
async fn pipe(from: RawFd, to: RawFd) {
    let mut buffer = with(|d| d.buffers.pop()).unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice());
    loop {
        let received = op(opcode::Recv::new(Fd(from), buffer.as_mut_ptr(), BUF_SIZE as u32).build()).await;
        if received == 0 {
            shutdown(to, libc::SHUT_WR);
            break;
        }
        let mut sent = 0;
        while received > 0 && sent < received {
            let rest = &buffer[sent as usize..received as usize];
            let send = opcode::Send::new(Fd(to), rest.as_ptr(), rest.len() as u32).flags(libc::MSG_NOSIGNAL);
            match op(send.build()).await {
                n if n > 0 => sent += n,
                _ => break,
            }
        }
        if received < 0 || sent < received {
            shutdown(from, libc::SHUT_RDWR);
            shutdown(to, libc::SHUT_RDWR);
            break;
        }
    }
    with(|d| d.buffers.push(buffer));
}

/// What goes through the ring, from the environment (the module's docs).
#[derive(Clone, Copy, PartialEq)]
enum Split {
    /// Everything (neither switch set).
    Whole,
    /// RING_TOKIO_DATA=epoll: accept, socket, connect and TCP_NODELAY;
    /// the bytes and the close are tokio's, as in tokio-loop.
    SetupOnly,
    /// RING_TOKIO_SETUP=epoll: the bytes, behind tokio's accept, connect
    /// and close, the streams staying registered with tokio's epoll.
    BytesOnly,
    /// RING_TOKIO_SETUP=epoll-out: the same, the streams taken out of
    /// tokio's epoll before the ring pumps.
    BytesOutOfEpoll,
}

fn split() -> Split {
    static SPLIT: std::sync::OnceLock<Split> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(|| {
        match (
            std::env::var("RING_TOKIO_SETUP").as_deref(),
            std::env::var("RING_TOKIO_DATA").as_deref(),
        ) {
            (Ok("epoll"), _) => Split::BytesOnly,
            (Ok("epoll-out"), _) => Split::BytesOutOfEpoll,
            (_, Ok("epoll")) => Split::SetupOnly,
            _ => Split::Whole,
        }
    })
}

async fn accept_on_epoll(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    let listener = floors::tokio_listener(listener)?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(pump_on_ring(client, node));
    }
}

/// Connects through tokio and pumps through the ring; the sockets close
/// as the streams drop.
async fn pump_on_ring(client: tokio::net::TcpStream, node: SocketAddrV4) {
    let Some(node) = floors::connect_nodelay(&client, node).await else {
        return;
    };
    let (c, n) = (client.as_raw_fd(), node.as_raw_fd());
    if split() == Split::BytesOutOfEpoll {
        // Open, out of tokio's epoll, until they drop after the pump.
        let (Ok(_client), Ok(_node)) = (client.into_std(), node.into_std()) else {
            return;
        };
        let ((), ()) = tokio::join!(pipe(c, n), pipe(n, c));
    } else {
        let ((), ()) = tokio::join!(pipe(c, n), pipe(n, c));
    }
}

/// The flags of the sockets the ring makes: tokio's want O_NONBLOCK.
fn socket_flags() -> libc::c_int {
    libc::SOCK_CLOEXEC
        | if split() == Split::SetupOnly {
            libc::SOCK_NONBLOCK
        } else {
            0
        }
}

async fn forward_on_epoll(client: RawFd, node: RawFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: both sockets are this task's own; the streams close them.
    let (client, node) = unsafe {
        (
            std::net::TcpStream::from_raw_fd(client),
            std::net::TcpStream::from_raw_fd(node),
        )
    };
    if let (Ok(mut client), Ok(mut node)) = (
        tokio::net::TcpStream::from_std(client),
        tokio::net::TcpStream::from_std(node),
    ) {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
    }
}

async fn forward(client: RawFd, node: &'static libc::sockaddr_in) {
    set_nodelay(client);
    let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM | socket_flags(), 0);
    let node_fd = op(socket.build()).await;
    if node_fd >= 0 {
        set_nodelay(node_fd);
        let addr_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let connected = op(opcode::Connect::new(Fd(node_fd), (&raw const *node).cast(), addr_len).build()).await == 0;
        if connected && split() == Split::SetupOnly {
            return forward_on_epoll(client, node_fd).await;
        }
        if connected {
            let (a, b) = tokio::join!(pipe(client, node_fd), pipe(node_fd, client));
            let ((), ()) = (a, b);
        }
        fire_and_forget(opcode::Close::new(Fd(node_fd)).build());
    }
    fire_and_forget(opcode::Close::new(Fd(client)).build());
}

async fn accept_loop(listener: RawFd, node: &'static libc::sockaddr_in) -> std::io::Result<()> {
    let slot = with(|d| {
        let slot = d.slot(Slot::Multi(VecDeque::new(), None));
        d.push(
            &opcode::AcceptMulti::new(Fd(listener))
                .flags(socket_flags())
                .build()
                .user_data(slot as u64),
        );
        slot
    });
    loop {
        let accepted = poll_fn(|cx| {
            with(|d| match &mut d.slots[slot] {
                Slot::Multi(results, waker) => match results.pop_front() {
                    Some(result) => Poll::Ready(result),
                    None => {
                        *waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
                _ => unreachable!("the accept's slot"),
            })
        })
        .await;
        match accepted {
            fd if fd >= 0 => drop(tokio::spawn(forward(fd, node))),
            e if e == -libc::ECANCELED => {
                // The multishot accept ended: armed again.
                with(|d| {
                    d.push(
                        &opcode::AcceptMulti::new(Fd(listener))
                            .flags(socket_flags())
                            .build()
                            .user_data(slot as u64),
                    )
                });
            }
            _ => {}
        }
    }
}

/// Wakes the runtime for completions posted while it slept.
async fn completions(ring_fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the ring lives in the thread's DRIVER for the thread's life,
    // so its descriptor outlives this registration.
    let ring = unsafe { AsyncFd::register_with_interest(ring_fd, tokio::io::Interest::READABLE)? };
    loop {
        let mut ready = ring.readable().await?;
        ready.clear_ready();
        with(Driver::reap);
    }
}

fn worker(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    let ring = IoUring::builder().setup_cqsize(16384).build(4096)?;
    let ring_fd = ring.as_raw_fd();
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            buffers: Vec::new(),
        })
    });
    let sockaddr: &'static libc::sockaddr_in = Box::leak(Box::new(floors::socket_address(node)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .on_thread_park(|| with(Driver::before_park))
        .build()?;
    runtime.block_on(async move {
        let accepting = match split() {
            Split::BytesOnly | Split::BytesOutOfEpoll => tokio::spawn(accept_on_epoll(listener, node)),
            Split::Whole | Split::SetupOnly => tokio::spawn(accept_loop(listener, sockaddr)),
        };
        let waking = tokio::spawn(completions(ring_fd));
        tokio::select! {
            r = accepting => r.expect("the accept loop"),
            r = waking => r.expect("the completions"),
        }
    })
}

fn main() {
    let args = floors::args("usage: ring-tokio-loop LISTEN NODE [THREADS]");
    floors::run(&args, worker);
}
