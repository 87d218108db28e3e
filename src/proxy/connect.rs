//! Connecting a client to a node, with fall-over: try the candidates in order
//! until one **takes** the client.
//!
//! A node fails, is marked unavailable, and the next candidate is tried, when:
//! - the TCP connect fails (refused, unreachable, reset) or does not complete
//!   within the cluster's `connect_timeout`; or
//! - it is **on probation** and closes (FIN) or resets (RST) the connection.
//!
//! A connected node is on probation until it has sent its first byte to the
//! client. While on probation, the client's first bytes (up to
//! [`HELD_BYTES`]) are forwarded to the node *and kept*, so that a node that
//! fails can be replaced by the next candidate, which gets the same bytes,
//! byte for byte. Probation also ends (the node is kept, whatever it does
//! next) when:
//! - the client sends more than [`HELD_BYTES`] before the node answers: those
//!   bytes could no longer be replayed;
//! - the client has finished sending (half-close) and then the node closes
//!   without a word: a node may legitimately read a request and hang up.
//!
//! A node that turns red while on probation is left (not marked unavailable)
//! and the held bytes go to the next candidate.
//!
//! Server-speaks-first protocols (SMTP, IMAP, POP3, FTP): the greeting is the
//! node's first byte, so a node that greets has taken the client; if it later
//! closes, that is its answer and no fall-over happens. A node that accepts and
//! closes before greeting fails over like any other.
//!
//! The happy path costs no system call of its own: the node's first byte is
//! seen in its socket's readiness (a peek only when it closed or failed), and
//! when the client speaks first a buffer of [`HELD_BYTES`] comes from the
//! worker's spares for the first bytes; the pump takes over as soon as the
//! node answers.
//!
//! A node that closed before any byte reached it must fail over even when the
//! client then half-closes (after which a node's close is a fine answer). Its
//! close is seen by the peek that waits for its answer; only before passing
//! the client's half-close on does the node's socket need checking first, and
//! then "reached it" means acknowledged by it: a node whose FIN came after it
//! had acknowledged every byte written to it got the request and hung up,
//! which is its answer (see `pass_on_half_close`).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Candidates;
use super::channel::{SpareBuffers, Spares, keep_spare, take_spare};
use super::identity;
use crate::config::{LastResort, ProxyHeader, SocketBuffer};
use crate::health::probe;
use crate::model::{Cluster, NodeFigures};

/// Most client bytes kept for replay while a node is on probation.
pub const HELD_BYTES: usize = 16 * 1024;

/// How a connection attempt ended.
pub enum Outcome {
    /// `stream` to `cluster.nodes[node]` has taken the client; `forwarded`
    /// client bytes were already written to it.
    Connected {
        node: usize,
        stream: TcpStream,
        forwarded: u64,
    },
    /// Every candidate failed (or there was none).
    NoNode,
    /// The balancer ran out of descriptors or memory: no node would do better.
    Exhausted(io::Error),
    /// The client failed or went away while we were connecting.
    ClientGone(io::Error),
    /// No byte moved either way for the service's idle timeout while the node
    /// was on probation.
    Idle,
    /// The connection to a node could not be bound as the cluster's `source`
    /// says (no `CAP_NET_ADMIN`, an address that is not local): no node
    /// would do better.
    Unbindable(io::Error),
}

/// Who the client is, as a node is told (`send_proxy`) or shown (`source`).
#[derive(Clone, Copy)]
pub struct Ends {
    /// The client's address: its socket's peer, or what an upstream
    /// balancer's PROXY header said.
    pub client: SocketAddr,
    /// The address the client connected to, where an upstream balancer's
    /// header said; else the client socket's own local address.
    pub to: Option<SocketAddr>,
}

/// The client's first bytes, kept until a node takes the client.
#[derive(Default)]
struct FirstBytes {
    /// Room for [`HELD_BYTES`] once the client has sent a byte; none before.
    /// Never zeroed: only the pages the client's bytes land on become
    /// resident, which matters with thousands of connections opening at once.
    buf: Vec<u8>,
    /// The client has half-closed (sent EOF).
    client_done: bool,
}

thread_local! {
    /// Emptied first-bytes buffers of this thread, kept for its next clients.
    static SPARE_BUFFERS: SpareBuffers = const { RefCell::new(Spares::new()) };
}

/// Drops this thread's spare first-bytes buffers that sat unused since the
/// last call; returns how many.
pub(super) fn shed_idle_spares() -> usize {
    SPARE_BUFFERS.with_borrow_mut(Spares::shed)
}

/// Spare first-bytes buffers kept per thread (256 KiB at most).
const SPARE_LIMIT: usize = 16;

impl FirstBytes {
    fn is_full(&self) -> bool {
        self.buf.len() >= HELD_BYTES
    }

    /// Gives `buf` room for [`HELD_BYTES`], taking a spare buffer if there is one.
    fn reserve(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = take_spare(&SPARE_BUFFERS, HELD_BYTES);
        }
    }
}

impl Drop for FirstBytes {
    fn drop(&mut self) {
        if self.buf.capacity() == HELD_BYTES {
            keep_spare(&SPARE_BUFFERS, std::mem::take(&mut self.buf), SPARE_LIMIT);
        }
    }
}

/// Who ended a probation that did not keep the node.
enum Fault {
    Node(io::Error),
    /// The node turned red: it takes the client no more, but is not unavailable.
    Red,
    /// Neither side sent a byte for the idle timeout: not the node's fault.
    Idle,
    Client(io::Error),
}

/// What the client did while a node was on probation.
enum ClientEvent {
    Read(usize),
    /// More bytes than we keep: probation ends.
    More,
    Eof,
}

/// Where a client's candidates start.
#[derive(Debug, Clone, Copy)]
pub enum First {
    /// The client's own node: its pin, or its ip-hash home. Its session may
    /// be there (a passive FTP data connection), so it is tried first even
    /// on a port it refused lately.
    Home(usize),
    /// The algorithm's pick (`None`: no node is eligible).
    Pick(Option<usize>),
}

impl First {
    fn node(self) -> Option<usize> {
        match self {
            First::Home(i) => Some(i),
            First::Pick(pick) => pick,
        }
    }
}

/// Connects `client` (who reached us on `local_port`) to the first candidate,
/// starting with `first`, that takes it. Failed nodes are marked unavailable.
/// `idle`: the service's idle timeout, which applies on probation too. When
/// no node is eligible at all and the cluster's `last_resort` allows it, the
/// green nodes that merely look down are tried, in the same order.
pub async fn connect_client(
    client: &TcpStream,
    ends: Ends,
    cluster: &Cluster,
    first: First,
    local_port: u16,
    idle: Option<Duration>,
) -> Outcome {
    let candidates = match first {
        First::Home(home) => Candidates::from_home(&cluster.nodes, home, local_port),
        First::Pick(pick) => Candidates::new(&cluster.nodes, pick, local_port),
    };
    let first = first.node();
    let mut held = FirstBytes::default();
    let mut offered = false;
    let attempt = Attempt {
        client,
        ends,
        cluster,
        local_port,
        idle,
    };
    for i in candidates {
        offered = true;
        if let Some(outcome) = attempt.try_node(i, &mut held).await {
            return outcome;
        }
    }
    // Only when nothing was offered: nodes that just failed this client are not tried twice.
    if !offered && cluster.last_resort == LastResort::TryUnavailable {
        for i in Candidates::last_resort(&cluster.nodes, first, local_port) {
            if let Some(outcome) = attempt.try_node(i, &mut held).await {
                if let Outcome::Connected { node, .. } = &outcome {
                    let node = &cluster.nodes[*node];
                    let why = "it took a client tried as a last resort";
                    probe::mark_port_up(cluster, node, local_port, why);
                    probe::mark_available(cluster, node, why);
                }
                return outcome;
            }
        }
    }
    Outcome::NoNode
}

/// What stays the same across one client's candidates.
struct Attempt<'a> {
    client: &'a TcpStream,
    ends: Ends,
    cluster: &'a Cluster,
    local_port: u16,
    idle: Option<Duration>,
}

impl Attempt<'_> {
    /// One candidate: `Some` ends the search (connected, or a fault no other
    /// node would fix); `None`: try the next one.
    async fn try_node(&self, i: usize, held: &mut FirstBytes) -> Option<Outcome> {
        let Attempt {
            client,
            ends,
            cluster,
            local_port,
            idle,
        } = *self;
        let node = &cluster.nodes[i];
        let target = node.address.target(local_port);
        let bound = match identity::bound_socket(cluster.source, ends.client.ip(), target) {
            Ok(bound) => bound,
            Err(e) => return Some(Outcome::Unbindable(e)),
        };
        let header = match node.send_proxy {
            ProxyHeader::None => Vec::new(),
            kind => match ends.to.map_or_else(|| client.local_addr(), Ok) {
                Ok(to) => identity::header(kind, ends.client, to),
                Err(e) => return Some(Outcome::ClientGone(e)),
            },
        };
        let stream = match connect(target, bound, cluster.connect_timeout, cluster.socket_buffer).await {
            Ok(stream) => stream,
            Err(e) if is_exhaustion(&e) => return Some(Outcome::Exhausted(e)),
            Err(e) => {
                node.figures.count_connect_failure();
                probe::mark_failed(cluster, node, target, format_args!("connect to {target} failed: {e}"));
                return None;
            }
        };
        match probation(client, &stream, &header, &node.figures, held, idle).await {
            Ok(()) => {
                probe::mark_port_up(cluster, node, target.port(), "it took a client");
                Some(Outcome::Connected {
                    node: i,
                    stream,
                    forwarded: held.buf.len() as u64,
                })
            }
            Err(Fault::Node(e)) => {
                node.figures.count_connect_failure();
                probe::mark_failed(
                    cluster,
                    node,
                    target,
                    format_args!("{target} ended the connection before answering: {e}"),
                );
                None
            }
            Err(Fault::Red) => None,
            Err(Fault::Idle) => Some(Outcome::Idle),
            Err(Fault::Client(e)) => Some(Outcome::ClientGone(e)),
        }
    }
}

/// Connects to a node within `timeout`, with TCP_NODELAY set and, when the
/// cluster has a `socket_buffer`, buffers of that size (should the kernel
/// refuse them, the connection goes on with its own sizing).
///
/// The buffers are sized once the connection is up, not before the connect:
/// set before, they also make the SYN announce a smaller window scale, and
/// bulk streams through the balancer gained nothing; set afterwards, they
/// did (the socket_buffer runs in bench/results/).
pub(super) async fn connect(
    target: SocketAddr,
    bound: Option<tokio::net::TcpSocket>,
    timeout: Duration,
    buffer: Option<SocketBuffer>,
) -> io::Result<TcpStream> {
    let connecting = async {
        match bound {
            Some(socket) => socket.connect(target).await,
            None => TcpStream::connect(target).await,
        }
    };
    let deadline = Instant::now() + timeout;
    let mut connecting = std::pin::pin!(connecting);
    // The timer is armed only if the connect is still pending after one turn
    // of the worker's event loop, where a near node has usually answered:
    // tokio's timer wakes its driver (an eventfd write, one more epoll_wait)
    // whenever a new timer becomes the earliest, which on a worker with no
    // other timer is once per connection.
    let done_in_a_turn = tokio::select! {
        biased;
        result = &mut connecting => Some(result),
        () = tokio::task::yield_now() => None,
    };
    let stream = match done_in_a_turn {
        Some(result) => result,
        None => tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))?,
    }?;
    stream.set_nodelay(true)?;
    if let Some(size) = buffer
        && let Err(e) = set_socket_buffer(&stream, size)
    {
        // Not the node's fault: keep the connection with the kernel's sizing.
        tracing::debug!("cannot set socket_buffer on the connection to {target}: {e}");
    }
    Ok(stream)
}

/// Writes the node's PROXY `header` (empty: none), replays the held bytes
/// (and the client's half-close) to `node`, then forwards the client's
/// first bytes until the node answers (`Ok`) or fails.
async fn probation(
    client: &TcpStream,
    node: &TcpStream,
    header: &[u8],
    figures: &NodeFigures,
    held: &mut FirstBytes,
    idle: Option<Duration>,
) -> Result<(), Fault> {
    if !header.is_empty() {
        write_all(node, header).await.map_err(Fault::Node)?;
    }
    if !held.buf.is_empty() {
        write_all(node, &held.buf).await.map_err(Fault::Node)?;
    }
    let wrote = !header.is_empty() || !held.buf.is_empty();
    if held.client_done && pass_on_half_close(node, wrote).map_err(Fault::Node)? {
        return Ok(());
    }
    let mut idle_deadline = idle.map(|d| Instant::now() + d);
    loop {
        let idle_over = async {
            match idle_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // The client first: a half-close that already arrived must be seen
            // before the node's close is judged.
            biased;
            event = client_event(client, held), if !held.client_done => {
                match event.map_err(Fault::Client)? {
                    ClientEvent::Read(n) => {
                        idle_deadline = idle.map(|d| Instant::now() + d);
                        let start = held.buf.len() - n;
                        write_all(node, &held.buf[start..]).await.map_err(Fault::Node)?;
                    }
                    ClientEvent::More => return Ok(()),
                    ClientEvent::Eof => {
                        // The node may answer only after the client's EOF: pass it on.
                        held.client_done = true;
                        if pass_on_half_close(node, !held.buf.is_empty()).map_err(Fault::Node)? {
                            return Ok(());
                        }
                    }
                }
            }
            answer = node_answer(node) => {
                return match answer {
                    Ok(0) if held.client_done => Ok(()),
                    Ok(0) => Err(Fault::Node(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"))),
                    Ok(_) => Ok(()),
                    Err(e) => Err(Fault::Node(e)),
                };
            }
            _ = figures.red() => return Err(Fault::Red),
            _ = idle_over => return Err(Fault::Idle),
        }
    }
}

/// Waits for the node's first byte or its end, and says which without taking
/// a byte from the socket: `Ok(0)` for a close, `Ok(n)` with `n > 0` when
/// bytes wait to be read (the pump reads them). Cancel-safe.
///
/// A socket that is readable and neither closed for reading nor failed holds
/// data, so readiness alone answers in the common case; only a close or an
/// error (which may come after data) costs a peek to tell them apart. Epoll
/// reports a socket's state as it is when the event is delivered, and
/// nothing reads the node's socket before the pump does.
async fn node_answer(node: &TcpStream) -> io::Result<usize> {
    let ready = node.ready(Interest::READABLE).await?;
    if ready.is_readable() && !ready.is_read_closed() && !ready.is_error() {
        return Ok(1);
    }
    let mut peeked = [0u8; 1];
    node.peek(&mut peeked).await
}

/// Waits for the client's next bytes and keeps them in `held` (cancel-safe:
/// bytes are only taken from the socket when the read completes).
async fn client_event(client: &TcpStream, held: &mut FirstBytes) -> io::Result<ClientEvent> {
    if held.is_full() {
        let mut peeked = [0u8; 1];
        return Ok(match client.peek(&mut peeked).await? {
            0 => ClientEvent::Eof,
            _ => ClientEvent::More,
        });
    }
    held.reserve();
    loop {
        client.readable().await?;
        let room = held.buf.capacity() - held.buf.len();
        // Reads into the spare capacity only: never more than HELD_BYTES in all.
        // A short read empties the socket: its readiness is cleared, which saves
        // the read that would only fail with EAGAIN.
        match super::channel::partial_io(client, Interest::READABLE, room, || client.try_read_buf(&mut held.buf)) {
            Ok(0) => return Ok(ClientEvent::Eof),
            Ok(n) => return Ok(ClientEvent::Read(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Passes the client's half-close on to `node`, unless the node has hung up
/// already; `wrote`: client bytes were written to it. `Ok(true)`: the node
/// closed after acknowledging every byte written to it, so the bytes reached
/// it and it hung up: that is its answer, it keeps the client (sending them
/// to another node would deliver them twice). An error: the node reset the
/// connection, or closed it before any byte reached it (nothing written, or
/// the bytes written still unacknowledged when its FIN came), so it failed
/// and the bytes go to the next node.
///
/// Why the acknowledgement and not the order in which the balancer sees
/// things: a node that reads the request and hangs up at once can close
/// before the balancer has got round to the client's EOF, although the
/// EOF arrived first (it was waiting in the client's socket).
fn pass_on_half_close(node: &TcpStream, wrote: bool) -> io::Result<bool> {
    let mut peeked = [std::mem::MaybeUninit::uninit(); 1];
    // The socket is non-blocking: this returns at once.
    match socket2::SockRef::from(node).peek(&mut peeked) {
        Ok(0) if wrote && all_acknowledged(node) => return Ok(true),
        Ok(0) => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before any byte reached it",
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    half_close(node).map(|()| false)
}

/// Whether the peer has acknowledged every byte written to `stream`
/// (Linux: nothing left in the send queue). Elsewhere `false`, so a node
/// that closes early always counts as failed.
fn all_acknowledged(stream: &TcpStream) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) on a TCP socket writes one int: the bytes
        // written and not yet acknowledged by the peer.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        rc == 0 && queued == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        false
    }
}

fn half_close(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sizes both kernel buffers of an established connection (a
/// `socket_buffer`; `connect::connect` says why not before the connect).
pub(super) fn set_socket_buffer(stream: &TcpStream, size: SocketBuffer) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_recv_buffer_size(size.bytes())?;
    socket.set_send_buffer_size(size.bytes())
}

/// Whether an error means the balancer ran out of descriptors or memory.
pub(super) fn is_exhaustion(e: &io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&code);
    }
    e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connection: the balancer's end (to a node) and the node's end.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// Waits until the node's FIN has reached the balancer's end.
    async fn until_closed(near: &TcpStream) {
        let mut byte = [0u8; 1];
        assert_eq!(near.peek(&mut byte).await.unwrap(), 0, "the node closed");
    }

    #[tokio::test]
    async fn a_node_that_read_the_bytes_and_hung_up_has_answered() {
        let (near, mut far) = pair().await;
        write_all(&near, b"log line\n").await.unwrap();
        let mut got = [0u8; 9];
        far.read_exact(&mut got).await.unwrap();
        drop(far);
        until_closed(&near).await;
        assert!(
            pass_on_half_close(&near, true).unwrap(),
            "kept: its close is its answer"
        );
    }

    #[tokio::test]
    async fn a_node_that_closed_before_the_bytes_reached_it_has_failed() {
        let (near, far) = pair().await;
        drop(far);
        until_closed(&near).await;
        // Written after the node's FIN: never acknowledged (the node's
        // kernel answers them with RST, which may or may not be here yet).
        let _ = near.try_write(b"log line\n");
        assert!(pass_on_half_close(&near, true).is_err());
    }

    #[tokio::test]
    async fn a_node_that_closed_with_nothing_written_to_it_has_failed() {
        let (near, far) = pair().await;
        drop(far);
        until_closed(&near).await;
        let e = pass_on_half_close(&near, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_open_node_gets_the_half_close() {
        let (near, mut far) = pair().await;
        assert!(
            !pass_on_half_close(&near, false).unwrap(),
            "not an answer: probation goes on"
        );
        let mut rest = Vec::new();
        assert_eq!(far.read_to_end(&mut rest).await.unwrap(), 0, "the node sees EOF");
        far.write_all(b"ok").await.unwrap();
    }
}
