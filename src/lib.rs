//! Proto Balance: a TCP load balancer. Clients connect to a service; each
//! connection is forwarded byte for byte to one node of the service's cluster.
//!
//! Modules follow docs/architecture.md: `config` parses and validates,
//! `model` holds the live snapshot and figures, `balance` chooses nodes,
//! `proxy` moves bytes, `server` runs it all, `cli` and `demo` face the user.

pub mod admin;
pub mod affinity;
pub mod balance;
pub mod cli;
pub mod config;
pub mod demo;
pub mod health;
pub mod logging;
pub mod model;
pub mod proxy;
pub mod rates;
pub mod server;
