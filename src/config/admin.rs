//! The `[admin]` table: where the admin API listens (an IP and port, or a
//! Unix socket), its token (written in the file or read from `token_file`),
//! the `Host` names it answers to, and its connection budget. Validation
//! only; the API itself is `admin`'s, the socket `server`'s.
//!
//! Secrets: a token is never part of an error message, whatever is wrong
//! with it (too short, not a string, an unreadable file).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::file::{MAX_TOKEN_FILE, read_regular_file};
use super::raw::RawAdmin;
use super::validate::Ctx;
use super::{ConfigError, DEFAULT_ADMIN_LISTEN};

/// Default `[admin] max_connections`: a few dashboards and scripts at once.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default `[admin] header_timeout`.
pub const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[admin] request_timeout`.
pub const DEFAULT_ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default mode of a Unix admin socket: its owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Largest `[admin] max_connections`.
pub const MAX_ADMIN_CONNECTIONS: usize = 4096;

/// The `[admin]` settings. Its `Debug` hides the token.
#[derive(Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: AdminListen,
    /// From `token` or `token_file`.
    pub token: Option<String>,
    /// `Host` values accepted besides the listen address and loopback names.
    pub allowed_hosts: Vec<HostPort>,
    /// The Unix socket's permission bits (`socket_mode`).
    pub socket_mode: u32,
    /// Admin connections open at once, at most.
    pub max_connections: usize,
    /// How long a request's headers may take to arrive, counted from the
    /// connection's start or the previous answer (so: the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// How long a request may take from its headers to its answer.
    pub request_timeout: Duration,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("socket_mode", &format_args!("{:04o}", self.socket_mode))
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: AdminListen::Tcp(DEFAULT_ADMIN_LISTEN.parse().expect("default admin address parses")),
            token: None,
            allowed_hosts: Vec::new(),
            socket_mode: DEFAULT_SOCKET_MODE,
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            header_timeout: DEFAULT_ADMIN_HEADER_TIMEOUT,
            request_timeout: DEFAULT_ADMIN_REQUEST_TIMEOUT,
        }
    }
}

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    Tcp(SocketAddr),
    /// `unix:PATH`: no browser can reach it, and only who may write the
    /// socket file may connect.
    Unix(PathBuf),
}

impl AdminListen {
    /// Whether a socket bound here is reachable from other machines, so that
    /// it needs a token: a TCP address that is not a loopback one. An
    /// IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) counts as exposed:
    /// the rule reads the address as written, and `127.0.0.1` says the same
    /// thing plainly.
    pub fn is_exposed(&self) -> bool {
        match self {
            AdminListen::Tcp(addr) => !addr.ip().is_loopback(),
            AdminListen::Unix(_) => false,
        }
    }

    /// `unix:PATH`, or `IP:PORT`.
    pub fn parse(text: &str) -> Result<AdminListen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err("a unix socket needs an absolute path, e.g. unix:/run/protobalance/admin.sock".into());
            }
            if path.len() > 100 {
                return Err("socket path too long: at most 100 bytes".into());
            }
            return Ok(AdminListen::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>()
            .map(AdminListen::Tcp)
            .map_err(|_| "expected IP:PORT (e.g. 127.0.0.1:9900) or unix:PATH".into())
    }
}

impl fmt::Display for AdminListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminListen::Tcp(addr) => write!(f, "{addr}"),
            AdminListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A host name or IP literal, with or without a port, as a `Host` header or
/// an `allowed_hosts` entry writes it. The host is kept in lower case; an
/// IPv6 literal keeps its brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    /// `host`, `host:port`, `[v6]` or `[v6]:port`; `None` for anything else
    /// (empty, blanks, a path, a bad port).
    pub fn parse(text: &str) -> Option<HostPort> {
        let (host, port) = if text.starts_with('[') {
            let end = text.find(']')?;
            let (host, rest) = text.split_at(end + 1);
            host[1..end].parse::<std::net::Ipv6Addr>().ok()?;
            match rest {
                "" => (host, None),
                rest => (host, Some(rest.strip_prefix(':')?)),
            }
        } else {
            match text.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        let port = match port {
            None => None,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
            Some(_) => return None,
        };
        let name_ok = host.starts_with('[')
            || (!host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
        name_ok.then(|| HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The host as an IP address, when it is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
            .parse()
            .ok()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// `[admin]`, validated. The token rule: a socket that [`AdminListen::is_exposed`]
/// needs a token.
pub(super) fn validate_admin(ctx: &Ctx<'_>, raw: Option<RawAdmin>) -> Result<AdminConfig, ConfigError> {
    let what = "[admin] ";
    let Some(raw) = raw else {
        return Ok(AdminConfig::default());
    };
    let defaults = AdminConfig::default();
    let listen = match &raw.listen {
        None => defaults.listen,
        Some(l) => AdminListen::parse(l.get_ref()).map_err(|why| ctx.bad(what, "listen", l, why))?,
    };
    let token = validate_token(ctx, &raw)?;
    if listen.is_exposed() && token.is_none() {
        let l = raw.listen.as_ref().expect("a non-default address was written");
        return Err(ctx.bad(
            what,
            "listen",
            l,
            "not a loopback address, so [admin] token is required (or token_file)",
        ));
    }
    let allowed_hosts = raw
        .allowed_hosts
        .iter()
        .flatten()
        .map(|h| {
            HostPort::parse(h.get_ref()).ok_or_else(|| {
                ctx.bad(
                    what,
                    "allowed_hosts",
                    h,
                    "expected a host name or IP, with or without :PORT",
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let socket_mode = match &raw.socket_mode {
        None => DEFAULT_SOCKET_MODE,
        Some(m) => validate_socket_mode(ctx, &listen, m)?,
    };
    let max_connections = match &raw.max_connections {
        None => defaults.max_connections,
        Some(m) => usize::try_from(*m.get_ref())
            .ok()
            .filter(|n| (1..=MAX_ADMIN_CONNECTIONS).contains(n))
            .ok_or_else(|| {
                ctx.bad(
                    what,
                    "max_connections",
                    m,
                    format!("must be 1 to {MAX_ADMIN_CONNECTIONS}"),
                )
            })?,
    };
    let timeout = |key: &str, value: &Option<Spanned<String>>, default: Duration| match value {
        None => Ok(default),
        Some(v) => {
            let d = ctx.duration(what, key, v)?;
            if d < Duration::from_millis(100) {
                return Err(ctx.bad(what, key, v, "must be at least 100ms"));
            }
            Ok(d)
        }
    };
    Ok(AdminConfig {
        listen,
        token,
        allowed_hosts,
        socket_mode,
        max_connections,
        header_timeout: timeout("header_timeout", &raw.header_timeout, defaults.header_timeout)?,
        request_timeout: timeout("request_timeout", &raw.request_timeout, defaults.request_timeout)?,
    })
}

/// The token of `token` or `token_file` (not both). Errors never show it.
fn validate_token(ctx: &Ctx<'_>, raw: &RawAdmin) -> Result<Option<String>, ConfigError> {
    let what = "[admin] ";
    let hidden = |span, why: &str| ctx.error(Some(span), format!("{what}{why}"));
    let token = match (&raw.token, &raw.token_file) {
        (Some(_), Some(f)) => return Err(hidden(f.span(), "token_file: set token or token_file, not both")),
        (None, None) => return Ok(None),
        (Some(t), None) => match t.get_ref() {
            toml::Value::String(s) => s.clone(),
            // serde's own message would quote the value: a secret.
            _ => return Err(hidden(t.span(), "token: expected a string (value not shown)")),
        },
        (None, Some(f)) => {
            let path = PathBuf::from(f.get_ref());
            let text = read_regular_file(&path, MAX_TOKEN_FILE).map_err(|why| ctx.bad(what, "token_file", f, why))?;
            if let Some(why) = super::file::too_open(&path) {
                return Err(ctx.bad(what, "token_file", f, why));
            }
            text.trim().to_string()
        }
    };
    let span = raw
        .token
        .as_ref()
        .map(Spanned::span)
        .or(raw.token_file.as_ref().map(Spanned::span));
    let key = if raw.token.is_some() { "token" } else { "token_file" };
    if token.len() < 8 {
        return Err(hidden(
            span.clone().expect("a token was written"),
            &format!("{key}: too short, use at least 8 characters"),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(hidden(
            span.expect("a token was written"),
            &format!("{key}: use printable ASCII without blanks (what an Authorization header can carry)"),
        ));
    }
    Ok(Some(token))
}

/// `socket_mode = "0660"`: octal permission bits of a Unix socket, which
/// must let its owner in and give others nothing.
fn validate_socket_mode(ctx: &Ctx<'_>, listen: &AdminListen, raw: &Spanned<String>) -> Result<u32, ConfigError> {
    let what = "[admin] ";
    if !matches!(listen, AdminListen::Unix(_)) {
        return Err(ctx.bad(what, "socket_mode", raw, "only for listen = \"unix:PATH\""));
    }
    let text = raw.get_ref();
    let mode = (matches!(text.len(), 3 | 4) && text.bytes().all(|b| (b'0'..=b'7').contains(&b)))
        .then(|| u32::from_str_radix(text, 8).ok())
        .flatten()
        .ok_or_else(|| {
            ctx.bad(
                what,
                "socket_mode",
                raw,
                "expected octal permission bits, e.g. \"0660\"",
            )
        })?;
    if mode & 0o600 != 0o600 || mode & !0o770 != 0 {
        return Err(ctx.bad(
            what,
            "socket_mode",
            raw,
            "must give its owner read and write and others nothing (e.g. \"0600\" or \"0660\" with a group)",
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        let hp = |s: &str| HostPort::parse(s).map(|h| (h.host, h.port));
        assert_eq!(hp("LocalHost:9900"), Some(("localhost".into(), Some(9900))));
        assert_eq!(hp("lb1.example.com"), Some(("lb1.example.com".into(), None)));
        assert_eq!(hp("[::1]:80"), Some(("[::1]".into(), Some(80))));
        assert_eq!(hp("[::1]"), Some(("[::1]".into(), None)));
        assert_eq!(HostPort::parse("[::1]:80").unwrap().ip(), Some("::1".parse().unwrap()));
        assert_eq!(
            HostPort::parse("127.0.0.1:1").unwrap().ip(),
            Some("127.0.0.1".parse().unwrap())
        );
        for bad in [
            "", ":80", "a b", "a/b", "a:", "a:99999", "a:-1", "[::1", "[nope]:1", "[::1]x", "a:b:c",
        ] {
            assert_eq!(hp(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn debug_output_hides_the_token() {
        let admin = AdminConfig {
            token: Some("do-not-print-me".into()),
            ..AdminConfig::default()
        };
        let shown = format!("{admin:?}");
        assert!(
            !shown.contains("do-not-print-me") && shown.contains("(hidden)"),
            "{shown}"
        );
    }

    #[test]
    fn exposure_is_judged_on_the_address_as_written() {
        let exposed = |s: &str| AdminListen::parse(s).unwrap().is_exposed();
        assert!(!exposed("127.0.0.1:9900"));
        assert!(!exposed("[::1]:9900"));
        assert!(!exposed("unix:/run/protobalance/admin.sock"));
        assert!(exposed("0.0.0.0:9900"));
        assert!(exposed("[::ffff:127.0.0.1]:9900"));
        assert!(AdminListen::parse("unix:relative.sock").is_err());
    }
}
