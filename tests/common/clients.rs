//! Clients: connections from chosen 127.x.y.z sources, and reads bounded by
//! [`PATIENCE`](super::PATIENCE).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use super::within;

/// The loopback address `127.a.b.c`, a client source of its own.
pub fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// Connects to `to` from source address `from` (any port); fails the test if
/// the connection is not made.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    within(&format!("connect from {from} to {to}"), socket.connect(to))
        .await
        .unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"))
}

/// Connects from `from`, reads everything until EOF, returns it as text.
pub async fn read_from(from: IpAddr, addr: SocketAddr) -> String {
    within("a client connection", async {
        let mut s = connect_from(from, addr).await;
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read until EOF");
        out
    })
    .await
}

/// Connects, reads everything until EOF, returns it as text.
pub async fn read_all(addr: SocketAddr) -> String {
    read_from(IpAddr::V4(Ipv4Addr::LOCALHOST), addr).await
}

/// Connects to `addr` and reads the whole answer (trimmed), or the I/O error.
pub async fn read_tag(addr: SocketAddr) -> std::io::Result<String> {
    within("read_tag", async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text.trim_end().to_string())
    })
    .await
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}
