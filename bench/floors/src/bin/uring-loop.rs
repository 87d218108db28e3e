//! The floor an io_uring forwarder reaches on this machine: what the
//! balancer's small-message path could gain by moving to io_uring, measured
//! before any rewrite (bench/ab's `uring` variant, beside `epoll`, the same
//! loop on epoll). One ring per thread, each with its own SO_REUSEPORT
//! listener, and everything asked of the kernel through the ring:
//!
//! - one multishot accept;
//! - the node's socket made, both sockets set TCP_NODELAY (a uring command)
//!   and the node connected, through the ring;
//! - one multishot receive per socket, drawing 16 KiB buffers from a ring of
//!   provided buffers, each buffer sent on as it is and given back once sent;
//! - every submission of one pass batched into the one io_uring_enter that
//!   waits for the next completions (DEFER_TASKRUN, SINGLE_ISSUER, the ring's
//!   own descriptor registered).
//!
//! - the sockets closed through the ring; only a half-close (shutdown) is a
//!   system call of its own.
//!
//! Why the sockets are plain descriptors and not registered ones (accept
//! and socket can put them straight into the ring's table): the kernel runs
//! every IORING_OP_SHUTDOWN on a worker thread of its own, so forwarding a
//! half-close through the ring costs a thread hand-off per direction, and a
//! shutdown still queued when the descriptor is closed and its slot reused
//! lands on the next connection. A plain descriptor takes shutdown(2)
//! inline. The ring's own descriptor is registered.
//!
//! Never balancing, never logging, never limiting: a measuring tool only.
//!
//! Usage: uring-loop LISTEN NODE [THREADS]

use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue::Entry;
use io_uring::types::{BufRingEntry, Fd};
use io_uring::{IoUring, SubmissionQueue, Submitter};
use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

const BUF_SIZE: usize = 16 * 1024;
/// Provided buffers per ring (a power of two): enough for every connection
/// of the harness's loads to hold one in each direction.
const BUFS: u16 = 2048;
const BUF_GROUP: u16 = 0;
/// Chunks one direction may hold before its receive is paused (cancelled,
/// armed again once they are sent): a multishot receive would otherwise
/// draw every provided buffer for one fast sender with a slow receiver.
const MAX_QUEUED: usize = 16;
static ONE: libc::c_int = 1;

/// What a completion is for: the low byte of its user data (the rest is the
/// connection's index).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Accept = 1,
    Socket,
    Connect,
    /// Received from side 0 (the client) or 1 (the node).
    Recv0,
    Recv1,
    /// Sent what side 0 or 1 had sent.
    Send0,
    Send1,
    /// Set-and-forget: TCP_NODELAY, close.
    Ignore,
}

impl Op {
    fn from(byte: u8) -> Op {
        [
            Op::Accept,
            Op::Socket,
            Op::Connect,
            Op::Recv0,
            Op::Recv1,
            Op::Send0,
            Op::Send1,
            Op::Ignore,
        ][usize::from(byte) - 1]
    }
}

fn user_data(conn: usize, op: Op) -> u64 {
    ((conn as u64) << 8) | op as u64
}

/// Bytes received from one side and not yet all sent to the other.
struct Chunk {
    bid: u16,
    sent: u32,
    len: u32,
}

#[derive(Default)]
struct Conn {
    /// The client's socket, the node's.
    fds: [Option<RawFd>; 2],
    /// Operations submitted and not yet completed for good.
    in_flight: u32,
    /// Received from side i, to be sent to the other side.
    queue: [VecDeque<Chunk>; 2],
    sending: [bool; 2],
    receiving: [bool; 2],
    /// Receiving stopped on purpose: the queue is full, or no buffer was left.
    paused: [bool; 2],
    ended: [bool; 2],
    closing: bool,
    live: bool,
    /// Tells this connection from an earlier one in the same slot.
    serial: u64,
}

/// The ring of provided buffers and the memory behind it.
struct Buffers {
    ring: *mut BufRingEntry,
    memory: Vec<u8>,
    tail: u16,
}

impl Buffers {
    fn new(submitter: &Submitter) -> std::io::Result<Buffers> {
        let bytes = usize::from(BUFS) * size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping (page-aligned, as the kernel
        // wants a buffer ring), checked before use and never unmapped: it
        // lives as long as the ring that reads it.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut buffers = Buffers {
            ring: ring.cast(),
            memory: vec![0; usize::from(BUFS) * BUF_SIZE],
            tail: 0,
        };
        // SAFETY: the mapping holds BUFS entries and outlives the ring.
        unsafe { submitter.register_buf_ring_with_flags(ring as u64, BUFS, BUF_GROUP, 0)? };
        for bid in 0..BUFS {
            buffers.give_back(bid);
        }
        Ok(buffers)
    }

    fn address(&self, bid: u16, offset: u32) -> *const u8 {
        self.memory[usize::from(bid) * BUF_SIZE + offset as usize..].as_ptr()
    }

    /// Hands buffer `bid` back to the kernel.
    fn give_back(&mut self, bid: u16) {
        let address = self.address(bid, 0) as u64;
        // SAFETY: the slot is inside the mapping (masked index); the tail
        // lives in the first entry's reserved field, published with Release
        // so that the kernel sees the entry before the new tail.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(self.tail & (BUFS - 1)));
            entry.set_addr(address);
            entry.set_len(BUF_SIZE as u32);
            entry.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

struct Worker<'a> {
    submitter: Submitter<'a>,
    sq: SubmissionQueue<'a>,
    listener: RawFd,
    node: Box<libc::sockaddr_in>,
    conns: Vec<Conn>,
    free: Vec<usize>,
    buffers: Buffers,
    /// Receives stopped for want of a buffer: connection, side, serial.
    starved: Vec<(usize, usize, u64)>,
    serial: u64,
}

impl Worker<'_> {
    fn push(&mut self, entry: Entry) {
        // SAFETY: every entry points at memory that outlives its operation:
        // the worker's buffers, its node address, the ONE constant.
        while unsafe { self.sq.push(&entry) }.is_err() {
            self.sq.sync();
            self.submitter.submit().expect("io_uring_enter");
            self.sq.sync();
        }
    }

    fn accept(&mut self) {
        let accept = opcode::AcceptMulti::new(Fd(self.listener)).build();
        self.push(accept.user_data(user_data(0, Op::Accept)));
    }

    fn set_nodelay(&mut self, fd: RawFd) {
        let optlen = size_of::<libc::c_int>() as u32;
        let nodelay = opcode::SetSockOpt::new(
            Fd(fd),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            (&raw const ONE).cast(),
            optlen,
        );
        self.push(nodelay.build().user_data(user_data(0, Op::Ignore)));
    }

    fn submit(&mut self, conn: usize, op: Op, entry: Entry) {
        self.conns[conn].in_flight += 1;
        self.push(entry.user_data(user_data(conn, op)));
    }

    fn completed(&mut self, data: u64, result: i32, flags: u32) {
        let (conn, op) = ((data >> 8) as usize, Op::from(data as u8));
        match op {
            Op::Accept => return self.accepted(result, flags),
            Op::Ignore => return,
            Op::Socket | Op::Connect => {
                self.conns[conn].in_flight -= 1;
                match (op, result) {
                    (_, r) if r < 0 || self.conns[conn].closing => self.close(conn),
                    (Op::Socket, fd) => self.connect(conn, fd),
                    _ => (0..2).for_each(|side| self.receive(conn, side)),
                }
            }
            Op::Recv0 | Op::Recv1 => self.received(conn, op as usize - Op::Recv0 as usize, result, flags),
            Op::Send0 | Op::Send1 => self.sent(conn, op as usize - Op::Send0 as usize, result),
        }
        self.finish(conn);
    }

    fn accepted(&mut self, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept();
        }
        if result < 0 {
            return;
        }
        let conn = self.free.pop().unwrap_or_else(|| {
            self.conns.push(Conn::default());
            self.conns.len() - 1
        });
        self.serial += 1;
        self.conns[conn] = Conn {
            live: true,
            serial: self.serial,
            fds: [Some(result), None],
            ..Conn::default()
        };
        self.set_nodelay(result);
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        self.submit(conn, Op::Socket, socket.build());
    }

    fn connect(&mut self, conn: usize, node_fd: RawFd) {
        self.conns[conn].fds[1] = Some(node_fd);
        self.set_nodelay(node_fd);
        let addr_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let connect = opcode::Connect::new(Fd(node_fd), (&raw const *self.node).cast(), addr_len);
        self.submit(conn, Op::Connect, connect.build());
    }

    fn receive(&mut self, conn: usize, side: usize) {
        let c = &mut self.conns[conn];
        if c.closing || c.ended[side] || c.receiving[side] || c.paused[side] {
            return;
        }
        c.receiving[side] = true;
        let fd = Fd(c.fds[side].expect("connected"));
        let op = if side == 0 { Op::Recv0 } else { Op::Recv1 };
        self.submit(conn, op, opcode::RecvMulti::new(fd, BUF_GROUP).build());
    }

    fn received(&mut self, conn: usize, side: usize, result: i32, flags: u32) {
        if !cqueue::more(flags) {
            let c = &mut self.conns[conn];
            c.in_flight -= 1;
            c.receiving[side] = false;
        }
        match result {
            len if len > 0 => {
                let bid = cqueue::buffer_select(flags).expect("a provided buffer");
                let c = &mut self.conns[conn];
                c.queue[side].push_back(Chunk {
                    bid,
                    sent: 0,
                    len: len as u32,
                });
                if c.queue[side].len() >= MAX_QUEUED && !c.paused[side] {
                    c.paused[side] = true;
                    if c.receiving[side] {
                        let recv = user_data(conn, if side == 0 { Op::Recv0 } else { Op::Recv1 });
                        self.push(
                            opcode::AsyncCancel::new(recv)
                                .build()
                                .user_data(user_data(0, Op::Ignore)),
                        );
                    }
                }
                self.send(conn, side);
                if !cqueue::more(flags) {
                    self.receive(conn, side);
                }
            }
            0 => {
                self.conns[conn].ended[side] = true;
                self.send(conn, side);
            }
            e if e == -libc::ENOBUFS => {
                let c = &mut self.conns[conn];
                c.paused[side] = true;
                self.starved.push((conn, side, c.serial));
            }
            // Only a pause cancels a receive: armed again unless still paused.
            e if e == -libc::ECANCELED => self.receive(conn, side),
            _ => self.close(conn),
        }
    }

    /// Sends the oldest chunk received from `side` on to the other side,
    /// unless a send is in flight already; when all is sent and `side` has
    /// ended, half-closes the other side as the client or node did.
    fn send(&mut self, conn: usize, side: usize) {
        let c = &mut self.conns[conn];
        if c.sending[side] || c.closing {
            return;
        }
        let peer = c.fds[1 - side].expect("connected");
        let Some(chunk) = c.queue[side].front() else {
            if c.ended[side] {
                // SAFETY: the connection's own socket, open until finish().
                unsafe { libc::shutdown(peer, libc::SHUT_WR) };
            }
            return;
        };
        c.sending[side] = true;
        let address = self.buffers.address(chunk.bid, chunk.sent);
        let send = opcode::Send::new(Fd(peer), address, chunk.len - chunk.sent)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.submit(conn, if side == 0 { Op::Send0 } else { Op::Send1 }, send);
    }

    fn sent(&mut self, conn: usize, side: usize, result: i32) {
        let c = &mut self.conns[conn];
        c.in_flight -= 1;
        c.sending[side] = false;
        if result <= 0 {
            return self.close(conn);
        }
        let chunk = c.queue[side].front_mut().expect("the chunk being sent");
        chunk.sent += result as u32;
        if chunk.sent == chunk.len {
            let bid = chunk.bid;
            c.queue[side].pop_front();
            self.buffers.give_back(bid);
            if c.paused[side] && c.queue[side].len() < MAX_QUEUED {
                c.paused[side] = false;
                self.receive(conn, side);
            }
            for (conn, side, serial) in std::mem::take(&mut self.starved) {
                let c = &mut self.conns[conn];
                if c.live && c.serial == serial {
                    c.paused[side] = false;
                    self.receive(conn, side);
                }
            }
        }
        self.send(conn, side);
    }

    /// Ends the connection: shutting its sockets down ends the multishot
    /// receives still armed on them; finish() closes the sockets once every
    /// operation on them has completed.
    fn close(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        if c.closing {
            return;
        }
        c.closing = true;
        if c.receiving.iter().any(|&r| r) {
            for fd in c.fds.into_iter().flatten() {
                // SAFETY: the connection's own socket, open until finish().
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    fn finish(&mut self, conn: usize) {
        let c = &self.conns[conn];
        if !c.live {
            return;
        }
        let drained = (0..2).all(|side| c.ended[side] && c.queue[side].is_empty() && !c.sending[side]);
        if drained && !c.closing {
            self.close(conn);
        }
        let c = &mut self.conns[conn];
        if c.closing && c.in_flight == 0 {
            let bids: Vec<u16> = c
                .queue
                .iter_mut()
                .flat_map(|q| q.drain(..))
                .map(|chunk| chunk.bid)
                .collect();
            c.live = false;
            let fds = c.fds;
            bids.into_iter().for_each(|bid| self.buffers.give_back(bid));
            for fd in fds.into_iter().flatten() {
                self.push(opcode::Close::new(Fd(fd)).build().user_data(user_data(0, Op::Ignore)));
            }
            self.free.push(conn);
        }
    }
}

fn worker(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(16384)
        .build(4096)?;
    let (mut submitter, sq, mut cq) = ring.split();
    submitter.register_ring_fd()?;
    let buffers = Buffers::new(&submitter)?;
    let node = Box::new(floors::socket_address(node));
    let mut w = Worker {
        submitter,
        sq,
        listener,
        node,
        conns: Vec::new(),
        free: Vec::new(),
        buffers,
        starved: Vec::new(),
        serial: 0,
    };
    w.accept();
    let mut batch = Vec::with_capacity(1024);
    loop {
        w.sq.sync();
        match w.submitter.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            other => other?,
        };
        cq.sync();
        batch.extend((&mut cq).map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())));
        for (data, result, flags) in batch.drain(..) {
            w.completed(data, result, flags);
        }
    }
}

fn main() {
    let args = floors::args("usage: uring-loop LISTEN NODE [THREADS]");
    floors::run(&args, worker);
}
