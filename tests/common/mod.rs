//! The one helper layer of the integration tests: every test file writes its
//! config, starts a balancer, runs backends and clients, waits and gives up
//! through these modules, so a change in how any of that is done (or in a
//! library path) is a change here only.
//!
//! - [`config`]: config text, built with [`ConfigText`] (raw text only where
//!   the raw text is what a test is about);
//! - [`balancer`]: a balancer from the library ([`ConfigText::start`],
//!   [`ConfigText::start_with_admin`]) or the binary ([`Running`]), and admin
//!   API calls;
//! - [`backends`] and [`clients`]: small real servers and clients on loopback;
//! - [`wait`]: [`PATIENCE`], [`within`], [`wait_until`], [`wait_for`];
//! - [`skip`]: what a test does when its machine cannot run it
//!   ([`require_tools`], [`skip_or_fail`]).
//!
//! Each test binary uses its own subset, hence the `allow`s.
#![allow(dead_code, unused_imports)]

pub mod backends;
pub mod balancer;
pub mod clients;
pub mod config;
pub mod privileges;
mod skip;
pub mod tls;
pub mod wait;

pub use backends::*;
pub use balancer::*;
pub use clients::*;
pub use config::*;
pub use privileges::*;
pub use skip::*;
pub use tls::*;
pub use wait::*;

// The library types the tests name, in one place.
pub use protobalance::admin::client::Reply;
pub use protobalance::config::{Config, ForwardMode};
pub use protobalance::model::{NodeFigures, NodeState, Refusal, WallClock};
pub use protobalance::server::{Options, Server, StartError};

/// The balancer binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_protobalance");
