//! A minimal HTTP/1.1 client for the admin API, used by `protobalance ctl`
//! (and the tests): one request per connection, JSON in and out.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a whole request may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {admin}: {source}")]
    Unreachable { admin: String, source: std::io::Error },
    #[error("the admin API at {admin} did not answer within {TIMEOUT:?}")]
    Timeout { admin: String },
    #[error("HTTP error talking to {admin}: {source}")]
    Http { admin: String, source: hyper::Error },
    #[error("bad admin address {0:?}: expected HOST:PORT or http://HOST:PORT")]
    BadAddress(String),
    #[error("cannot build the request: {0}")]
    BadRequest(String),
}

/// An answer: the status code and the body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// `HOST:PORT` out of `HOST:PORT`, `http://HOST:PORT` or `http://HOST:PORT/`.
pub fn authority(admin: &str) -> Result<&str, ClientError> {
    let a = admin.strip_prefix("http://").unwrap_or(admin).trim_end_matches('/');
    if a.is_empty() || a.contains('/') || !a.contains(':') {
        return Err(ClientError::BadAddress(admin.to_string()));
    }
    Ok(a)
}

/// Sends one request to the admin API at `admin` and reads the whole answer.
pub async fn request(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let authority = authority(admin)?;
    tokio::time::timeout(TIMEOUT, exchange(authority, token, method, path, body))
        .await
        .map_err(|_| ClientError::Timeout {
            admin: authority.to_string(),
        })?
}

async fn exchange(
    authority: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let http = |source| ClientError::Http {
        admin: authority.to_string(),
        source,
    };
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|source| ClientError::Unreachable {
            admin: authority.to_string(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, authority);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))
        .map_err(|e| ClientError::BadRequest(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(http)?.to_bytes().to_vec();
    Ok(Reply { status, body })
}
