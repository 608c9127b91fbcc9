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
    #[error(
        "batond at {} did not answer within {} s{}",
        path.display(),
        limit.as_secs_f64(),
        if *dropped { "; a request it reads after that is dropped, not carried out (`batonctl status` shows what was done)" } else { "" }
    )]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time given.
        limit: Duration,
        /// The request carried a deadline: batond drops it if it reads
        /// it later (a change asked for, not a question).
        dropped: bool,
    },
}

/// A refused connect to a path that is not a socket at all (a wrong
/// `--socket`, a file left in its place) says so: "connection refused"
/// would send the reader looking for a daemon that is not running.
fn explain_connect(socket: &Path, e: std::io::Error) -> std::io::Error {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(socket) {
        Ok(m) if !m.file_type().is_socket() => {
            let what = if m.is_dir() {
                "a folder"
            } else if m.is_file() {
                "a regular file"
            } else {
                "a special file"
            };
            std::io::Error::new(
                e.kind(),
                format!("the path is {what}, not batond's control socket"),
            )
        }
        // The socket file is there, but nobody listens: what a daemon
        // that was killed leaves behind.
        Ok(_) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::io::Error::new(
            e.kind(),
            "connection refused: no batond is running on this socket (a batond that was killed leaves its socket file behind)",
        ),
        // The socket is mode 0660, owned by batond's user and group.
        Ok(_) if e.kind() == std::io::ErrorKind::PermissionDenied => std::io::Error::new(
            e.kind(),
            "permission denied: the control socket is open to root, batond's user and its group only",
        ),
        _ => e,
    }
}

/// Sends one request and returns the status and the streaming body, once
/// the response head has come: within `head_limit`, or as long as it
/// takes with `None` (a deploy waited for answers when it is done).
///
/// # Errors
/// [`ClientError`] when the socket cannot be reached, the exchange fails
/// or the head does not come in time.
pub async fn call(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    head_limit: Option<Duration>,
) -> Result<(StatusCode, Incoming), ClientError> {
    send(socket, method, path_and_query, head_limit, None).await
}

/// The header that carries a change's deadline, in milliseconds since the
/// Unix epoch: batond does not act on a request it reads after it (its
/// sender has given up, and said so).
pub const DEADLINE_HEADER: &str = "baton-deadline-ms";

/// Milliseconds since the Unix epoch, `after` from now.
pub fn epoch_ms(after: Duration) -> u64 {
    let t = std::time::SystemTime::now() + after;
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn send(
    socket: &Path,
    method: Method,
    path_and_query: &str,
    head_limit: Option<Duration>,
    deadline: Option<u64>,
) -> Result<(StatusCode, Incoming), ClientError> {
    let exchange = async {
        let connect_err = |source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        };
        // A path longer than a socket address holds is reached through the
        // folder (see `crate::endpoint`).
        let unix = crate::endpoint::UnixPath::new(socket).map_err(connect_err)?;
        let stream = tokio::net::UnixStream::connect(unix.addr())
            .await
            .map_err(|e| connect_err(explain_connect(socket, e)))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "batond");
        if let Some(ms) = deadline {
            req = req.header(DEADLINE_HEADER, ms);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        Ok((resp.status(), resp.into_body()))
    };
    match head_limit {
        Some(limit) => within(socket, limit, false, exchange).await,
        None => exchange.await,
    }
}

/// A whole body, as text.
///
/// # Errors
/// [`ClientError::Http`] when the body breaks off.
pub async fn text(body: Incoming) -> Result<String, ClientError> {
    let bytes = body.collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// How long [`call_text`] gives batond to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
    // A change (a POST) carries its deadline: batond drops it if it
    // reads it after this call has given up.
    let deadline = (method == Method::POST).then(|| epoch_ms(limit));
    within(socket, limit, deadline.is_some(), async {
        let (status, body) = send(socket, method, path_and_query, None, deadline).await?;
        Ok((status, text(body).await?))
    })
    .await
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

/// `work` within `limit`, else [`ClientError::Timeout`].
async fn within<T>(
    socket: &Path,
    limit: Duration,
    dropped: bool,
    work: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(ClientError::Timeout {
            path: socket.to_path_buf(),
            limit,
            dropped,
        })
    })
}
