//! Which privileges a configuration needs beyond a plain user's: the one
//! place that decides, for the drop at start (what to keep) and for a
//! reload after it (what the new file needs, which must be among what was
//! kept). Pure: the caller says where the kernel's privileged ports end.
//! Dropping them is `server`'s job.

use std::collections::BTreeSet;
use std::fmt;

use crate::config::{Config, ListenerKey};

/// A privilege a configuration may need once the process runs as `user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Privilege {
    /// `CAP_NET_BIND_SERVICE`: listening on a port below
    /// `net.ipv4.ip_unprivileged_port_start` (1024 by default).
    BindLowPort,
    /// `CAP_NET_ADMIN`: connecting to nodes from the client's own address
    /// (a transparent `source`).
    NetAdmin,
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Privilege::BindLowPort => "CAP_NET_BIND_SERVICE",
            Privilege::NetAdmin => "CAP_NET_ADMIN",
        })
    }
}

/// A set of privileges.
pub type Privileges = BTreeSet<Privilege>;

/// The kernel's default `net.ipv4.ip_unprivileged_port_start`.
pub const DEFAULT_UNPRIVILEGED_PORT_START: u16 = 1024;

/// Whether listening on `port` needs [`Privilege::BindLowPort`] (port 0 is
/// chosen by the kernel among the unprivileged ones).
pub fn is_privileged_port(port: u16, unprivileged_port_start: u16) -> bool {
    port != 0 && port < unprivileged_port_start
}

/// What `config` needs to open `listeners` and to serve: each privilege
/// with the first thing that needs it. At start, `listeners` is every
/// listener of the file, and what this returns is what the drop keeps (a
/// reload may then open another privileged port, or keep serving
/// transparently); at a reload it is what the reload opens.
pub fn needed(config: &Config, listeners: &[ListenerKey], unprivileged_port_start: u16) -> Vec<(Privilege, String)> {
    let mut needed = Vec::new();
    if let Some(low) = listeners
        .iter()
        .find(|k| is_privileged_port(k.addr.port(), unprivileged_port_start))
    {
        needed.push((
            Privilege::BindLowPort,
            format!("service \"{}\" listen {}", low.service, low.addr),
        ));
    }
    if let Some(c) = config
        .clusters
        .iter()
        .find(|c| c.source == crate::config::Source::Client)
    {
        needed.push((
            Privilege::NetAdmin,
            format!("cluster \"{}\" source = \"client\"", c.name),
        ));
    }
    needed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::listeners;

    fn config(listen: &str) -> Config {
        Config::parse(
            &format!(
                "[[service]]\nname = \"web\"\nlisten = [{listen}]\ncluster = \"c\"\n\
                 [[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n"
            ),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn a_port_below_the_start_needs_the_bind_privilege() {
        let needs = |listen: &str, start: u16| {
            let c = config(listen);
            needed(&c, &listeners(&c), start)
        };
        assert_eq!(
            needs("\"127.0.0.1:8080\", \"127.0.0.1:80\"", 1024),
            vec![(
                Privilege::BindLowPort,
                "service \"web\" listen 127.0.0.1:80".to_string()
            )]
        );
        assert!(needs("\"127.0.0.1:1024\", \"127.0.0.1:0\"", 1024).is_empty());
        assert!(
            needs("\"127.0.0.1:80\"", 0).is_empty(),
            "the kernel lets anyone bind it"
        );
    }

    #[test]
    fn a_transparent_source_needs_net_admin() {
        let text = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\"]\ncluster = \"c\"\n\
                    [[cluster]]\nname = \"c\"\nsource = \"client\"\n\
                    [[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n";
        let c = Config::parse(text, "t").unwrap();
        assert_eq!(
            needed(&c, &listeners(&c), 1024),
            vec![(Privilege::NetAdmin, "cluster \"c\" source = \"client\"".to_string())]
        );
    }
}
