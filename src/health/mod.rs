//! Health: what the balancer observes about its nodes (available or
//! unavailable), as opposed to the state an operator sets. Connect failures
//! mark a node unavailable (see `proxy::connect`); the prober brings it back.

pub mod agent;
pub mod probe;
