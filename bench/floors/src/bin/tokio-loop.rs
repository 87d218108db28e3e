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

use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use tokio::net::TcpStream;

fn worker(listener: RawFd, node: SocketAddrV4) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async move {
        let listener = floors::tokio_listener(listener)?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(forward(client, node));
        }
    })
}

async fn forward(mut client: TcpStream, node: SocketAddrV4) {
    if let Some(mut node) = floors::connect_nodelay(&client, node).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
    }
}

fn main() {
    let args = floors::args("usage: tokio-loop LISTEN NODE [THREADS]");
    floors::run(&args, worker);
}
