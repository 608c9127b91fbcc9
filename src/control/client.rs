//! The control socket's client side, used by `batonctl` and the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (daemon not running, wrong path,
    /// no permission).
    #[error("cannot reach batond at {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("control request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad control request: {0}")]
    Request(#[from] http::Error),
    /// batond did not answer in time (it is stuck, or something else
    /// holds the socket).
    #[error("batond at {} did not answer within {} s", path.display(), limit.as_secs_f64())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time given.
        limit: Duration,
    },
}

/// Sends one request and returns the status and the streaming body. The
/// connection is made within `connect_limit`; the answer may take as long
/// as it takes (a deploy waited for, the event stream).
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached in time or the
/// exchange fails.
pub async fn call_within(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    connect_limit: Duration,
) -> Result<(StatusCode, Incoming), ClientError> {
    let connect_err = |source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    // A path longer than a socket address holds is reached through the
    // folder (see `crate::endpoint`).
    let unix = crate::endpoint::UnixPath::new(socket).map_err(connect_err)?;
    let stream = tokio::time::timeout(connect_limit, tokio::net::UnixStream::connect(unix.addr()))
        .await
        .map_err(|_| ClientError::Timeout {
            path: socket.to_path_buf(),
            limit: connect_limit,
        })?
        .map_err(connect_err)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(http::header::HOST, "batond")
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body()))
}

/// How long [`call`] and [`call_text`] give batond to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// [`call_within`] with [`ANSWER_TIMEOUT`] to connect.
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached or the exchange fails.
pub async fn call(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, Incoming), ClientError> {
    call_within(socket, method, path_and_query, ANSWER_TIMEOUT).await
}

/// Sends one request and reads the whole body as text, all within
/// `limit`.
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached, the exchange fails
/// or takes longer than `limit`.
pub async fn call_text_within(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    limit: Duration,
) -> Result<(StatusCode, String), ClientError> {
    let exchange = async {
        let (status, body) = call_within(socket, method, path_and_query, limit).await?;
        let bytes = body.collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                path: socket.to_path_buf(),
                limit,
            })
        })
}

/// [`call_text_within`] [`ANSWER_TIMEOUT`].
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached, the exchange fails
/// or takes too long.
pub async fn call_text(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, String), ClientError> {
    call_text_within(socket, method, path_and_query, ANSWER_TIMEOUT).await
}
