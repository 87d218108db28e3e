//! The floor a forwarder on the balancer's own runtime reaches on this
//! machine: what tokio itself costs a connection, before any balancing,
//! counting or logging. One current-thread runtime per thread (as the
//! balancer's workers run), each with its own SO_REUSEPORT listener; one
//! task per connection that connects the node on accept, sets TCP_NODELAY
//! on both sockets and forwards with tokio's `copy_bidirectional` (8 KiB
//! buffers, half-close passed on).
//!
//! Never balancing, never logging, never limiting: a measuring tool only.
//!
//! Usage: tokio-loop LISTEN NODE [THREADS]

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd, RawFd};
use tokio::net::{TcpListener, TcpStream};

fn worker(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async move {
        // SAFETY: the listener is this thread's own, handed over once.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(listener) };
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(forward(client, SocketAddr::V4(node)));
        }
    })
}

async fn forward(mut client: TcpStream, node: SocketAddr) {
    let Ok(mut node) = TcpStream::connect(node).await else {
        return;
    };
    if client.set_nodelay(true).is_err() || node.set_nodelay(true).is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
}

fn main() {
    let args = floors::args("usage: tokio-loop LISTEN NODE [THREADS]");
    floors::run(&args, worker);
}
