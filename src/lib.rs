//! Proto Balance: a TCP load balancer. Clients connect to a service; each
//! connection is forwarded byte for byte to one node of the service's cluster.
//!
//! # Layout
//!
//! The crate is a library with a thin binary (`main.rs`) on top. Its modules
//! are layers: each imports only from the layers below it, and no two
//! modules import each other (`tests/layers.rs` checks this on every test run).
//!
//! ```text
//!  cli                  arguments, signals, exit codes, the demo; wires nothing itself
//!  server               wiring: starts the data plane, the control plane, the background tasks; stops them in order; the upgrade in place
//!  admin                HTTP API, dashboard, metrics exposition, the `ctl` client
//!  control              control state (file + run-time overrides), reload plan, carrying it out, the upgrade's wire
//!  proxy                workers, listeners, accept, admission, one connection's life, connect, pump
//!  balance health       one algorithm a file; probes and load agents;
//!  affinity             the pin file (redb) and its flusher
//!  model logging        snapshot, nodes, figures, rates, pins: what every task reads; where log lines go
//!  config               TOML → validated values; imports nothing of the crate
//! ```
//!
//! One connection's path: [`proxy`] accepts it on a worker thread, admits it,
//! asks the cluster's pin or algorithm ([`balance`], through [`model::Snapshot`])
//! for a node, connects with fall-over along the candidates, and pumps bytes
//! until both sides are done. Changes at run time (reload, node states,
//! redirects) go through [`control::Control`], which publishes a new snapshot;
//! the data plane never takes a lock to read it.
//!
//! docs/architecture.md draws the same layers and explains the decisions.

pub mod admin;
pub mod affinity;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod dns;
pub mod health;
pub mod logging;
pub mod model;
pub mod proxy;
pub mod server;
pub mod shared;
