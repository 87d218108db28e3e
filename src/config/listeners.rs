//! The pure difference between two configurations that a reload acts on:
//! which listeners close and which open. Everything else a reload changes
//! (clusters, nodes, a service's cluster) is carried by the new snapshot.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::Config;

/// One listening socket as the file names it: the service and the configured
/// address (port 0 included, so a kernel-chosen port stays put across reloads).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerKey {
    pub service: String,
    pub addr: SocketAddr,
}

/// What a reload does to the listeners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenerDiff {
    /// Listeners of the old config that the new one no longer has.
    pub close: Vec<ListenerKey>,
    /// Listeners of the new config that the old one did not have.
    pub open: Vec<ListenerKey>,
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

/// The listeners to close and to open to go from `old` to `new`. A listener
/// that stays (same service, same address) is kept, with its accepted clients.
pub fn diff(old: &Config, new: &Config) -> ListenerDiff {
    let old: BTreeSet<ListenerKey> = listeners(old).into_iter().collect();
    let new: BTreeSet<ListenerKey> = listeners(new).into_iter().collect();
    ListenerDiff {
        close: old.difference(&new).cloned().collect(),
        open: new.difference(&old).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &[(&str, &str)]) -> Config {
        let mut text = String::from("state_dir = \"\"\n");
        for (name, listen) in services {
            text.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nlisten = [{listen}]\ncluster = \"c\"\n"
            ));
        }
        text.push_str("[[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n");
        Config::parse(&text, "test").expect("valid test config")
    }

    fn key(service: &str, addr: &str) -> ListenerKey {
        ListenerKey {
            service: service.into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn same_config_changes_nothing() {
        let c = config(&[("web", "\"127.0.0.1:8080\", \"127.0.0.1:9000-9002\"")]);
        assert_eq!(diff(&c, &c), ListenerDiff::default());
    }

    #[test]
    fn added_removed_and_narrowed_listeners() {
        let old = config(&[
            ("web", "\"127.0.0.1:8080\", \"127.0.0.1:9000-9002\""),
            ("gone", "\"127.0.0.1:7000\""),
        ]);
        let new = config(&[
            ("web", "\"127.0.0.1:8080\", \"127.0.0.1:9001-9003\""),
            ("mail", "\"127.0.0.1:2525\""),
        ]);
        let d = diff(&old, &new);
        assert_eq!(
            d.close,
            vec![key("gone", "127.0.0.1:7000"), key("web", "127.0.0.1:9000")]
        );
        assert_eq!(
            d.open,
            vec![key("mail", "127.0.0.1:2525"), key("web", "127.0.0.1:9003")]
        );
    }

    #[test]
    fn an_address_moving_between_services_closes_and_opens() {
        let old = config(&[("a", "\"127.0.0.1:8080\"")]);
        let new = config(&[("b", "\"127.0.0.1:8080\"")]);
        let d = diff(&old, &new);
        assert_eq!(d.close, vec![key("a", "127.0.0.1:8080")]);
        assert_eq!(d.open, vec![key("b", "127.0.0.1:8080")]);
    }

    #[test]
    fn port_zero_listener_stays_across_reloads() {
        let old = config(&[("web", "\"127.0.0.1:0\"")]);
        assert_eq!(diff(&old, &old.clone()), ListenerDiff::default());
    }
}
