//! Reload as a plan: [`plan`] compares the control state in force with a
//! newly loaded file and decides, without touching anything, what a reload
//! does. [`super::Control`] then carries the plan out. The rules (see
//! docs/admin.md, "Reloading the configuration"):
//!
//! - **Listeners** are compared by service name and configured address: those
//!   that stay keep their socket (a port-0 listener keeps its port), removed
//!   ones close, new ones open.
//! - **Nodes** are the same node when cluster, name and address are the same:
//!   they keep their figures. A node whose address changes is a new node.
//! - **A redirect** is kept while the file's `cluster` of that service is
//!   unchanged and the target cluster still exists; otherwise it is dropped
//!   and the file's cluster applies.
//! - **A node state set at run time** is kept while the file has the same
//!   node (same address) with the same `state`; otherwise it is dropped and
//!   the file's state applies.
//! - **Restart-only settings** (`threads`, `pin_workers`, `busy_poll`,
//!   `user`, `group`, `[admin]` `listen`, `socket_mode` and the admin
//!   budget) changed in the file are named, and take effect at the next
//!   start.
//! - **Refusals**: the reload is refused, and nothing changes, when the
//!   admin socket bound at start is exposed (not loopback, not a Unix
//!   socket) and the new file has no token — the file's own `listen`
//!   changes nothing before a restart, so the socket that is bound is the
//!   one judged; or when what it opens needs a privilege the process
//!   dropped (`super::privileges`).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use super::privileges::{Privilege, needed};
use super::state::{ControlState, Overrides};
use crate::config::{AdminListen, Config, ListenerKey, LogFormat, NodeAddress, listeners};

/// What a reload does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Listeners of the old file that the new one no longer has.
    pub close: Vec<ListenerKey>,
    /// Listeners of the new file that the old one did not have.
    pub open: Vec<ListenerKey>,
    /// The overrides that stay.
    pub overrides: Overrides,
    /// Services whose redirect is dropped.
    pub redirects_dropped: Vec<String>,
    /// (cluster, node) whose run-time state is dropped.
    pub states_dropped: Vec<(String, String)>,
    /// (cluster, node) of nodes that keep their figures.
    pub nodes_kept: Vec<(String, String)>,
    /// Settings changed in the file that apply only at the next start.
    pub restart_only: Vec<RestartOnly>,
    /// Why the reload must not happen at all; empty: it may.
    pub refused: Vec<Refusal>,
}

/// Why a reload is refused although the file is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The admin socket bound at start is exposed and the file has no token.
    AdminTokenRemoved { bound: AdminListen },
    /// `what` needs `privilege`, which the process dropped at start.
    PrivilegeDropped {
        privilege: Privilege,
        what: String,
        user: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::AdminTokenRemoved { bound } => write!(
                f,
                "the admin API is bound to {bound}, which is not a loopback address, until the next start: \
                 a file without [admin] token (or token_file) would open it to anyone; keep the token, \
                 or restart to move the admin API"
            ),
            Refusal::PrivilegeDropped { privilege, what, user } => write!(
                f,
                "{what} needs {privilege}, which the balancer dropped when it became user \"{user}\": \
                 restart it to open this (it keeps {privilege} when the file it starts with needs it)"
            ),
        }
    }
}

/// A setting that a running balancer cannot change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartOnly {
    Threads(usize),
    PinWorkers(bool),
    BusyPoll(Option<Duration>),
    AdminListen(AdminListen),
    /// Another `[admin]` setting bound at start, as `key = value`.
    Admin(String),
    /// `user` / `group`: `None` when the file no longer drops privileges.
    RunAs(Option<String>),
    LogFormat(LogFormat),
    /// `[shared]`: the store (named without its password), or none.
    Shared(Option<String>),
}

impl std::fmt::Display for RestartOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartOnly::Threads(n) => write!(f, "threads = {n}"),
            RestartOnly::PinWorkers(p) => write!(f, "pin_workers = {p}"),
            RestartOnly::BusyPoll(Some(d)) => write!(f, "busy_poll = {d:?}"),
            RestartOnly::BusyPoll(None) => write!(f, "busy_poll off"),
            RestartOnly::AdminListen(a) => write!(f, "[admin] listen = {a}"),
            RestartOnly::Admin(setting) => write!(f, "[admin] {setting}"),
            RestartOnly::RunAs(Some(who)) => write!(f, "user = {who}"),
            RestartOnly::RunAs(None) => write!(f, "no user"),
            RestartOnly::LogFormat(LogFormat::Text) => write!(f, "log_format = \"text\""),
            RestartOnly::LogFormat(LogFormat::Json) => write!(f, "log_format = \"json\""),
            RestartOnly::Shared(Some(store)) => write!(f, "[shared] store = {store}"),
            RestartOnly::Shared(None) => write!(f, "no [shared]"),
        }
    }
}

/// The plan to go from `old` to the file `new`.
pub fn plan(old: &ControlState, new: &Config) -> Plan {
    let (close, open) = listener_changes(&old.file, new);
    let mut plan = Plan {
        close,
        open,
        overrides: Overrides::default(),
        redirects_dropped: Vec::new(),
        states_dropped: Vec::new(),
        nodes_kept: nodes_kept(&old.file, new),
        restart_only: restart_only(&old.file, new),
        refused: Vec::new(),
    };
    plan.refused = refusals(old, new, &plan.open);
    for (service, target) in &old.overrides.redirects {
        let file_now = new.services.iter().find(|s| s.name == *service).map(|s| &s.cluster);
        let unchanged = file_now.is_some_and(|c| old.file_cluster(service) == Some(c.as_str()));
        if unchanged && new.cluster(&target.value).is_some() {
            plan.overrides.redirects.insert(service.clone(), target.clone());
        } else {
            plan.redirects_dropped.push(service.clone());
        }
    }
    for ((cluster, node), state) in &old.overrides.node_states {
        let before = file_node(&old.file, cluster, node);
        let now = file_node(new, cluster, node);
        match (before, now) {
            (Some(b), Some(n)) if b == n => {
                plan.overrides
                    .node_states
                    .insert((cluster.clone(), node.clone()), state.clone());
            }
            _ => plan.states_dropped.push((cluster.clone(), node.clone())),
        }
    }
    plan
}

/// Why `new` must not replace the file in force, judged against what the
/// process holds (the admin socket bound, the privileges kept).
fn refusals(old: &ControlState, new: &Config, open: &[ListenerKey]) -> Vec<Refusal> {
    let mut refused = Vec::new();
    if let Some(bound) = &old.process.admin
        && bound.is_exposed()
        && new.admin.token.is_none()
    {
        refused.push(Refusal::AdminTokenRemoved { bound: bound.clone() });
    }
    if let Some(dropped) = &old.process.dropped {
        for (privilege, what) in needed(new, open, dropped.unprivileged_port_start) {
            if !dropped.kept.contains(&privilege) {
                refused.push(Refusal::PrivilegeDropped {
                    privilege,
                    what,
                    user: dropped.user.clone(),
                });
            }
        }
    }
    refused
}

/// A node as far as the rules above compare it: its address and its state.
fn file_node(config: &Config, cluster: &str, node: &str) -> Option<(NodeAddress, crate::config::NodeState)> {
    let c = config.cluster(cluster)?;
    c.nodes.iter().find(|n| n.name == node).map(|n| (n.address, n.state))
}

/// The listeners to close and to open to go from `old` to `new`.
fn listener_changes(old: &Config, new: &Config) -> (Vec<ListenerKey>, Vec<ListenerKey>) {
    let old: BTreeSet<ListenerKey> = listeners(old).into_iter().collect();
    let new: BTreeSet<ListenerKey> = listeners(new).into_iter().collect();
    (
        old.difference(&new).cloned().collect(),
        new.difference(&old).cloned().collect(),
    )
}

fn nodes_kept(old: &Config, new: &Config) -> Vec<(String, String)> {
    new.clusters
        .iter()
        .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
        .filter(|(c, n)| {
            old.cluster(&c.name)
                .is_some_and(|oc| oc.nodes.iter().any(|on| on.name == n.name && on.address == n.address))
        })
        .map(|(c, n)| (c.name.clone(), n.name.clone()))
        .collect()
}

fn restart_only(old: &Config, new: &Config) -> Vec<RestartOnly> {
    let mut changed = Vec::new();
    if new.threads != old.threads {
        changed.push(RestartOnly::Threads(new.threads));
    }
    if new.pin_workers != old.pin_workers {
        changed.push(RestartOnly::PinWorkers(new.pin_workers));
    }
    if new.busy_poll != old.busy_poll {
        changed.push(RestartOnly::BusyPoll(new.busy_poll));
    }
    let (a, b) = (&old.admin, &new.admin);
    if b.listen != a.listen {
        changed.push(RestartOnly::AdminListen(b.listen.clone()));
    }
    if b.socket_mode != a.socket_mode {
        changed.push(RestartOnly::Admin(format!("socket_mode = \"{:04o}\"", b.socket_mode)));
    }
    if b.max_connections != a.max_connections {
        changed.push(RestartOnly::Admin(format!("max_connections = {}", b.max_connections)));
    }
    if b.header_timeout != a.header_timeout {
        changed.push(RestartOnly::Admin(format!("header_timeout = {:?}", b.header_timeout)));
    }
    if b.request_timeout != a.request_timeout {
        changed.push(RestartOnly::Admin(format!("request_timeout = {:?}", b.request_timeout)));
    }
    if new.shared != old.shared {
        changed.push(RestartOnly::Shared(new.shared.as_ref().map(|s| s.display_url())));
    }
    if new.run_as != old.run_as {
        changed.push(RestartOnly::RunAs(
            new.run_as.as_ref().map(|r| format!("{} (group {})", r.user, r.group)),
        ));
    }
    if new.log_format != old.log_format {
        changed.push(RestartOnly::LogFormat(new.log_format));
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeState;
    use crate::control::state::{Dropped, Override, Process};

    /// (name, address, state) of each node of a cluster.
    type Nodes<'a> = &'a [(&'a str, &'a str, &'a str)];

    /// A file: `head` lines, then services (name, cluster, listen) and
    /// clusters (name, nodes).
    fn file(head: &str, services: &[(&str, &str, &str)], clusters: &[(&str, Nodes<'_>)]) -> Config {
        let mut text = format!("state_dir = \"\"\n{head}\n");
        for (name, cluster, listen) in services {
            text.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nlisten = [{listen}]\ncluster = \"{cluster}\"\n"
            ));
        }
        for (name, nodes) in clusters {
            text.push_str(&format!("[[cluster]]\nname = \"{name}\"\n"));
            for (node, address, state) in *nodes {
                text.push_str(&format!(
                    "[[cluster.node]]\nname = \"{node}\"\naddress = \"{address}\"\nstate = \"{state}\"\n"
                ));
            }
        }
        Config::parse(&text, "t").unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    const AB: &[(&str, &str, &str)] = &[("a", "127.0.0.1:1", "green"), ("b", "127.0.0.1:2", "green")];
    const G: &[(&str, &str, &str)] = &[("g", "127.0.0.1:3", "green")];

    fn base() -> Config {
        file(
            "",
            &[("web", "blue", "\"127.0.0.1:8001\", \"127.0.0.1:8002\"")],
            &[("blue", AB), ("green", G)],
        )
    }

    fn with_overrides(file: Config, redirect: bool, state: bool) -> ControlState {
        let mut s = ControlState::new(file);
        if redirect {
            s.overrides
                .redirects
                .insert("web".into(), Override::here("green".into(), 1));
        }
        if state {
            s.overrides
                .node_states
                .insert(("blue".into(), "a".into()), Override::here(NodeState::Yellow, 1));
        }
        s
    }

    fn key(service: &str, addr: &str) -> ListenerKey {
        ListenerKey {
            service: service.into(),
            addr: addr.parse().unwrap(),
        }
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    /// One row: the new file, and what the plan must say.
    struct Case {
        what: &'static str,
        new: Config,
        close: Vec<ListenerKey>,
        open: Vec<ListenerKey>,
        redirect_kept: bool,
        state_kept: bool,
        restart_only: Vec<RestartOnly>,
        /// What the running process holds (the old state's).
        process: Process,
        refused: Vec<Refusal>,
    }

    /// The rows of the refusals: the admin socket bound, the privileges kept.
    fn refusal_cases() -> Vec<Case> {
        let same_listen = SAME_LISTEN;
        let bound = |addr: &str| Process {
            admin: Some(AdminListen::parse(addr).unwrap()),
            dropped: None,
        };
        let mapped = "[::ffff:127.0.0.1]:9900";
        let with_token = || {
            file(
                "[admin]\ntoken = \"a-long-token\"",
                &[("web", "blue", same_listen)],
                &[("blue", AB), ("green", G)],
            )
        };
        let add_port_80 = || {
            file(
                "",
                &[(
                    "web",
                    "blue",
                    "\"127.0.0.1:8001\", \"127.0.0.1:8002\", \"127.0.0.1:80\"",
                )],
                &[("blue", AB), ("green", G)],
            )
        };
        let dropped = |kept: &[Privilege]| Process {
            admin: None,
            dropped: Some(Dropped::new("pb", kept.iter().copied().collect())),
        };
        let low = |privilege| Refusal::PrivilegeDropped {
            privilege,
            what: "service \"web\" listen 127.0.0.1:80".into(),
            user: "pb".into(),
        };
        vec![
            Case {
                process: bound(mapped),
                refused: vec![Refusal::AdminTokenRemoved {
                    bound: AdminListen::parse(mapped).unwrap(),
                }],
                ..row(
                    "the admin socket bound off loopback: a file without a token is refused",
                    base(),
                    true,
                    true,
                )
            },
            Case {
                process: bound("0.0.0.0:9900"),
                ..row(
                    "the admin socket bound off loopback: a file with a token is fine",
                    with_token(),
                    true,
                    true,
                )
            },
            Case {
                process: bound("127.0.0.1:9900"),
                ..row("a loopback admin socket needs no token", base(), true, true)
            },
            Case {
                process: bound("unix:/run/pb/admin.sock"),
                ..row("a unix admin socket needs no token", base(), true, true)
            },
            Case {
                process: dropped(&[]),
                open: vec![key("web", "127.0.0.1:80")],
                refused: vec![low(Privilege::BindLowPort)],
                ..row(
                    "a port below 1024 after dropping CAP_NET_BIND_SERVICE is refused",
                    add_port_80(),
                    true,
                    true,
                )
            },
            Case {
                process: dropped(&[Privilege::BindLowPort]),
                open: vec![key("web", "127.0.0.1:80")],
                ..row(
                    "a port below 1024 with CAP_NET_BIND_SERVICE kept opens",
                    add_port_80(),
                    true,
                    true,
                )
            },
            Case {
                open: vec![key("web", "127.0.0.1:80")],
                ..row(
                    "a port below 1024 without a drop opens (binding says if it may)",
                    add_port_80(),
                    true,
                    true,
                )
            },
        ]
    }

    const SAME_LISTEN: &str = "\"127.0.0.1:8001\", \"127.0.0.1:8002\"";

    /// A row with nothing opened, closed, named or refused.
    fn row(what: &'static str, new: Config, redirect_kept: bool, state_kept: bool) -> Case {
        Case {
            what,
            new,
            close: vec![],
            open: vec![],
            redirect_kept,
            state_kept,
            restart_only: vec![],
            process: Process::default(),
            refused: vec![],
        }
    }

    fn cases() -> Vec<Case> {
        let same_listen = SAME_LISTEN;
        let moved_a: &[(&str, &str, &str)] = &[("a", "127.0.0.1:9", "green"), ("b", "127.0.0.1:2", "green")];
        let red_a: &[(&str, &str, &str)] = &[("a", "127.0.0.1:1", "red"), ("b", "127.0.0.1:2", "green")];
        let only_b: &[(&str, &str, &str)] = &[("b", "127.0.0.1:2", "green")];
        vec![
            row("the same file keeps everything", base(), true, true),
            Case {
                close: vec![key("web", "127.0.0.1:8002")],
                open: vec![key("web", "127.0.0.1:8003")],
                ..row(
                    "listeners: one stays, one closes, one opens",
                    file(
                        "",
                        &[("web", "blue", "\"127.0.0.1:8001\", \"127.0.0.1:8003\"")],
                        &[("blue", AB), ("green", G)],
                    ),
                    true,
                    true,
                )
            },
            Case {
                close: vec![key("web", "127.0.0.1:8001"), key("web", "127.0.0.1:8002")],
                open: vec![key("www", "127.0.0.1:8001"), key("www", "127.0.0.1:8002")],
                ..row(
                    "a renamed service is a new service: its listeners move, its redirect goes",
                    file("", &[("www", "blue", same_listen)], &[("blue", AB), ("green", G)]),
                    false,
                    true,
                )
            },
            row(
                "the file changes the service's cluster: the redirect goes",
                file("", &[("web", "green", same_listen)], &[("blue", AB), ("green", G)]),
                false,
                true,
            ),
            row(
                "the redirect's target cluster is removed: the redirect goes",
                file("", &[("web", "blue", same_listen)], &[("blue", AB)]),
                false,
                true,
            ),
            row(
                "the file changes the node's state: the file's state applies",
                file("", &[("web", "blue", same_listen)], &[("blue", red_a), ("green", G)]),
                true,
                false,
            ),
            row(
                "the node's address changes: a new node, in the file's state",
                file("", &[("web", "blue", same_listen)], &[("blue", moved_a), ("green", G)]),
                true,
                false,
            ),
            row(
                "the node is removed: its state goes",
                file("", &[("web", "blue", same_listen)], &[("blue", only_b), ("green", G)]),
                true,
                false,
            ),
            Case {
                restart_only: vec![
                    RestartOnly::Threads(3),
                    RestartOnly::PinWorkers(true),
                    RestartOnly::BusyPoll(Some(Duration::from_micros(50))),
                    RestartOnly::AdminListen(AdminListen::Tcp("127.0.0.1:9999".parse().unwrap())),
                    RestartOnly::LogFormat(LogFormat::Json),
                ],
                ..row(
                    "restart-only settings are named, nothing else changes",
                    file(
                        "threads = 3\npin_workers = true\nbusy_poll = \"50us\"\nlog_format = \"json\"\n[admin]\nlisten = \"127.0.0.1:9999\"",
                        &[("web", "blue", same_listen)],
                        &[("blue", AB), ("green", G)],
                    ),
                    true,
                    true,
                )
            },
        ]
    }

    #[test]
    fn every_reload_rule() {
        for case in cases().into_iter().chain(refusal_cases()) {
            let mut old = with_overrides(base(), true, true);
            old.process = case.process.clone();
            let p = plan(&old, &case.new);
            let what = case.what;
            assert_eq!(p.close, case.close, "{what}: close");
            assert_eq!(p.open, case.open, "{what}: open");
            assert_eq!(
                p.overrides.redirects.contains_key("web"),
                case.redirect_kept,
                "{what}: redirect"
            );
            assert_eq!(
                p.redirects_dropped.is_empty(),
                case.redirect_kept,
                "{what}: redirects_dropped"
            );
            assert_eq!(
                p.overrides.node_states.contains_key(&pair("blue", "a")),
                case.state_kept,
                "{what}: node state"
            );
            assert_eq!(p.states_dropped.is_empty(), case.state_kept, "{what}: states_dropped");
            assert_eq!(p.restart_only, case.restart_only, "{what}: restart-only");
            assert_eq!(p.refused, case.refused, "{what}: refused");
        }
    }

    #[test]
    fn nodes_that_stay_keep_their_figures_and_others_do_not() {
        let moved_a: &[(&str, &str, &str)] = &[("a", "127.0.0.1:9", "green"), ("b", "127.0.0.1:2", "green")];
        let new = file(
            "",
            &[("web", "blue", "\"127.0.0.1:8001\"")],
            &[("blue", moved_a), ("other", G)],
        );
        let p = plan(&ControlState::new(base()), &new);
        assert_eq!(
            p.nodes_kept,
            vec![pair("blue", "b")],
            "a moved; g is in another cluster now"
        );
    }

    #[test]
    fn without_overrides_nothing_is_dropped() {
        let new = file("", &[("web", "green", "\"127.0.0.1:8001\"")], &[("green", G)]);
        let p = plan(&ControlState::new(base()), &new);
        assert!(p.redirects_dropped.is_empty() && p.states_dropped.is_empty());
        assert_eq!(p.overrides, Overrides::default());
    }

    // Listeners alone.

    fn listen_file(services: &[(&str, &str)]) -> Config {
        let mut text = String::from("state_dir = \"\"\n");
        for (name, listen) in services {
            text.push_str(&format!(
                "[[service]]\nname = \"{name}\"\nlisten = [{listen}]\ncluster = \"c\"\n"
            ));
        }
        text.push_str("[[cluster]]\nname = \"c\"\n[[cluster.node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\n");
        Config::parse(&text, "test").expect("valid test config")
    }

    #[test]
    fn same_config_changes_nothing() {
        let c = listen_file(&[("web", "\"127.0.0.1:8080\", \"127.0.0.1:9000-9002\"")]);
        assert_eq!(listener_changes(&c, &c), (vec![], vec![]));
    }

    #[test]
    fn added_removed_and_narrowed_listeners() {
        let old = listen_file(&[
            ("web", "\"127.0.0.1:8080\", \"127.0.0.1:9000-9002\""),
            ("gone", "\"127.0.0.1:7000\""),
        ]);
        let new = listen_file(&[
            ("web", "\"127.0.0.1:8080\", \"127.0.0.1:9001-9003\""),
            ("mail", "\"127.0.0.1:2525\""),
        ]);
        let (close, open) = listener_changes(&old, &new);
        assert_eq!(close, vec![key("gone", "127.0.0.1:7000"), key("web", "127.0.0.1:9000")]);
        assert_eq!(open, vec![key("mail", "127.0.0.1:2525"), key("web", "127.0.0.1:9003")]);
    }

    #[test]
    fn an_address_moving_between_services_closes_and_opens() {
        let old = listen_file(&[("a", "\"127.0.0.1:8080\"")]);
        let new = listen_file(&[("b", "\"127.0.0.1:8080\"")]);
        let (close, open) = listener_changes(&old, &new);
        assert_eq!(close, vec![key("a", "127.0.0.1:8080")]);
        assert_eq!(open, vec![key("b", "127.0.0.1:8080")]);
    }

    #[test]
    fn port_zero_listener_stays_across_reloads() {
        let old = listen_file(&[("web", "\"127.0.0.1:0\"")]);
        assert_eq!(listener_changes(&old, &old.clone()), (vec![], vec![]));
    }
}
