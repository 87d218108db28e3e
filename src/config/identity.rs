//! Client identity at the node: the keys that say how a node learns who the
//! client is — a PROXY protocol header sent first (`send_proxy`), the
//! connection bound to the client's own address or a fixed one (`source`) —
//! and from which upstream balancers a PROXY header is expected
//! (`accept_proxy_from`, `accept_proxy_timeout`). Parsing and validation
//! only; the header itself is written and read by `proxy::identity`.

use std::net::IpAddr;
use std::time::Duration;

use toml::Spanned;

use super::validate::Ctx;

/// How long a client from `accept_proxy_from` has to send its PROXY header.
pub const DEFAULT_ACCEPT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);

/// `send_proxy`: the PROXY protocol header a node gets first on every connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyHeader {
    /// No header: the node sees the bytes the client sent, nothing else.
    #[default]
    None,
    /// The text header, version 1 (`PROXY TCP4 … \r\n`).
    V1,
    /// The binary header, version 2.
    V2,
}

impl ProxyHeader {
    pub fn parse(text: &str) -> Option<ProxyHeader> {
        match text {
            "none" => Some(ProxyHeader::None),
            "v1" => Some(ProxyHeader::V1),
            "v2" => Some(ProxyHeader::V2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ProxyHeader::None => "none",
            ProxyHeader::V1 => "v1",
            ProxyHeader::V2 => "v2",
        }
    }
}

/// `source`: the local address of each connection to a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Source {
    /// The kernel's choice (the route's address toward the node).
    #[default]
    Kernel,
    /// The client's own IP (transparent: `IP_TRANSPARENT`, needs
    /// `CAP_NET_ADMIN` and routing, see docs/deployments.md); the port is the
    /// kernel's choice.
    Client,
    /// This fixed local IP; the port is the kernel's choice.
    Address(IpAddr),
}

impl Source {
    pub fn parse(text: &str) -> Option<Source> {
        match text {
            "client" => Some(Source::Client),
            other => other.parse().ok().map(Source::Address),
        }
    }
}

/// A layered `send_proxy`: the node's own, else the cluster's, else `[defaults]`'s.
pub(super) fn send_proxy(
    ctx: &Ctx<'_>,
    what: &str,
    value: Option<&Spanned<String>>,
    fallback: ProxyHeader,
) -> Result<ProxyHeader, super::ConfigError> {
    match value {
        None => Ok(fallback),
        Some(v) => ProxyHeader::parse(v.get_ref())
            .ok_or_else(|| ctx.bad(what, "send_proxy", v, "expected \"v1\", \"v2\" or \"none\"")),
    }
}

/// A cluster's `source`.
pub(super) fn source(ctx: &Ctx<'_>, what: &str, value: Option<&Spanned<String>>) -> Result<Source, super::ConfigError> {
    match value {
        None => Ok(Source::Kernel),
        Some(v) => Source::parse(v.get_ref()).ok_or_else(|| {
            ctx.bad(
                what,
                "source",
                v,
                "expected \"client\" (the client's own address) or an IP address",
            )
        }),
    }
}
