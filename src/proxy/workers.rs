//! The data plane's threads: a fixed set of workers, each running its own
//! single-threaded tokio runtime (thread per core).
//!
//! Every listener is opened once per worker, as a group of `SO_REUSEPORT`
//! sockets on the same address: the kernel spreads new clients over the
//! group, and a worker accepts, connects and pumps its clients itself, from
//! start to end. No task ever moves between threads, so there are no
//! cross-thread wake-ups, no work-stealing queues and no futex traffic on the
//! connection path (measured in docs/performance.md).
//!
//! The price: a worker busy with one heavy client delays the other clients
//! the kernel handed to it, where a work-stealing pool would let an idle
//! thread take them. The connection path never blocks, so this only matters
//! under uneven CPU-bound load; HAProxy and NGINX (`reuseport`) make the same
//! choice.
//!
//! The control plane (admin API, health probes, the affinity flusher, signals)
//! runs on the caller's runtime, not on the workers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The running workers. Dropping this stops them: their runtimes end, and with
/// them any task still running there.
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    /// One per worker, closed when its thread has ended (its log lines handed over).
    ended: std::sync::Mutex<Vec<oneshot::Receiver<()>>>,
}

impl Workers {
    /// Starts `count` worker threads (0: one per CPU).
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = if count == 0 {
            thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            count
        };
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        let mut ended = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let (end, ended_rx) = oneshot::channel::<()>();
            ended.push(ended_rx);
            let started = thread::Builder::new()
                .name(format!("protobalance-w{i}"))
                .spawn(move || {
                    crate::logging::batch_this_thread();
                    runtime.block_on(stopped.cancelled());
                    drop(runtime);
                    crate::logging::flush_thread();
                    drop(end);
                });
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Workers {
            handles,
            stop,
            ended: std::sync::Mutex::new(ended),
        })
    }

    /// How many workers there are.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `future` on worker `i`.
    pub fn spawn_on<F>(&self, i: usize, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[i].spawn(future);
    }

    /// Stops every worker and waits until their threads have ended. (Dropping
    /// `Workers` stops them without waiting.)
    pub async fn stop(&self) {
        self.stop.cancel();
        let ended = std::mem::take(&mut *self.ended.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in ended {
            // Err: the thread ended (its sender is dropped either way).
            let _ = thread.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds one listening socket per worker on `addr`, all sharing it through
/// `SO_REUSEPORT`. Fails, closing any already bound, if one cannot be bound.
///
/// The first socket binds *without* `SO_REUSEPORT` and sets it only before
/// `listen`: so the address must be free, as with a plain listener, and a
/// second balancer started on the same address by mistake fails with "address
/// in use" instead of silently sharing the clients. Port 0 is resolved by
/// that first bind; the others join the port it got.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = listen_on(addr, false)?;
    let addr = first.local_addr()?;
    let mut group = Vec::with_capacity(count);
    group.push(first);
    for _ in 1..count {
        group.push(listen_on(addr, true)?);
    }
    Ok(group)
}

/// A non-blocking listening socket on `addr`, `SO_REUSEPORT` set before the
/// bind (`join`: joining a group) or only after it (starting one).
fn listen_on(addr: SocketAddr, join: bool) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt per listener instead of one per client.
    socket.set_tcp_nodelay(true)?;
    #[cfg(unix)]
    if join {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    #[cfg(unix)]
    if !join {
        socket.set_reuse_port(true)?;
    }
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_and_a_second_group_is_refused() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap() == addr));
        let again = bind_group(addr, 2).expect_err("the address is taken");
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn accepted_clients_inherit_tcp_nodelay_from_the_listener() {
        let listener = listen_on("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
