//! The data plane: listeners accept clients, each client gets a node from its
//! service's cluster (pin or pick, then fall-over candidates), and the pump
//! moves the bytes. One tokio task per connection on a fixed pool of worker
//! threads. This file only declares the parts and says what the rest of the
//! crate may use:
//!
//! - `plane`: the owner ([`DataPlane`]): workers, listeners, connections;
//! - `shared`: what every connection task shares;
//! - `workers`: the worker threads and the listening socket groups;
//! - `accept`: one accept loop per socket; `admission`: limits and access lists;
//! - `connection`: one connection's life, from the choice of node to its log line;
//! - `candidates`: the order nodes are tried in; `connect`: trying them;
//! - `sni`: the server name of a TLS client's ClientHello, for routes;
//! - `pump`: bytes both ways; `channel`: the buffers and pipes they pass through;
//! - `busy_poll`: the opt-in spinning of idle workers.

mod accept;
mod admission;
mod busy_poll;
mod candidates;
mod channel;
mod connect;
mod connection;
pub mod identity;
mod plane;
mod pump;
mod shared;
pub mod sni;
mod workers;

pub use candidates::Candidates;
pub use plane::{BindError, Bound, DataPlane, Inherited, WorkerSettings, warn_capped_socket_buffers};
pub use pump::{PumpError, Side};
pub use shared::Departing;
pub use workers::{allowed_cpus, pin_this_thread};
