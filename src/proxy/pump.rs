//! The pump: moves bytes both ways between a client and a node until both
//! directions are done, honouring half-close and propagating resets.
//!
//! Each direction is one loop over a [`Channel`]: *fill* it from the source
//! socket, *drain* it into the destination, repeat. A channel is a kernel pipe
//! used with splice(2) (Linux: the bytes never enter user space) or a user-space
//! buffer (the portable copy path); see `channel`. Channels come from a per-thread pool and are
//! held only while data is in flight: an idle connection holds none, so ten
//! thousand idle connections cost no pipes and no buffers.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::channel::Channel;
use crate::config::ForwardMode;

/// Whose fault a failure was; it decides what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Node,
    /// Ours: the balancer could not get a resource (a pipe, a buffer).
    Balancer,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Node => "node",
            Side::Balancer => "balancer",
        }
    }
}

/// A failed direction: which socket failed and how.
#[derive(Debug)]
pub struct PumpError {
    pub side: Side,
    pub error: io::Error,
}

/// Live byte counters a pump reports to as data flows.
pub trait Counter: Sync {
    fn bytes_in(&self, n: u64);
    fn bytes_out(&self, n: u64);
}

/// Pumps both ways until each side has sent EOF (a clean end), or until one
/// socket fails: then the other is reset too (SO_LINGER 0 on close), so a
/// reset on one side closes the other.
///
/// Neither socket is closed here; the caller drops them.
pub fn pump<'a>(client: &'a TcpStream, node: &'a TcpStream, mode: ForwardMode, counter: &'a dyn Counter) -> Pump<'a> {
    Pump {
        client,
        node,
        counter,
        upstream: Direction::new(Side::Client, Side::Node, mode),
        downstream: Direction::new(Side::Node, Side::Client, mode),
    }
}

/// Makes dropping each of `streams` send RST instead of FIN (SO_LINGER 0):
/// the peer learns at once that the connection failed, and unsent data is
/// discarded rather than waited for.
pub fn reset_on_drop(streams: &[&TcpStream]) {
    for s in streams {
        let _ = SockRef::from(*s).set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Both directions, polled by hand from one small future. A plain struct
/// rather than an `async fn`: no per-direction sub-futures and no second copy
/// of the arguments, so a connection's task stays small (its size is most of
/// what an idle connection costs). Each socket's read and write readiness
/// belong to exactly one direction, so the two never steal each other's
/// wake-ups.
pub struct Pump<'a> {
    client: &'a TcpStream,
    node: &'a TcpStream,
    counter: &'a dyn Counter,
    upstream: Direction,
    downstream: Direction,
}

impl Future for Pump<'_> {
    type Output = Result<(), PumpError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = this.poll_both(cx);
        if let Poll::Ready(Err(e)) = &result {
            // Abort the healthy side as well: a close with linger 0 sends RST.
            let others: &[&TcpStream] = match e.side {
                Side::Client => &[this.node],
                Side::Node => &[this.client],
                Side::Balancer => &[this.client, this.node],
            };
            reset_on_drop(others);
        }
        result
    }
}

impl<'a> Pump<'a> {
    /// A pump taking over a connection another process pumped until now:
    /// a direction already done (its source sent EOF, passed on) stays done.
    pub fn resumed(
        client: &'a TcpStream,
        node: &'a TcpStream,
        mode: ForwardMode,
        counter: &'a dyn Counter,
        (client_done, node_done): (bool, bool),
    ) -> Pump<'a> {
        let mut pump = pump(client, node, mode, counter);
        pump.upstream.done = client_done;
        pump.downstream.done = node_done;
        pump
    }

    /// From now on, writes what it holds but reads nothing more: the bytes
    /// not yet read wait in the sockets, so that the connection can move to
    /// another process with nothing in flight in this one.
    pub fn drain(&mut self) {
        self.upstream.draining = true;
        self.downstream.draining = true;
    }

    /// Whether no byte is held in this process (no channel, nothing
    /// unwritten): the connection can be handed over as it is.
    pub fn is_quiescent(&self) -> bool {
        self.upstream.is_quiescent() && self.downstream.is_quiescent()
    }

    /// Which directions are done: (client → node, node → client).
    pub fn done(&self) -> (bool, bool) {
        (self.upstream.done, self.downstream.done)
    }
}

impl Pump<'_> {
    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PumpError>> {
        let counter = self.counter;
        let up = self
            .upstream
            .poll(cx, self.client, self.node, self.downstream.done, &|n| {
                counter.bytes_in(n)
            })?;
        let down = self
            .downstream
            .poll(cx, self.node, self.client, self.upstream.done, &|n| {
                counter.bytes_out(n)
            })?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

/// One direction: fill a channel from `src`, drain it into `dst`, repeat;
/// EOF on `src` becomes a shutdown of `dst`'s write side (half-close).
struct Direction {
    /// Held while data keeps coming; handed back as soon as the source runs dry.
    channel: Option<Channel>,
    /// Size of the chunk in the channel, and how much of it is still unwritten
    /// (a chunk is at most one channel's capacity, far below 4 GiB).
    chunk: u32,
    pending: u32,
    src_side: Side,
    dst_side: Side,
    mode: ForwardMode,
    /// Whether the last chunk looked like bulk transfer (see `Channel::take`).
    bulk: bool,
    done: bool,
    /// Writes what it holds but reads no more (see [`Pump::drain`]).
    draining: bool,
}

impl Direction {
    fn new(src_side: Side, dst_side: Side, mode: ForwardMode) -> Self {
        Direction {
            channel: None,
            chunk: 0,
            pending: 0,
            src_side,
            dst_side,
            mode,
            bulk: false,
            done: false,
            draining: false,
        }
    }

    fn is_quiescent(&self) -> bool {
        self.pending == 0 && self.channel.is_none()
    }

    fn fail(&self, side: Side) -> impl FnOnce(io::Error) -> PumpError {
        move |error| PumpError { side, error }
    }

    fn give_back_channel(&mut self) {
        if let Some(ch) = self.channel.take() {
            #[cfg(test)]
            tests::CHANNELS_OUT.set(tests::CHANNELS_OUT.get() - 1);
            ch.give_back();
        }
    }

    /// Moves what it can; `Ready(Ok)` once `src` has sent EOF and it was passed
    /// on. `last`: the other direction is done, so the connection ends with this one.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        last: bool,
        count: &dyn Fn(u64),
    ) -> Poll<Result<(), PumpError>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pending > 0 {
                let ch = self.channel.as_mut().expect("unwritten bytes sit in a channel");
                match ch.drain(dst, self.pending as usize) {
                    Ok(0) => return Poll::Ready(Err(self.fail(self.dst_side)(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        self.pending -= n as u32;
                        if self.pending == 0 {
                            self.chunk_written(count);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(dst.poll_write_ready(cx)).map_err(self.fail(self.dst_side))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(self.fail(self.dst_side)(e))),
                }
                continue;
            }
            if self.draining {
                self.give_back_channel();
                return Poll::Pending;
            }
            match src.poll_read_ready(cx) {
                Poll::Ready(ready) => ready.map_err(self.fail(self.src_side))?,
                Poll::Pending => {
                    // Nothing in flight: an idle connection holds no channel.
                    self.give_back_channel();
                    return Poll::Pending;
                }
            }
            let ch = match &mut self.channel {
                Some(ch) => ch,
                None => {
                    #[cfg(test)]
                    tests::CHANNELS_OUT.set(tests::CHANNELS_OUT.get() + 1);
                    let taken = Channel::take(self.mode, self.bulk).map_err(self.fail(Side::Balancer))?;
                    self.channel.insert(taken)
                }
            };
            match ch.fill(src) {
                Ok(0) => return Poll::Ready(self.finish(dst, last)),
                Ok(n) => (self.chunk, self.pending) = (n as u32, n as u32),
                // Readiness is cleared: the next poll_read_ready registers for a wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.give_back_channel(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(self.fail(self.src_side)(e))),
            }
        }
    }

    fn chunk_written(&mut self, count: &dyn Fn(u64)) {
        count(u64::from(self.chunk));
        let chunk = self.chunk as usize;
        let looks_bulk = if self.bulk {
            chunk > SMALL_CHUNK
        } else {
            chunk >= BULK_CHUNK
        };
        if looks_bulk != self.bulk {
            self.bulk = looks_bulk;
            // The channel is empty: the next chunk takes the kind that suits it.
            if self.mode == ForwardMode::Auto {
                self.give_back_channel();
            }
        }
    }

    fn finish(&mut self, dst: &TcpStream, last: bool) -> Result<(), PumpError> {
        self.give_back_channel();
        self.done = true;
        if last {
            // Both sockets are closed right after the pump, and close(2) sends
            // the FIN: a shutdown(2) first would only cost a syscall more.
            return Ok(());
        }
        match SockRef::from(dst).shutdown(Shutdown::Write) {
            Ok(()) => Ok(()),
            // The other side already closed completely: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(e) => Err(self.fail(self.dst_side)(e)),
        }
    }
}

/// A chunk at least this large switches an `auto` direction from copy to splice.
const BULK_CHUNK: usize = 32 * 1024;
/// A chunk no larger than this switches it back to copy.
const SMALL_CHUNK: usize = 8 * 1024;

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    thread_local! {
        /// Channels taken by this thread's pumps and not given back.
        pub(super) static CHANNELS_OUT: Cell<isize> = const { Cell::new(0) };
    }

    struct NoCount;
    impl Counter for NoCount {
        fn bytes_in(&self, _: u64) {}
        fn bytes_out(&self, _: u64) {}
    }

    /// Both ends of a loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (near, _) = listener.accept().await.unwrap();
        (far, near)
    }

    /// The pump runs on this (single) thread, so its channels count here.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_between_exchanges_holds_no_channel() {
        for mode in [ForwardMode::Auto, ForwardMode::Splice, ForwardMode::Copy] {
            let (mut client, client_near) = pair().await;
            let (node_near, mut node) = pair().await;
            let pumping = tokio::spawn(async move { pump(&client_near, &node_near, mode, &NoCount).await.is_ok() });
            for round in 0..3 {
                let mut got = [0u8; 5];
                client.write_all(b"hello").await.unwrap();
                node.read_exact(&mut got).await.unwrap();
                node.write_all(b"world").await.unwrap();
                client.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"world");
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                assert_eq!(
                    CHANNELS_OUT.get(),
                    0,
                    "{mode:?}, exchange {round}: a channel is held while idle"
                );
            }
            drop((client, node));
            assert!(pumping.await.unwrap(), "{mode:?}: a clean end");
        }
    }
}
