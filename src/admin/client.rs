//! A minimal HTTP/1.1 client for the admin API, used by `protobalance ctl`
//! (and the tests): one request per connection, JSON in and out, over TCP
//! (`HOST:PORT`, `http://HOST:PORT`) or a Unix socket (`unix:PATH`). It
//! sends what the API's fences ask of a request (`admin::guard`): its
//! `Host`, and `Content-Type: application/json` on every request that
//! changes state.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

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
    #[error("bad admin address {0:?}: expected HOST:PORT, http://HOST:PORT or unix:PATH")]
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

/// Where the admin API is: a TCP authority or a Unix socket's path.
enum Target<'a> {
    Tcp(&'a str),
    Unix(&'a str),
}

impl<'a> Target<'a> {
    fn of(admin: &'a str) -> Result<Target<'a>, ClientError> {
        match admin.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Target::Unix(path)),
            Some(_) => Err(ClientError::BadAddress(admin.to_string())),
            None => authority(admin).map(Target::Tcp),
        }
    }

    /// How errors name it.
    fn name(&self) -> String {
        match self {
            Target::Tcp(a) => a.to_string(),
            Target::Unix(path) => format!("unix:{path}"),
        }
    }

    /// The `Host` to send: the authority, or `localhost` over a Unix socket.
    fn host(&self) -> &'a str {
        match self {
            Target::Tcp(a) => a,
            Target::Unix(_) => "localhost",
        }
    }
}

/// Sends one request to the admin API at `admin` and reads the whole answer.
pub async fn request(
    admin: &str,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let target = Target::of(admin)?;
    let exchange = async {
        let unreachable = |source| ClientError::Unreachable {
            admin: target.name(),
            source,
        };
        match target {
            Target::Tcp(authority) => {
                let stream = TcpStream::connect(authority).await.map_err(unreachable)?;
                exchange(stream, &target, token, method, path, body).await
            }
            Target::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(unreachable)?;
                exchange(stream, &target, token, method, path, body).await
            }
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout { admin: target.name() })?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    target: &Target<'_>,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Result<Reply, ClientError> {
    let http = |source| ClientError::Http {
        admin: target.name(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let changes_state = !matches!(method, Method::GET | Method::HEAD);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, target.host());
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() || changes_state {
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
