//! The admin side: the HTTP API (JSON), the Prometheus metrics, the live
//! dashboard page and the `ctl` client that talks to them.
//!
//! The API never touches the proxy's sockets: every change goes through a
//! [`Control`] method (which publishes a new snapshot), and every read comes
//! from the published snapshot and the node figures.
//!
//! Authentication: with `[admin] token` set, every request, the dashboard page
//! included, needs `Authorization: Bearer TOKEN`. Browsers may send the token
//! as the password of HTTP Basic authentication instead (any user name): the
//! 401 answer offers Basic, so a browser asks for it once and then sends it
//! with the page's own API calls. Tokens are compared as SHA-256 digests in
//! constant time (so neither their content nor their length leaks) and are
//! never logged. Before the token: the `Host` check; after it, the
//! cross-site checks (`guard`). The socket and its budget: `serve`.

pub mod client;
pub mod ctl;
mod guard;
mod metrics;
mod serve;
pub mod status;

pub use serve::{AdminHandOff, AdminListener};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AdminListen, NodeState};
use crate::control::{Control, ControlError};

/// The largest request body accepted: the API's bodies are a few dozen bytes.
pub const MAX_BODY: usize = 16 * 1024;

/// The dashboard: one page, its CSS and JS inline, nothing fetched from elsewhere.
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the admin API on `listener` until `stop` is cancelled, within the
/// connection budget of the `[admin]` settings in force.
pub async fn serve(listener: AdminListener, control: Control, stop: CancellationToken) {
    let admin = control.admin_config();
    let budget = serve::Budget::of(&admin);
    let bound = match listener.bound() {
        Ok(bound) => bound,
        Err(e) => {
            warn!("admin API: cannot read its own address ({e}); not serving");
            return;
        }
    };
    serve::serve(listener, router(control, bound, budget.request_timeout), budget, stop).await;
}

/// Every route of the admin API, behind its checks: the answer's security
/// headers, the request's time limit, the `Host` of the socket `bound`, the
/// token, then the cross-site rules.
fn router(control: Control, bound: AdminListen, request_timeout: Duration) -> Router {
    let fences = guard::Fences {
        control: control.clone(),
        bound: Arc::new(bound),
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/api/v1/status", get(status))
        .route("/api/v1/clusters/{cluster}/nodes/{node}/state", put(set_node_state))
        .route("/api/v1/services/{service}/cluster", put(set_service_cluster))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/upgrade", post(upgrade))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route: see docs/admin.md") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .layer(middleware::from_fn(guard::check_cross_site))
        .layer(middleware::from_fn_with_state(control.clone(), authorize))
        .layer(middleware::from_fn_with_state(fences, guard::check_host))
        .layer(middleware::from_fn_with_state(request_timeout, time_limit))
        .layer(middleware::from_fn(guard::security_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(control)
}

/// Answers 408 (and closes) a request not done within `limit`, its body
/// read included.
async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request took longer than [admin] request_timeout ({limit:?})"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// An error answer: `{"error": "..."}` with a 4xx status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"protobalance\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let status = match e {
            ControlError::UnknownService(_) | ControlError::UnknownCluster(_) | ControlError::UnknownNode { .. } => {
                StatusCode::NOT_FOUND
            }
            ControlError::NoConfigFile | ControlError::Refused(_) => StatusCode::CONFLICT,
            ControlError::Config(_) | ControlError::Bind(_) => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Refuses a request without the configured token (401).
async fn authorize(State(control): State<Control>, request: Request, next: Next) -> Response {
    let admin = control.admin_config();
    if let Some(token) = admin.token.as_deref()
        && !presented_token(request.headers()).is_some_and(|t| same_token(&t, token))
    {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send Authorization: Bearer TOKEN",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether `presented` is `token`, in time that depends on neither: their
/// digests have one length whatever the lengths of the tokens.
fn same_token(presented: &str, token: &str) -> bool {
    let (a, b) = (Sha256::digest(presented.as_bytes()), Sha256::digest(token.as_bytes()));
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// The token a request carries: `Bearer TOKEN`, or the password of `Basic`.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(credentials.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        return decoded.split_once(':').map(|(_, password)| password.to_string());
    }
    None
}

/// Parses a JSON body, turning every failure into a 4xx `{"error"}` answer.
fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let bad = |e: serde_json::Error| ApiError::new(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}"));
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(bad)?;
    // serde would also read a struct from an array; the API takes objects only.
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad JSON body: expected an object",
        ));
    }
    serde_json::from_value(value).map_err(bad)
}

async fn dashboard() -> impl IntoResponse {
    static POLICY: OnceLock<HeaderValue> = OnceLock::new();
    let policy = POLICY
        .get_or_init(|| HeaderValue::from_str(&guard::dashboard_policy(DASHBOARD)).expect("the policy is plain ASCII"));
    (
        [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::CONTENT_SECURITY_POLICY, policy.clone()),
        ],
        Html(DASHBOARD),
    )
}

async fn status(State(control): State<Control>) -> impl IntoResponse {
    axum::Json(status::Status::of(&control))
}

async fn metrics(State(control): State<Control>) -> Response {
    let store = control
        .state()
        .file
        .shared
        .is_some()
        .then(|| control.live().store_figures.clone());
    match metrics::render(
        &control.snapshot(),
        &control.data().accepted_by_worker(),
        store.as_deref(),
    ) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}")).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: String,
    /// Yellow only: turn red once this has passed (`"10m"`).
    deadline: Option<String>,
}

async fn set_node_state(
    State(control): State<Control>,
    Path((cluster, node)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let StateBody { state, deadline } = json_body(body)?;
    let state = NodeState::parse(&state).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("bad state {state:?}: expected green, yellow or red"),
        )
    })?;
    let Some(deadline) = deadline else {
        control.set_node_state(&cluster, &node, state)?;
        return Ok(axum::Json(
            json!({ "cluster": cluster, "node": node, "state": state.name() }),
        ));
    };
    let bad = |why: String| ApiError::new(StatusCode::BAD_REQUEST, format!("bad deadline {deadline:?}: {why}"));
    if state != NodeState::Yellow {
        return Err(bad(format!(
            "a deadline goes with state yellow (a drain), not {}",
            state.name()
        )));
    }
    let after = crate::config::parse_duration(&deadline).map_err(bad)?;
    if after.is_zero() {
        return Err(bad("must be above zero (set red for at once)".to_string()));
    }
    control.drain_until(&cluster, &node, after)?;
    Ok(axum::Json(
        json!({ "cluster": cluster, "node": node, "state": state.name(), "deadline": deadline }),
    ))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterBody {
    cluster: String,
}

async fn set_service_cluster(
    State(control): State<Control>,
    Path(service): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let ClusterBody { cluster } = json_body(body)?;
    control.set_service_cluster(&service, &cluster)?;
    Ok(axum::Json(json!({ "service": service, "cluster": cluster })))
}

async fn reload(State(control): State<Control>) -> Result<impl IntoResponse, ApiError> {
    info!("reload asked through the admin API");
    match control.reload().await {
        Ok(report) => Ok(axum::Json(report)),
        Err(e) => {
            warn!("reload refused, running configuration unchanged: {e}");
            Err(e.into())
        }
    }
}

/// `POST /api/v1/upgrade`: answers once the new process serves (its pid),
/// or with why it does not (409); this process then hands over and exits.
async fn upgrade(State(control): State<Control>) -> Result<impl IntoResponse, ApiError> {
    info!("upgrade asked through the admin API");
    match control.request_upgrade().await {
        Ok(pid) => Ok(axum::Json(json!({ "pid": pid }))),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("upgrade failed, still serving: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole_whatever_their_lengths() {
        assert!(same_token("s3cret-admin-token", "s3cret-admin-token"));
        for other in [
            "",
            "s",
            "s3cret-admin-toke",
            "s3cret-admin-tokenx",
            "S3cret-admin-token",
        ] {
            assert!(!same_token(other, "s3cret-admin-token"), "{other:?}");
        }
    }
}
