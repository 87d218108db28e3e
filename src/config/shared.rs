//! The `[shared]` table: the store that instances sharing a `key_prefix`
//! keep their pins and run-time overrides in (Redis: `redis://`,
//! `rediss://` with TLS, `unix://` for its socket, or `redis+sentinel://`
//! and `rediss+sentinel://` for a Redis whose fall-over Sentinel runs), this
//! instance's name, and how long a new client's pin lookup may hold its
//! connection. Validation only; the store itself is `crate::shared`'s.
//!
//! Redis Cluster is not a store here: the twins' state is small (a key per
//! client, one hash of overrides), one primary holds it, and Sentinel gives
//! that primary its fall-over.
//!
//! Secrets: the store's password (in the URL, or read from
//! `password_file`) is never part of an error message or of [`SharedConfig`]'s
//! `Debug`; [`SharedConfig::display_url`] is the URL without it.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::file::{MAX_TOKEN_FILE, read_regular_file};
use super::validate::Ctx;

/// `key_prefix` when the table leaves it out.
pub const DEFAULT_KEY_PREFIX: &str = "protobalance";
/// `lookup_budget` when the table leaves it out: what a new client's
/// connection may wait for the store, at most.
pub const DEFAULT_LOOKUP_BUDGET: Duration = Duration::from_millis(5);
/// A sentinel's port when its URL leaves it out (Redis Sentinel's own).
const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// The most sentinels one URL may list.
const MAX_SENTINELS: usize = 16;
/// The longest `lookup_budget`: a store slower than this is down, as far as
/// clients are concerned.
const MAX_LOOKUP_BUDGET: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    store: Spanned<String>,
    instance: Option<Spanned<String>>,
    key_prefix: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    lookup_budget: Option<Spanned<String>>,
}

/// `[shared]`, validated. Its `Debug` hides the password.
#[derive(Clone, PartialEq)]
pub struct SharedConfig {
    /// The store's URL as written, password included (for connecting only).
    pub store: String,
    /// The password of `password_file`, which wins over one in the URL.
    pub password: Option<String>,
    /// This instance's name in the origin of what it writes.
    pub instance: String,
    pub key_prefix: String,
    pub lookup_budget: Duration,
    /// The sentinels and the primary they watch, for a `redis+sentinel://`
    /// or `rediss+sentinel://` store; `None` for a store reached directly.
    pub sentinel: Option<SentinelStore>,
}

/// A store whose primary Sentinel names: written
/// `redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/PRIMARY[/DB]`
/// (`rediss+sentinel://`: TLS to the sentinels and to the primary). The
/// user and password are the primary's (`password_file` wins over the
/// URL's); the sentinels are asked without one, as Sentinel runs by default.
#[derive(Clone, PartialEq)]
pub struct SentinelStore {
    /// Each sentinel as a URL the `redis` crate reads (`redis://HOST:PORT`).
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary by.
    pub primary: String,
    pub tls: bool,
    /// The primary's database.
    pub db: i64,
    /// The primary's user and password, from the URL.
    pub user: Option<String>,
    pub password: Option<String>,
}

/// A sentinel URL's parts, `Ok(None)` for a URL of another scheme; the
/// error never quotes the URL (it may hold the password).
fn sentinel_store(url: &str) -> Result<Option<SentinelStore>, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        (true, rest)
    } else {
        return Ok(None);
    };
    let scheme = if tls { "rediss" } else { "redis" };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user_info, hosts) = match authority.rsplit_once('@') {
        Some((user_info, hosts)) => (Some(user_info), hosts),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err("lists an empty sentinel address".to_string());
        }
        let has_port = match host.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => host.contains(':'),
        };
        let address = if has_port {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{DEFAULT_SENTINEL_PORT}")
        };
        let info = redis::IntoConnectionInfo::into_connection_info(address.as_str())
            .map_err(|e| format!("sentinel {host:?} is not an address ({:?})", e.kind()))?;
        if !matches!(
            info.addr(),
            redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::TcpTls { .. }
        ) {
            return Err(format!("sentinel {host:?} is not a host and port"));
        }
        sentinels.push(address);
    }
    if sentinels.len() > MAX_SENTINELS {
        return Err(format!("lists more than {MAX_SENTINELS} sentinels"));
    }
    let mut segments = path.split('/');
    let primary = segments.next().unwrap_or_default();
    if !super::values::is_name(primary) {
        return Err(
            "must name the primary the sentinels watch after the addresses (…/NAME or …/NAME/DB), \
                    1 to 64 letters, digits, '-', '_' or '.'"
                .to_string(),
        );
    }
    let db = segments.next().unwrap_or("0");
    if segments.next().is_some() || db.parse::<u16>().is_err() {
        return Err("takes a database number after the primary's name, and nothing more".to_string());
    }
    // The primary's user, password and database, read as the crate reads a
    // store URL (percent-decoding included), on a stand-in address.
    let primary_url = match user_info {
        Some(user_info) => format!("redis://{user_info}@127.0.0.1/{db}"),
        None => format!("redis://127.0.0.1/{db}"),
    };
    let info = redis::IntoConnectionInfo::into_connection_info(primary_url.as_str())
        .map_err(|e| format!("its user or password is not one Redis understands ({:?})", e.kind()))?;
    let settings = info.redis_settings();
    Ok(Some(SentinelStore {
        sentinels,
        primary: primary.to_string(),
        tls,
        db: settings.db(),
        user: settings.username().map(str::to_string),
        password: settings.password().map(str::to_string),
    }))
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("store", &self.display_url())
            .field("password", &self.password.as_ref().map(|_| "(hidden)"))
            .field("instance", &self.instance)
            .field("key_prefix", &self.key_prefix)
            .field("lookup_budget", &self.lookup_budget)
            .finish()
    }
}

impl SharedConfig {
    /// The store's URL without user and password, for logs and the status.
    pub fn display_url(&self) -> String {
        redact(&self.store)
    }
}

/// `url` with any `user:password@` taken out.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}{}", &url[..scheme_end + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

pub(super) fn shared(ctx: &Ctx<'_>, raw: Option<&RawShared>) -> Result<Option<SharedConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let what = "shared: ";
    let url = raw.store.get_ref();
    // Never quote the URL itself: it may hold the password.
    let bad_url = |why: String| {
        ctx.error(
            Some(raw.store.span()),
            format!("{what}store = {:?}: {why}", redact(url)),
        )
    };
    let scheme = url.split("://").next().unwrap_or_default();
    let schemes = [
        "redis",
        "rediss",
        "unix",
        "redis+unix",
        "redis+sentinel",
        "rediss+sentinel",
    ];
    if !schemes.contains(&scheme) || !url.contains("://") {
        return Err(bad_url(
            "must be a redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// URL".to_string(),
        ));
    }
    let sentinel = sentinel_store(url).map_err(bad_url)?;
    if sentinel.is_none() {
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| bad_url(format!("not a store URL Redis understands ({:?})", e.kind())))?;
    }
    let password = match &raw.password_file {
        None => None,
        Some(file) => {
            let text = read_regular_file(std::path::Path::new(file.get_ref()), MAX_TOKEN_FILE)
                .map_err(|why| ctx.bad(what, "password_file", file, why))?;
            let password = text.trim().to_string();
            if password.is_empty() {
                return Err(ctx.bad(what, "password_file", file, "is empty"));
            }
            Some(password)
        }
    };
    let instance = match &raw.instance {
        Some(name) => {
            name_like(ctx, what, "instance", name)?;
            name.get_ref().clone()
        }
        None => host_name(),
    };
    let key_prefix = match &raw.key_prefix {
        Some(prefix) => {
            name_like(ctx, what, "key_prefix", prefix)?;
            prefix.get_ref().clone()
        }
        None => DEFAULT_KEY_PREFIX.to_string(),
    };
    let lookup_budget = match &raw.lookup_budget {
        None => DEFAULT_LOOKUP_BUDGET,
        Some(v) => {
            let d = ctx.duration(what, "lookup_budget", v)?;
            if d.is_zero() || d > MAX_LOOKUP_BUDGET {
                return Err(ctx.bad(what, "lookup_budget", v, "must be above zero and at most 1s"));
            }
            d
        }
    };
    Ok(Some(SharedConfig {
        store: url.clone(),
        password,
        instance,
        key_prefix,
        lookup_budget,
        sentinel,
    }))
}

/// A name as the file's names (`values::is_name`): it goes into keys and log lines.
fn name_like(ctx: &Ctx<'_>, what: &str, key: &str, value: &Spanned<String>) -> Result<(), ConfigError> {
    if super::values::is_name(value.get_ref()) {
        Ok(())
    } else {
        Err(ctx.bad(what, key, value, "must be 1 to 64 letters, digits, '-', '_' or '.'"))
    }
}

/// This machine's host name, the default instance name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "protobalance".to_string())
}

#[cfg(test)]
mod tests {
    use super::{redact, sentinel_store};

    #[test]
    fn a_sentinel_url_names_its_sentinels_primary_and_database() {
        let store = sentinel_store("redis+sentinel://:p%40ss@10.0.0.1,10.0.0.2:26380,[::1]/mymaster/2")
            .unwrap()
            .unwrap();
        assert_eq!(
            store.sentinels,
            [
                "redis://10.0.0.1:26379",
                "redis://10.0.0.2:26380",
                "redis://[::1]:26379"
            ]
        );
        assert_eq!(store.primary, "mymaster");
        assert!(!store.tls);
        assert_eq!(store.db, 2);
        assert_eq!(store.password.as_deref(), Some("p@ss"));
        let tls = sentinel_store("rediss+sentinel://h/m").unwrap().unwrap();
        assert!(tls.tls);
        assert_eq!(tls.sentinels, ["rediss://h:26379"]);
        assert!(sentinel_store("redis://h/0").unwrap().is_none());
        for bad in [
            "redis+sentinel://h",
            "redis+sentinel://h/",
            "redis+sentinel://h,/m",
            "redis+sentinel://h/m/x",
            "redis+sentinel://h/m/1/2",
            "redis+sentinel://h:port/m",
            "redis+sentinel://:s3cret@h/bad name",
        ] {
            let e = sentinel_store(bad).err().unwrap_or_else(|| panic!("{bad} refused"));
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn a_redacted_url_has_no_password() {
        assert_eq!(redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://10.0.0.5:6379/0");
        assert_eq!(redact("rediss://user:p@ss@host/1"), "rediss://host/1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
