//! Every listening socket a configuration asks for, named as the file names
//! it: the key a reload compares listeners by (`control::plan`).

use std::net::SocketAddr;

use super::Config;

/// One listening socket as the file names it: the service and the configured
/// address (port 0 included, so a kernel-chosen port stays put across reloads).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerKey {
    pub service: String,
    pub addr: SocketAddr,
}

/// Every listener a config asks for, in the file's order.
pub fn listeners(config: &Config) -> Vec<ListenerKey> {
    config
        .services
        .iter()
        .flat_map(|s| {
            s.listen.iter().flat_map(|l| l.addrs()).map(|addr| ListenerKey {
                service: s.name.clone(),
                addr,
            })
        })
        .collect()
}
