//! Validation: raw structs → a [`Config`] in which every name refers to
//! something that exists, with errors that name the key, the bad value and
//! the line. Layered keys (a cluster's own value, else `[defaults]`, else the
//! built-in default) are resolved here.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::admin::validate_admin;
use super::health;
use super::identity::{self, ProxyHeader};
use super::raw::{RawCluster, RawConfig, RawDefaults, RawNode, RawService};
use super::values::{
    AlgorithmKind, ForwardMode, ListenSpec, LogFormat, NodeAddress, NodeState, SocketBuffer, is_name,
    lookup_at_blocking, parse_duration, parse_listen, parse_node_address, parse_socket_buffer,
};
use super::{
    ClusterConfig, Config, ConfigError, DEFAULT_AFFINITY_TTL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RESOLVE_INTERVAL,
    DEFAULT_RETRY_INTERVAL, DEFAULT_SHUTDOWN_GRACE, LastResort, LoadRating, MAX_WEIGHT, NodeConfig, RunAs,
    ServiceConfig, ServiceLimits,
};

/// The text being validated, for turning spans into line numbers.
pub(super) struct Ctx<'a> {
    pub(super) text: &'a str,
    pub(super) source_name: &'a str,
    pub(super) resolve: &'a dyn Fn(&str, u16) -> Option<SocketAddr>,
    /// Whether `resolver = "IP:PORT"` may send queries (not for a parse
    /// with a resolver of the caller's own, such as tests' offline one).
    pub(super) custom_dns: bool,
}

impl Ctx<'_> {
    pub(super) fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        let line = span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1);
        ConfigError {
            source_name: self.source_name.to_string(),
            line,
            message,
        }
    }

    /// An error about `key = value` at the value's position.
    pub(super) fn bad<T: fmt::Debug>(
        &self,
        what: &str,
        key: &str,
        value: &Spanned<T>,
        why: impl fmt::Display,
    ) -> ConfigError {
        self.error(
            Some(value.span()),
            format!("{what}{key} = {:?}: {why}", value.get_ref()),
        )
    }

    pub(super) fn duration(&self, what: &str, key: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
        parse_duration(value.get_ref()).map_err(|why| self.bad(what, key, value, why))
    }

    /// A duration that may be left out (`None`) but, where written, is above zero.
    fn optional_duration(
        &self,
        what: &str,
        key: &str,
        value: Option<&Spanned<String>>,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let d = self.duration(what, key, value)?;
        if d.is_zero() {
            return Err(self.bad(what, key, value, "must be above zero (leave it out for none)"));
        }
        Ok(Some(d))
    }

    fn socket_buffer(&self, what: &str, value: Option<&Spanned<String>>) -> Result<Option<SocketBuffer>, ConfigError> {
        value
            .map(|v| parse_socket_buffer(v.get_ref()).map_err(|why| self.bad(what, "socket_buffer", v, why)))
            .transpose()
    }
}

/// Picks the cluster's own value, else the `[defaults]` one, else `fallback`.
fn layered<'a, T>(own: &'a Option<Spanned<T>>, default: &'a Option<Spanned<T>>) -> Option<&'a Spanned<T>> {
    own.as_ref().or(default.as_ref())
}

impl RawConfig {
    pub(super) fn validate(self, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
        let top = "";
        let state_dir = self
            .state_dir
            .map(|s| PathBuf::from(s.into_inner()))
            .unwrap_or_default();
        let threads = match &self.threads {
            None => 0,
            Some(t) => usize::try_from(*t.get_ref())
                .ok()
                .filter(|n| *n <= 1024)
                .ok_or_else(|| ctx.bad(top, "threads", t, "must be 0 (one per CPU) to 1024"))?,
        };
        let pin_workers = self.pin_workers.is_some_and(|p| p.into_inner());
        let busy_poll = ctx.optional_duration(top, "busy_poll", self.busy_poll.as_ref())?;
        let shutdown_grace = match &self.shutdown_grace {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(d) => ctx.duration(top, "shutdown_grace", d)?,
        };
        let forwarding = match &self.forwarding {
            None => ForwardMode::Auto,
            Some(f) => match f.get_ref().as_str() {
                "auto" => ForwardMode::Auto,
                "splice" => ForwardMode::Splice,
                "copy" => ForwardMode::Copy,
                _ => return Err(ctx.bad(top, "forwarding", f, "expected \"auto\", \"splice\" or \"copy\"")),
            },
        };
        let log_format = match &self.log_format {
            None => LogFormat::Text,
            Some(f) => LogFormat::parse(f.get_ref())
                .ok_or_else(|| ctx.bad(top, "log_format", f, "expected \"text\" or \"json\""))?,
        };
        let max_connections = self
            .max_connections
            .as_ref()
            .map(|m| positive(ctx, top, "max_connections", m))
            .transpose()?;
        let admin = validate_admin(ctx, self.admin)?;
        let shared = super::shared::shared(ctx, self.shared.as_ref())?;
        let run_as = validate_run_as(ctx, self.user.as_ref(), self.group.as_ref())?;
        let defaults = self.defaults.unwrap_or_default();

        let resolver = match &self.resolver {
            None => None,
            Some(r) => Some(r.get_ref().parse::<SocketAddr>().map_err(|_| {
                ctx.bad(
                    top,
                    "resolver",
                    r,
                    "expected IP:PORT of a DNS server (\"127.0.0.53:53\")",
                )
            })?),
        };
        // With a DNS server of its own, the file's host names are resolved there.
        let at_server;
        let dns_ctx;
        let ctx = match resolver {
            Some(server) if ctx.custom_dns => {
                at_server = move |host: &str, port: u16| lookup_at_blocking(server, host, port);
                dns_ctx = Ctx {
                    text: ctx.text,
                    source_name: ctx.source_name,
                    resolve: &at_server,
                    custom_dns: true,
                };
                &dns_ctx
            }
            _ => ctx,
        };
        let clusters = validate_clusters(ctx, &self.cluster, &defaults)?;
        let services = validate_services(ctx, &self.service, &clusters)?;

        Ok(Config {
            state_dir,
            max_connections,
            threads,
            pin_workers,
            busy_poll,
            shutdown_grace,
            forwarding,
            log_format,
            run_as,
            admin,
            shared,
            resolver,
            services,
            clusters,
        })
    }
}

/// Every cluster, each name once.
fn validate_clusters(
    ctx: &Ctx<'_>,
    raw: &[RawCluster],
    defaults: &RawDefaults,
) -> Result<Vec<ClusterConfig>, ConfigError> {
    let mut clusters: Vec<ClusterConfig> = Vec::with_capacity(raw.len());
    for c in raw {
        if clusters.iter().any(|known| known.name == *c.name.get_ref()) {
            return Err(ctx.bad("cluster ", "name", &c.name, "duplicate cluster name"));
        }
        clusters.push(validate_cluster(ctx, c, defaults)?);
    }
    Ok(clusters)
}

/// Every service, each name once, each on a cluster that exists, no two
/// listen entries overlapping.
fn validate_services(
    ctx: &Ctx<'_>,
    raw: &[RawService],
    clusters: &[ClusterConfig],
) -> Result<Vec<ServiceConfig>, ConfigError> {
    let mut services = Vec::with_capacity(raw.len());
    let mut service_names = HashSet::new();
    let mut all_listen: Vec<(ListenSpec, &str)> = Vec::new();
    let cluster_names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    for raw in raw {
        let name = raw.name.get_ref();
        let what = format!("service \"{name}\": ");
        check_name(ctx, &what, &raw.name)?;
        if !service_names.insert(name.as_str()) {
            return Err(ctx.bad("service ", "name", &raw.name, "duplicate service name"));
        }
        if !clusters.iter().any(|c| c.name == *raw.cluster.get_ref()) {
            return Err(ctx.bad(&what, "cluster", &raw.cluster, "no [[cluster]] has this name"));
        }
        if raw.listen.get_ref().is_empty() {
            return Err(ctx.bad(&what, "listen", &raw.listen, "needs at least one address"));
        }
        let mut listen = Vec::new();
        for entry in raw.listen.get_ref() {
            let spec = parse_listen(entry.get_ref()).map_err(|why| ctx.bad(&what, "listen", entry, why))?;
            if let Some((other_spec, other)) = all_listen.iter().find(|(l, _)| l.overlaps(&spec)) {
                let owner = if *other == name.as_str() {
                    "this service".to_string()
                } else {
                    format!("service \"{other}\"")
                };
                return Err(ctx.bad(&what, "listen", entry, format!("overlaps {other_spec} of {owner}")));
            }
            all_listen.push((spec, name));
            listen.push(spec);
        }
        services.push(ServiceConfig {
            name: name.clone(),
            listen,
            cluster: raw.cluster.get_ref().clone(),
            limits: validate_limits(ctx, &what, raw)?,
            routes: super::routes::routes(ctx, &what, &raw.route, &cluster_names)?,
        });
    }
    Ok(services)
}

/// A count that must be at least 1.
fn positive(ctx: &Ctx<'_>, what: &str, key: &str, value: &Spanned<i64>) -> Result<u64, ConfigError> {
    u64::try_from(*value.get_ref())
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| ctx.bad(what, key, value, "must be 1 or more (leave it out for no limit)"))
}

fn validate_limits(ctx: &Ctx<'_>, what: &str, raw: &RawService) -> Result<ServiceLimits, ConfigError> {
    let networks = |key: &str, list: &[Spanned<String>]| -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.iter()
            .map(|entry| {
                let text = entry.get_ref();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        ctx.bad(
                            what,
                            key,
                            entry,
                            "expected an address or a network, e.g. 10.0.0.0/8 or ::1",
                        )
                    })
            })
            .collect()
    };
    let per_client = raw
        .max_connections_per_client
        .as_ref()
        .map(|m| {
            positive(ctx, what, "max_connections_per_client", m)?
                .try_into()
                .map_err(|_| ctx.bad(what, "max_connections_per_client", m, "too large"))
        })
        .transpose()?;
    let idle_timeout = ctx.optional_duration(what, "idle_timeout", raw.idle_timeout.as_ref())?;
    Ok(ServiceLimits {
        max_connections: raw
            .max_connections
            .as_ref()
            .map(|m| positive(ctx, what, "max_connections", m))
            .transpose()?,
        max_connections_per_client: per_client,
        idle_timeout,
        max_connection_age: ctx.optional_duration(what, "max_connection_age", raw.max_connection_age.as_ref())?,
        allow: networks("allow", &raw.allow)?,
        deny: networks("deny", &raw.deny)?,
        socket_buffer: ctx.socket_buffer(what, raw.socket_buffer.as_ref())?,
        accept_proxy_from: networks("accept_proxy_from", &raw.accept_proxy_from)?,
        accept_proxy_timeout: ctx
            .optional_duration(what, "accept_proxy_timeout", raw.accept_proxy_timeout.as_ref())?
            .unwrap_or(super::DEFAULT_ACCEPT_PROXY_TIMEOUT),
    })
}

fn check_name(ctx: &Ctx<'_>, what: &str, name: &Spanned<String>) -> Result<(), ConfigError> {
    if !is_name(name.get_ref()) {
        return Err(ctx.bad(what, "name", name, "use 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(())
}

/// `user` and `group`, looked up now so that `check` reports a missing one.
fn validate_run_as(
    ctx: &Ctx<'_>,
    user: Option<&Spanned<String>>,
    group: Option<&Spanned<String>>,
) -> Result<Option<RunAs>, ConfigError> {
    match (user, group) {
        (None, None) => Ok(None),
        (None, Some(g)) => Err(ctx.bad("", "group", g, "needs user: the group is the one that user runs in")),
        (Some(u), g) => super::account::look_up(u.get_ref(), g.map(|g| g.get_ref().as_str()))
            .map(Some)
            .map_err(|why| match g {
                Some(g) if why.contains("group") => ctx.bad("", "group", g, why),
                _ => ctx.bad("", "user", u, why),
            }),
    }
}

fn validate_cluster(ctx: &Ctx<'_>, raw: &RawCluster, defaults: &RawDefaults) -> Result<ClusterConfig, ConfigError> {
    let name = raw.name.get_ref();
    let what = format!("cluster \"{name}\": ");
    check_name(ctx, "cluster: ", &raw.name)?;
    let algorithm = validate_algorithm(ctx, &what, raw, defaults)?;
    let duration = |key, own, def, fallback, nonzero| layered_duration(ctx, &what, key, own, def, fallback, nonzero);
    let affinity_ttl = duration(
        "affinity_ttl",
        &raw.affinity_ttl,
        &defaults.affinity_ttl,
        DEFAULT_AFFINITY_TTL,
        false,
    )?;
    let connect_timeout = duration(
        "connect_timeout",
        &raw.connect_timeout,
        &defaults.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
        true,
    )?;
    let retry_interval = duration(
        "retry_interval",
        &raw.retry_interval,
        &defaults.retry_interval,
        DEFAULT_RETRY_INTERVAL,
        true,
    )?;
    let load_rating = match &raw.load_rating {
        None => None,
        Some(text) => Some(LoadRating::compile(text.get_ref()).map_err(|e| ctx.bad(&what, "load_rating", text, e))?),
    };
    if let Some(key) = &raw.hash_key
        && key.get_ref().is_empty()
    {
        return Err(ctx.bad(
            &what,
            "hash_key",
            key,
            "must not be empty (leave it out for the built-in key)",
        ));
    }
    if algorithm == AlgorithmKind::LeastLoad && raw.load_rating.is_none() {
        return Err(ctx.bad(
            &what,
            "algorithm",
            layered(&raw.algorithm, &defaults.algorithm).expect("least-load is never the default"),
            "least-load needs a load_rating expression",
        ));
    }
    Ok(ClusterConfig {
        name: name.clone(),
        algorithm,
        affinity: layered(&raw.affinity, &defaults.affinity).is_some_and(|a| *a.get_ref()),
        affinity_ttl,
        load_rating,
        hash_key: raw.hash_key.as_ref().map(|s| s.get_ref().clone()),
        connect_timeout,
        retry_interval,
        socket_buffer: ctx.socket_buffer(&what, layered(&raw.socket_buffer, &defaults.socket_buffer))?,
        last_resort: validate_last_resort(ctx, &what, raw)?,
        source: identity::source(ctx, &what, layered(&raw.source, &defaults.source))?,
        check: health::check(ctx, &what, raw.check.as_ref(), defaults.check.as_ref())?,
        slow_start: health::slow_start(ctx, &what, layered(&raw.slow_start, &defaults.slow_start))?,
        on_unavailable: health::on_unavailable(ctx, &what, layered(&raw.on_unavailable, &defaults.on_unavailable))?,
        resolve_interval: duration(
            "resolve_interval",
            &raw.resolve_interval,
            &defaults.resolve_interval,
            DEFAULT_RESOLVE_INTERVAL,
            true,
        )?,
        nodes: validate_nodes(ctx, raw, defaults)?,
    })
}

/// The cluster's `last_resort`, `try-unavailable` when it is not written.
fn validate_last_resort(ctx: &Ctx<'_>, what: &str, raw: &RawCluster) -> Result<LastResort, ConfigError> {
    match &raw.last_resort {
        None => Ok(LastResort::default()),
        Some(v) => match v.get_ref().as_str() {
            "try-unavailable" => Ok(LastResort::TryUnavailable),
            "refuse" => Ok(LastResort::Refuse),
            _ => Err(ctx.bad(what, "last_resort", v, "must be \"try-unavailable\" or \"refuse\"")),
        },
    }
}

/// The cluster's `algorithm` (or the `[defaults]` one), round robin when neither is written.
fn validate_algorithm(
    ctx: &Ctx<'_>,
    what: &str,
    raw: &RawCluster,
    defaults: &RawDefaults,
) -> Result<AlgorithmKind, ConfigError> {
    let Some(a) = layered(&raw.algorithm, &defaults.algorithm) else {
        return Ok(AlgorithmKind::RoundRobin);
    };
    AlgorithmKind::parse(a.get_ref()).ok_or_else(|| {
        let names: Vec<_> = AlgorithmKind::ALL.iter().map(|k| k.name()).collect();
        ctx.bad(
            what,
            "algorithm",
            a,
            format!("unknown algorithm; expected one of {}", names.join(", ")),
        )
    })
}

/// A cluster key that `[defaults]` may also set: the cluster's own value,
/// else the default's, else `fallback`; `nonzero`: zero is refused.
fn layered_duration(
    ctx: &Ctx<'_>,
    what: &str,
    key: &str,
    own: &Option<Spanned<String>>,
    default: &Option<Spanned<String>>,
    fallback: Duration,
    nonzero: bool,
) -> Result<Duration, ConfigError> {
    let Some(written) = layered(own, default) else {
        return Ok(fallback);
    };
    let d = ctx.duration(what, key, written)?;
    if nonzero && d.is_zero() {
        return Err(ctx.bad(what, key, written, "must be above zero"));
    }
    Ok(d)
}

/// The cluster's nodes: names, addresses, weights, states, agents, then the
/// fall-over chains (which may name nodes further down the list).
fn validate_nodes(ctx: &Ctx<'_>, raw: &RawCluster, defaults: &RawDefaults) -> Result<Vec<NodeConfig>, ConfigError> {
    let name = raw.name.get_ref();
    let what = format!("cluster \"{name}\": ");
    let send_proxy = identity::send_proxy(
        ctx,
        &what,
        layered(&raw.send_proxy, &defaults.send_proxy),
        ProxyHeader::None,
    )?;
    if raw.node.is_empty() {
        return Err(ctx.error(Some(raw.name.span()), format!("{what}has no [[cluster.node]]")));
    }
    let mut nodes = Vec::with_capacity(raw.node.len());
    let mut node_names = HashSet::new();
    for n in &raw.node {
        check_name(ctx, &what, &n.name)?;
        if !node_names.insert(n.name.get_ref().as_str()) {
            return Err(ctx.bad(&what, "node name", &n.name, "duplicate node name in this cluster"));
        }
        let mut node = validate_node(ctx, name, n)?;
        let nwhat = format!("{what}node \"{}\": ", n.name.get_ref());
        node.send_proxy = identity::send_proxy(ctx, &nwhat, n.send_proxy.as_ref(), send_proxy)?;
        nodes.push(node);
    }
    link_fallovers(ctx, name, &raw.node, &mut nodes)?;
    Ok(nodes)
}

fn validate_node(ctx: &Ctx<'_>, cluster: &str, n: &RawNode) -> Result<NodeConfig, ConfigError> {
    let nwhat = format!("cluster \"{cluster}\" node \"{}\": ", n.name.get_ref());
    let address = parse_node_address(n.address.get_ref(), ctx.resolve)
        .map_err(|why| ctx.bad(&nwhat, "address", &n.address, why))?;
    let weight = match &n.weight {
        None => 1,
        Some(w) => u32::try_from(*w.get_ref())
            .ok()
            .filter(|w| (1..=MAX_WEIGHT).contains(w))
            .ok_or_else(|| ctx.bad(&nwhat, "weight", w, format!("must be 1 to {MAX_WEIGHT}")))?,
    };
    let state = match &n.state {
        None => NodeState::Green,
        Some(s) => {
            NodeState::parse(s.get_ref()).ok_or_else(|| ctx.bad(&nwhat, "state", s, "expected green, yellow or red"))?
        }
    };
    let agent = match &n.agent {
        None => None,
        Some(a) => match parse_node_address(a.get_ref(), ctx.resolve) {
            Ok(NodeAddress::Socket(addr)) => Some(addr),
            Ok(NodeAddress::SamePort(_)) => return Err(ctx.bad(&nwhat, "agent", a, "needs a port: HOST:PORT")),
            Err(why) => return Err(ctx.bad(&nwhat, "agent", a, why)),
        },
    };
    Ok(NodeConfig {
        name: n.name.get_ref().clone(),
        address,
        address_text: n.address.get_ref().clone(),
        weight,
        fallover: None,
        state,
        agent,
        send_proxy: ProxyHeader::None,
    })
}

/// Resolves each `fallover` name to its node's index and refuses loops.
fn link_fallovers(ctx: &Ctx<'_>, cluster: &str, raw: &[RawNode], nodes: &mut [NodeConfig]) -> Result<(), ConfigError> {
    let nwhat = |n: &RawNode| format!("cluster \"{cluster}\" node \"{}\": ", n.name.get_ref());
    for (i, n) in raw.iter().enumerate() {
        let Some(f) = &n.fallover else { continue };
        let target = raw
            .iter()
            .position(|m| m.name.get_ref() == f.get_ref())
            .ok_or_else(|| ctx.bad(&nwhat(n), "fallover", f, "no node of this cluster has this name"))?;
        if target == i {
            return Err(ctx.bad(&nwhat(n), "fallover", f, "a node cannot be its own fall-over node"));
        }
        nodes[i].fallover = Some(target);
    }
    // A chain longer than the node count has revisited a node: a loop.
    for (i, n) in raw.iter().enumerate() {
        let mut at = nodes[i].fallover;
        let mut path = vec![nodes[i].name.as_str()];
        while let Some(next) = at {
            path.push(nodes[next].name.as_str());
            if next == i {
                let f = n.fallover.as_ref().expect("chain starts with a fallover");
                return Err(ctx.bad(&nwhat(n), "fallover", f, format!("forms a loop: {}", path.join(" -> "))));
            }
            if path.len() > nodes.len() + 1 {
                break; // reaches a loop that does not include node i; reported from inside it
            }
            at = nodes[next].fallover;
        }
    }
    Ok(())
}
