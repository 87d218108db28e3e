//! An established connection as it can leave this process: what another
//! process (the one an upgrade starts) needs to carry it on, beside its two
//! sockets. Data only.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One connection's identity and progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    pub service: String,
    pub cluster: String,
    pub node: String,
    /// The node's address as the file wrote it (its identity, with the name).
    pub node_address: String,
    /// The client's address, as the balancer knows it.
    pub client: SocketAddr,
    /// The port the client reached the balancer on.
    pub local_port: u16,
    /// How long the connection has been open.
    pub age_ms: u64,
    /// Milliseconds since a byte last moved (for the idle timeout).
    pub idle_ms: u64,
    /// Bytes client → node and node → client so far.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The client has sent EOF, and the node was told (half-close).
    pub client_done: bool,
    /// The node has sent EOF, and the client was told.
    pub node_done: bool,
}
