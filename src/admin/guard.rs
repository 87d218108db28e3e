//! The admin API's fences against browsers used as weapons: the rules that
//! keep a web page, from any origin, from reading the topology or changing
//! a node's state through the user's browser. Axum middleware, one rule a
//! function; what a request may do once it is in is the handlers'.
//!
//! - **Host** (DNS rebinding: a page whose name is made to resolve to
//!   127.0.0.1 reaches the API with its own name in `Host`): the `Host`
//!   must be a loopback name (`localhost`, `127.0.0.1`, `[::1]`) or an IP
//!   literal the socket is bound to, with the bound port, or an entry of
//!   `[admin] allowed_hosts`; else 421. A Unix socket, which no browser
//!   reaches, takes any `Host`.
//! - **Cross-site requests** (a page's form or `fetch` aimed at the API): a
//!   request that changes state (any method but GET and HEAD) must carry
//!   `Content-Type: application/json` (415 otherwise), which a page can only
//!   send after a CORS preflight that the API never grants, and an `Origin`,
//!   when it has one, that names the API itself (403 otherwise).
//! - **Headers on every answer**: a Content-Security-Policy that forbids
//!   framing (`frame-ancestors 'none'`) and, on the dashboard, lets only its
//!   own inline script and style run; `X-Content-Type-Options: nosniff`;
//!   `Referrer-Policy: no-referrer`; `X-Frame-Options: DENY` for browsers
//!   that predate `frame-ancestors`.
//!
//! Reasons go back as `{"error": ...}`; the values a request sent are not
//! logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::config::{AdminListen, HostPort};
use crate::control::Control;

/// What the fences judge a request against: the socket as bound, and the
/// `[admin]` settings in force (a reload may change `allowed_hosts`).
#[derive(Clone)]
pub(super) struct Fences {
    pub(super) control: Control,
    pub(super) bound: Arc<AdminListen>,
}

/// Refuses a request whose `Host` is not this API's (421).
pub(super) async fn check_host(State(fences): State<Fences>, request: Request, next: Next) -> Response {
    let allowed = fences.control.admin_config();
    if !host_allowed(host_of(&request), &fences.bound, &allowed.allowed_hosts) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not the admin API's address: use the address it listens on, localhost, \
             or a name listed in [admin] allowed_hosts",
        )
        .into_response();
    }
    next.run(request).await
}

/// Refuses a state-changing request that is not JSON (415) or that comes
/// from another origin (403).
pub(super) async fn check_cross_site(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN)
        && !same_origin(origin, host_of(&request))
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-origin request refused: Origin is not this admin API",
        )
        .into_response();
    }
    if !is_json(headers) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request that changes state needs Content-Type: application/json",
        )
        .into_response();
    }
    next.run(request).await
}

/// Adds the security headers to every answer (a handler's own CSP stays).
pub(super) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// The dashboard's policy: its own inline script and style (by digest), API
/// calls to its own origin, nothing else, never in a frame.
pub(super) fn dashboard_policy(page: &str) -> String {
    let digest = |tag: &str| {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let start = page.find(&open).map(|i| i + open.len()).unwrap_or(0);
        let end = page[start..].find(&close).map(|i| start + i).unwrap_or(start);
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&page.as_bytes()[start..end]))
    };
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        digest("script"),
        digest("style")
    )
}

/// The request's `Host` (or the authority of an absolute URI); `None` when
/// it has none, or more than one.
fn host_of(request: &Request) -> Option<&str> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.to_str().ok(),
        (None, None) => request.uri().authority().map(|a| a.as_str()),
        _ => None,
    }
}

/// The Host rule (see the module's documentation).
fn host_allowed(host: Option<&str>, bound: &AdminListen, allowed: &[HostPort]) -> bool {
    let AdminListen::Tcp(addr) = bound else {
        return true;
    };
    let Some(host) = host.and_then(HostPort::parse) else {
        return false;
    };
    // No port in Host means HTTP's default one.
    let this_port = host.port.unwrap_or(80) == addr.port();
    let loopback_name = ["localhost", "127.0.0.1", "[::1]"].contains(&host.host.as_str());
    let bound_ip = host
        .ip()
        .is_some_and(|ip| addr.ip().is_unspecified() || ip == addr.ip());
    if this_port && (loopback_name || bound_ip) {
        return true;
    }
    allowed.iter().any(|a| {
        a.host == host.host
            && match a.port {
                Some(port) => host.port == Some(port),
                None => host.port.is_none() || host.port == Some(addr.port()),
            }
    })
}

/// Whether `origin` is `http://HOST` or `https://HOST` for the request's own Host.
fn same_origin(origin: &HeaderValue, host: Option<&str>) -> bool {
    let (Ok(origin), Some(host)) = (origin.to_str(), host) else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        == Some(host.as_str())
}

/// Whether the body is declared JSON: `application/json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str) -> AdminListen {
        AdminListen::Tcp(addr.parse().unwrap())
    }

    #[test]
    fn the_host_rule() {
        let allowed = [
            HostPort::parse("lb1.example.com").unwrap(),
            HostPort::parse("proxy.example.com:8443").unwrap(),
        ];
        let ok = |host: &str, bound: &str| host_allowed(Some(host), &tcp(bound), &allowed);
        for host in ["localhost:9900", "LOCALHOST:9900", "127.0.0.1:9900", "[::1]:9900"] {
            assert!(ok(host, "127.0.0.1:9900"), "{host}");
        }
        assert!(ok("10.0.0.5:9900", "10.0.0.5:9900"), "the bound IP");
        assert!(ok("10.0.0.5:9900", "0.0.0.0:9900"), "any IP of a wildcard socket");
        assert!(ok("localhost", "127.0.0.1:80"), "no port: port 80");
        assert!(ok("lb1.example.com", "127.0.0.1:9900"));
        assert!(ok("lb1.example.com:9900", "127.0.0.1:9900"));
        assert!(ok("proxy.example.com:8443", "127.0.0.1:9900"));
        for host in [
            "evil.example:9900",
            "localhost:9901",
            "localhost",
            "localhost.:9900",
            "10.0.0.6:9900",
            "lb1.example.com:9901",
            "proxy.example.com",
            "127.0.0.1:9900/x",
            "",
        ] {
            assert!(!ok(host, "127.0.0.1:9900"), "{host:?}");
        }
        assert!(!host_allowed(None, &tcp("127.0.0.1:9900"), &allowed), "no Host");
        let unix = AdminListen::Unix("/run/pb.sock".into());
        assert!(
            host_allowed(Some("anything"), &unix, &[]),
            "no browser reaches a unix socket"
        );
        assert!(host_allowed(None, &unix, &[]));
    }

    #[test]
    fn the_origin_and_content_type_rules() {
        let origin = |o: &str, host: &str| same_origin(&HeaderValue::from_str(o).unwrap(), Some(host));
        assert!(origin("http://127.0.0.1:9900", "127.0.0.1:9900"));
        assert!(origin("https://LB1.example.com", "lb1.example.com"));
        assert!(!origin("http://127.0.0.1:8000", "127.0.0.1:9900"));
        assert!(!origin("null", "127.0.0.1:9900"));
        assert!(!origin("http://127.0.0.1:9900.evil", "127.0.0.1:9900"));
        let json = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_json(&h)
        };
        assert!(json("application/json"));
        assert!(json("Application/JSON; charset=utf-8"));
        assert!(!json("text/plain"));
        assert!(!json("application/x-www-form-urlencoded"));
        assert!(!json("application/jsonp"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn the_dashboard_policy_names_its_script_and_style_by_digest() {
        let page = "<style>a{}</style><script>go()</script>";
        let policy = dashboard_policy(page);
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(s.as_bytes()));
        assert!(
            policy.contains(&format!("script-src 'sha256-{}'", b64("go()"))),
            "{policy}"
        );
        assert!(
            policy.contains(&format!("style-src 'sha256-{}'", b64("a{}"))),
            "{policy}"
        );
        assert!(policy.contains("frame-ancestors 'none'"));
    }
}
