//! The keys of a cluster's health: its active checks (`[cluster.check]`,
//! also in `[defaults]`), `slow_start` and `on_unavailable`. Parsing and
//! validation only; the checks themselves run in `health::check`.
//!
//! A cluster's `[cluster.check]` table replaces the `[defaults]` one whole
//! (the keys are not merged one by one): a check is one protocol's
//! conversation, and half of one taken from elsewhere would be a surprise.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::validate::Ctx;

/// `interval` when the check table leaves it out.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// `timeout` when the check table leaves it out.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// `rise` when the check table leaves it out.
pub const DEFAULT_RISE: u32 = 2;
/// `fall` when the check table leaves it out.
pub const DEFAULT_FALL: u32 = 3;
/// The most `rise` or `fall` may be: beyond it a node would never change.
const MAX_RISE_FALL: i64 = 1000;
/// The most bytes one `send` or `expect` step may hold.
const MAX_STEP: usize = 4096;

/// `[cluster.check]`: how every node of the cluster is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub kind: CheckKind,
    /// Each node is checked this often (each at its own moment within it).
    pub interval: Duration,
    /// One check that has not passed within this has failed.
    pub timeout: Duration,
    /// Consecutive passes that make an unavailable node available.
    pub rise: u32,
    /// Consecutive failures that make an available node unavailable.
    pub fall: u32,
    /// The port checked instead of the node's own.
    pub port: Option<u16>,
}

/// What one check does once connected.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    /// The connect is the check.
    Tcp,
    /// `GET path`; the status must be within `expect_status`.
    Http {
        path: String,
        /// The `Host` header (`None`: the address checked).
        host: Option<String>,
        expect_status: (u16, u16),
    },
    /// A `220` greeting, then `QUIT`.
    Smtp,
    /// A `* OK` greeting, then `LOGOUT`.
    Imap,
    /// A `+OK` greeting, then `QUIT`.
    Pop3,
    /// A `220` greeting, then `QUIT`.
    Ftp,
    /// Steps in order: bytes to send, or text the reply must contain.
    SendExpect(Vec<Step>),
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Smtp => "smtp",
            CheckKind::Imap => "imap",
            CheckKind::Pop3 => "pop3",
            CheckKind::Ftp => "ftp",
            CheckKind::SendExpect(_) => "send-expect",
        }
    }
}

/// One step of a `send-expect` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(Vec<u8>),
    /// What has been read since the last send must come to contain this.
    Expect(Vec<u8>),
}

/// `on_unavailable`: what a node's open connections get when an active
/// check turns it unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// They carry on: the node only stops getting new clients.
    #[default]
    Keep,
    /// They are cut, as when the node turns red.
    Cut,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<String>>,
    steps: Option<Spanned<Vec<RawStep>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    send: Option<String>,
    expect: Option<String>,
}

/// The cluster's check: its own table, else the `[defaults]` one, else none.
pub(super) fn check(
    ctx: &Ctx<'_>,
    what: &str,
    own: Option<&Spanned<RawCheck>>,
    default: Option<&Spanned<RawCheck>>,
) -> Result<Option<CheckConfig>, ConfigError> {
    let Some(raw) = own.or(default) else { return Ok(None) };
    let what = format!("{what}check: ");
    let table = raw.get_ref();
    let kind_name = table.kind.as_ref().map_or("tcp", |k| k.get_ref().as_str());
    let only_for = |key: &str, value: Option<std::ops::Range<usize>>, kind: &str| {
        value.map_or(Ok(()), |span| {
            Err(ctx.error(
                Some(span),
                format!("{what}{key}: only for type = \"{kind}\" (this check is \"{kind_name}\")"),
            ))
        })
    };
    if kind_name != "http" {
        only_for("path", table.path.as_ref().map(Spanned::span), "http")?;
        only_for("host", table.host.as_ref().map(Spanned::span), "http")?;
        only_for("expect_status", table.expect_status.as_ref().map(Spanned::span), "http")?;
    }
    if kind_name != "send-expect" {
        only_for("steps", table.steps.as_ref().map(Spanned::span), "send-expect")?;
    }
    let kind = match kind_name {
        "tcp" => CheckKind::Tcp,
        "smtp" => CheckKind::Smtp,
        "imap" => CheckKind::Imap,
        "pop3" => CheckKind::Pop3,
        "ftp" => CheckKind::Ftp,
        "http" => CheckKind::Http {
            path: http_path(ctx, &what, table.path.as_ref())?,
            host: table.host.as_ref().map(|h| host(ctx, &what, h)).transpose()?,
            expect_status: table
                .expect_status
                .as_ref()
                .map_or(Ok((200, 399)), |s| status_range(ctx, &what, s))?,
        },
        "send-expect" => CheckKind::SendExpect(steps(ctx, &what, raw, table.steps.as_ref())?),
        _ => {
            let k = table.kind.as_ref().expect("only a written type can be unknown");
            return Err(ctx.bad(
                &what,
                "type",
                k,
                "must be one of tcp, http, smtp, imap, pop3, ftp, send-expect",
            ));
        }
    };
    let duration = |key: &str, value: Option<&Spanned<String>>, fallback: Duration| match value {
        None => Ok(fallback),
        Some(v) => {
            let d = ctx.duration(&what, key, v)?;
            if d < Duration::from_millis(1) {
                return Err(ctx.bad(&what, key, v, "must be at least 1ms"));
            }
            Ok(d)
        }
    };
    let interval = duration("interval", table.interval.as_ref(), DEFAULT_CHECK_INTERVAL)?;
    let timeout = duration("timeout", table.timeout.as_ref(), DEFAULT_CHECK_TIMEOUT.min(interval))?;
    if timeout > interval {
        let t = table
            .timeout
            .as_ref()
            .expect("only a written timeout exceeds the interval");
        return Err(ctx.bad(
            &what,
            "timeout",
            t,
            format!("must not be longer than the interval ({interval:?}): one check at a time per node"),
        ));
    }
    let count = |key: &str, value: Option<&Spanned<i64>>, fallback: u32| match value {
        None => Ok(fallback),
        Some(v) if (1..=MAX_RISE_FALL).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
        Some(v) => Err(ctx.bad(&what, key, v, format!("must be 1 to {MAX_RISE_FALL}"))),
    };
    let port = match &table.port {
        None => None,
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => return Err(ctx.bad(&what, "port", p, "must be 1 to 65535")),
    };
    Ok(Some(CheckConfig {
        kind,
        interval,
        timeout,
        rise: count("rise", table.rise.as_ref(), DEFAULT_RISE)?,
        fall: count("fall", table.fall.as_ref(), DEFAULT_FALL)?,
        port,
    }))
}

fn http_path(ctx: &Ctx<'_>, what: &str, path: Option<&Spanned<String>>) -> Result<String, ConfigError> {
    let Some(p) = path else { return Ok("/".to_string()) };
    let text = p.get_ref();
    if !text.starts_with('/') || text.len() > 1024 || text.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ctx.bad(
            what,
            "path",
            p,
            "must start with / and hold no space or control character (at most 1024 bytes)",
        ));
    }
    Ok(text.clone())
}

fn host(ctx: &Ctx<'_>, what: &str, host: &Spanned<String>) -> Result<String, ConfigError> {
    let text = host.get_ref();
    if text.is_empty() || text.len() > 255 || text.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(ctx.bad(
            what,
            "host",
            host,
            "must be a host name (no space or control character, at most 255 bytes)",
        ));
    }
    Ok(text.clone())
}

/// `"200"` or `"200-399"`: HTTP status codes, 100 to 599.
fn status_range(ctx: &Ctx<'_>, what: &str, value: &Spanned<String>) -> Result<(u16, u16), ConfigError> {
    let bad = |why: &str| ctx.bad(what, "expect_status", value, why);
    let code = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| bad("expected a status code 100 to 599, or a range such as \"200-399\""))
    };
    let (low, high) = match value.get_ref().split_once('-') {
        Some((low, high)) => (code(low)?, code(high)?),
        None => {
            let c = code(value.get_ref())?;
            (c, c)
        }
    };
    if low > high {
        return Err(bad("the range is reversed"));
    }
    Ok((low, high))
}

fn steps(
    ctx: &Ctx<'_>,
    what: &str,
    table: &Spanned<RawCheck>,
    steps: Option<&Spanned<Vec<RawStep>>>,
) -> Result<Vec<Step>, ConfigError> {
    let Some(written) = steps else {
        return Err(ctx.error(
            Some(table.span()),
            format!("{what}type = \"send-expect\" needs steps, e.g. steps = [{{send = \"PING\\r\\n\"}}, {{expect = \"+PONG\"}}]"),
        ));
    };
    let bad = |why: String| ctx.error(Some(written.span()), format!("{what}steps: {why}"));
    if written.get_ref().is_empty() {
        return Err(bad("has no step; give at least one send or expect".to_string()));
    }
    written
        .get_ref()
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let n = i + 1;
            let step = match (&step.send, &step.expect) {
                (Some(send), None) => Step::Send(send.clone().into_bytes()),
                (None, Some(expect)) if expect.is_empty() => {
                    return Err(bad(format!("step {n}: expect is empty (it would match anything)")));
                }
                (None, Some(expect)) => Step::Expect(expect.clone().into_bytes()),
                _ => return Err(bad(format!("step {n}: needs exactly one of send or expect"))),
            };
            match &step {
                Step::Send(b) | Step::Expect(b) if b.len() > MAX_STEP => {
                    Err(bad(format!("step {n}: longer than {MAX_STEP} bytes")))
                }
                _ => Ok(step),
            }
        })
        .collect()
}

/// `slow_start`: `None` when it is left out.
pub(super) fn slow_start(
    ctx: &Ctx<'_>,
    what: &str,
    value: Option<&Spanned<String>>,
) -> Result<Option<Duration>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let d = ctx.duration(what, "slow_start", v)?;
    if d.is_zero() {
        return Err(ctx.bad(what, "slow_start", v, "must be above zero (leave it out for none)"));
    }
    Ok(Some(d))
}

/// `on_unavailable`, `keep` when it is left out.
pub(super) fn on_unavailable(
    ctx: &Ctx<'_>,
    what: &str,
    value: Option<&Spanned<String>>,
) -> Result<OnUnavailable, ConfigError> {
    match value {
        None => Ok(OnUnavailable::default()),
        Some(v) => match v.get_ref().as_str() {
            "keep" => Ok(OnUnavailable::Keep),
            "cut" => Ok(OnUnavailable::Cut),
            _ => Err(ctx.bad(what, "on_unavailable", v, "must be \"keep\" or \"cut\"")),
        },
    }
}
