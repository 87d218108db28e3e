//! The `[shared]` table: the store that instances sharing a `key_prefix`
//! keep their pins and run-time overrides in (Redis: `redis://`,
//! `rediss://` with TLS, or `unix://` for its socket), this instance's name,
//! and how long a new client's pin lookup may hold its connection.
//! Validation only; the store itself is `crate::shared`'s.
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
    if !["redis", "rediss", "unix", "redis+unix"].contains(&scheme) || !url.contains("://") {
        return Err(bad_url("must be a redis://, rediss:// or unix:// URL".to_string()));
    }
    redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .map_err(|e| bad_url(format!("not a store URL Redis understands ({:?})", e.kind())))?;
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
    use super::redact;

    #[test]
    fn a_redacted_url_has_no_password() {
        assert_eq!(redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://10.0.0.5:6379/0");
        assert_eq!(redact("rediss://user:p@ss@host/1"), "rediss://host/1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
