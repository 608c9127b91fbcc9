//! The control socket's client side, used by `batonctl` and the tests.

use std::path::{Path, PathBuf};

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
}

/// Sends one request and returns the status and the streaming body.
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached or the exchange fails.
pub async fn call(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, Incoming), ClientError> {
    let connect_err = |source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    // A path longer than a socket address holds is reached through the
    // folder (see `crate::endpoint`).
    let unix = crate::endpoint::UnixPath::new(socket).map_err(connect_err)?;
    let stream = tokio::net::UnixStream::connect(unix.addr())
        .await
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

/// Sends one request and reads the whole body as text.
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached or the exchange fails.
pub async fn call_text(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<(StatusCode, String), ClientError> {
    let (status, body) = call(socket, method, path_and_query).await?;
    let bytes = body.collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
