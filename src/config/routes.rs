//! `[[service.route]]`: TLS passthrough routing by the server name a
//! client's ClientHello carries (SNI). Each route names exact names
//! (`api.example.com`) or wildcards (`*.example.com`: any name ending in
//! `.example.com`, however many labels before it, but not `example.com`
//! itself) and the cluster that serves them. Names are compared without
//! regard to case; the longest match wins, an exact name before any
//! wildcard. Validation and matching only; the ClientHello is read by
//! `proxy::sni`.

use serde::Deserialize;
use toml::Spanned;

use super::ConfigError;
use super::validate::Ctx;

/// The longest server name: a DNS name's limit.
pub const MAX_SERVER_NAME: usize = 253;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    sni: Spanned<Vec<Spanned<String>>>,
    cluster: Spanned<String>,
}

/// One name a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniName {
    /// This name exactly (lower case).
    Exact(String),
    /// Any name ending in this suffix (lower case, with its leading dot).
    Suffix(String),
}

impl SniName {
    fn parse(text: &str) -> Result<SniName, &'static str> {
        let lower = text.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        if name.is_empty() || name.len() > MAX_SERVER_NAME {
            return Err("must be a host name of 1 to 253 characters");
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(if label.contains('*') {
                    "a wildcard is only \"*.\" at the start of a name"
                } else {
                    "each label must be 1 to 63 letters, digits, '-' or '_', not starting or ending with '-'"
                });
            }
        }
        if wildcard && !name.contains('.') {
            return Err("a wildcard needs at least two labels after \"*.\" (\"*.example.com\")");
        }
        Ok(if wildcard {
            SniName::Suffix(format!(".{name}"))
        } else {
            SniName::Exact(name.to_string())
        })
    }

    /// How well it matches `name` (lower case): `None` when it does not,
    /// else a rank where higher wins.
    fn rank(&self, name: &str) -> Option<usize> {
        match self {
            // Above any wildcard.
            SniName::Exact(exact) => (exact == name).then_some(usize::MAX),
            SniName::Suffix(suffix) => {
                (name.len() > suffix.len() && name.ends_with(suffix.as_str())).then_some(suffix.len())
            }
        }
    }

    /// As the file would write it.
    pub fn text(&self) -> String {
        match self {
            SniName::Exact(name) => name.clone(),
            SniName::Suffix(suffix) => format!("*{suffix}"),
        }
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub names: Vec<SniName>,
    pub cluster: String,
}

/// The route of `name` (any case) among `routes`: the longest match, an
/// exact name before any wildcard; `None` when no route matches.
pub fn route_of<'r>(routes: &'r [Route], name: &str) -> Option<(usize, &'r Route)> {
    let mut lower = [0u8; MAX_SERVER_NAME];
    let bytes = name.as_bytes();
    if bytes.len() > MAX_SERVER_NAME {
        return None;
    }
    for (l, b) in lower.iter_mut().zip(bytes) {
        *l = b.to_ascii_lowercase();
    }
    let lower = std::str::from_utf8(&lower[..bytes.len()]).ok()?;
    let lower = lower.strip_suffix('.').unwrap_or(lower);
    routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((r.names.iter().filter_map(|n| n.rank(lower)).max()?, i, r)))
        .max_by_key(|(rank, i, _)| (*rank, usize::MAX - i))
        .map(|(_, i, r)| (i, r))
}

pub(super) fn routes(
    ctx: &Ctx<'_>,
    what: &str,
    raw: &[RawRoute],
    clusters: &[&str],
) -> Result<Vec<Route>, ConfigError> {
    let mut seen: Vec<SniName> = Vec::new();
    raw.iter()
        .map(|r| {
            if !clusters.contains(&r.cluster.get_ref().as_str()) {
                return Err(ctx.bad(what, "route cluster", &r.cluster, "no [[cluster]] has this name"));
            }
            if r.sni.get_ref().is_empty() {
                return Err(ctx.bad(what, "route sni", &r.sni, "needs at least one name"));
            }
            let names = r
                .sni
                .get_ref()
                .iter()
                .map(|n| {
                    let name = SniName::parse(n.get_ref()).map_err(|why| ctx.bad(what, "route sni", n, why))?;
                    if seen.contains(&name) {
                        return Err(ctx.bad(what, "route sni", n, "this name is in another route already"));
                    }
                    seen.push(name.clone());
                    Ok(name)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Route {
                names,
                cluster: r.cluster.get_ref().clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(names: &[&str], cluster: &str) -> Route {
        Route {
            names: names.iter().map(|n| SniName::parse(n).unwrap()).collect(),
            cluster: cluster.into(),
        }
    }

    #[test]
    fn the_longest_match_wins_and_exact_names_first() {
        let routes = [
            route(&["*.example.com"], "wide"),
            route(&["*.api.example.com"], "api"),
            route(&["www.api.example.com", "Shop.Example.com"], "exact"),
        ];
        let to = |name: &str| route_of(&routes, name).map(|(_, r)| r.cluster.as_str());
        assert_eq!(to("a.example.com"), Some("wide"));
        assert_eq!(to("a.b.example.com"), Some("wide"));
        assert_eq!(to("v1.api.example.com"), Some("api"));
        assert_eq!(to("WWW.API.EXAMPLE.COM"), Some("exact"));
        assert_eq!(
            to("shop.example.com."),
            Some("exact"),
            "a trailing dot is the same name"
        );
        assert_eq!(to("example.com"), None, "a wildcard needs a label before it");
        assert_eq!(to("other.org"), None);
        assert_eq!(to(&"a".repeat(300)), None);
    }

    #[test]
    fn bad_names_say_why() {
        for (bad, why) in [
            ("*", "only \"*.\" at the start"),
            ("*.com", "two labels"),
            ("a.*.com", "only \"*.\" at the start"),
            ("-a.com", "not starting or ending"),
            ("a..com", "each label"),
            ("", "1 to 253"),
        ] {
            assert!(SniName::parse(bad).unwrap_err().contains(why), "{bad:?}");
        }
    }
}
