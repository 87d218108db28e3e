//! Health: what the balancer observes about its nodes (available or
//! unavailable), as opposed to the state an operator sets. Connect failures
//! mark a node unavailable (see `proxy::connect`); the prober brings it back,
//! or, in a cluster with active checks, the checker (`check`) judges every
//! node all the time. `slow_start` ramps up the share of a node that just
//! became eligible.

pub mod agent;
pub mod check;
pub mod probe;
pub mod slow_start;
